"""Reading GGUF files safely, and the identity of a model's tensor layout (its signature)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, ReaderTensor

from .errors import FormatError, InputError

# Tensors that llama.cpp's converter generates from the config rather than from checkpoint
# weights; they are not part of the signature because an AV can never touch them.
GENERATED_TENSORS = frozenset({"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"})


def open_gguf(path: str | os.PathLike[str], what: str = "GGUF file") -> GGUFReader:
    """Open a GGUF file read-only (memory-mapped) or raise a one-line error that names it."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    if not path.is_file():
        raise InputError(f"{what} {path} is not a file")
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # gguf-py raises ValueError, IndexError, struct errors... on bad bytes
        raise FormatError(f"{what} {path} is not a valid GGUF file ({e}); is it truncated or corrupt?") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise FormatError(f"{what} {path} is truncated: tensor {t.name} ends past the end of the file")
    return reader


def field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """The decoded value of a metadata key, or ``default`` if it is absent."""
    f = reader.get_field(key)
    return default if f is None else f.contents()


def tensor_shape(t: ReaderTensor) -> tuple[int, ...]:
    """Shape in numpy order (outermost first), the reverse of ggml's ``ne``."""
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def tensor_bytes(reader: GGUFReader, t: ReaderTensor) -> np.ndarray:
    """The tensor's raw bytes exactly as stored (uint8 view of the memory map)."""
    return reader.data[t.data_offset : t.data_offset + t.n_bytes]


def signature(pairs: Iterable[tuple[str, Sequence[int]]]) -> str:
    """sha256 over the sorted (GGUF tensor name, numpy-order shape) pairs, generated tensors left out."""
    h = hashlib.sha256()
    for name, shape in sorted((n, tuple(int(d) for d in s)) for n, s in pairs if n not in GENERATED_TENSORS):
        h.update(f"{name}:{'x'.join(map(str, shape))}\n".encode())
    return h.hexdigest()


def gguf_signature(reader: GGUFReader) -> str:
    return signature((t.name, tensor_shape(t)) for t in reader.tensors)


class Fingerprint:
    """Content hash of a model's weights in GGUF layout: sha256 over (name, float32 values), sorted by name.

    The converter feeds it the base checkpoint's tensors; the runtime can recompute it from a base
    GGUF stored at float precision to tell whether an AV is applied to the model it was made from.
    """

    def __init__(self) -> None:
        self._parts: dict[str, str] = {}

    def add(self, name: str, values: np.ndarray) -> None:
        if name in GENERATED_TENSORS:
            return
        data = np.ascontiguousarray(values, dtype=np.float32)
        self._parts[name] = hashlib.sha256(data.data).hexdigest()

    def hexdigest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self._parts):
            h.update(f"{name}:{self._parts[name]}\n".encode())
        return h.hexdigest()
