"""gguf-py's ``GGUFReader`` behind a bounded header check (being replaced by :mod:`ggufread`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, ReaderTensor

from .errors import FormatError, InputError
from .ggufheader import INTEGER_TYPES, check_gguf  # noqa: F401  (INTEGER_TYPES: re-exported until avfile moves)
from .identity import signature


def open_gguf(path: str | os.PathLike[str], what: str = "GGUF file") -> GGUFReader:
    """Open a GGUF file read-only (memory-mapped) or raise a one-line error that names it.

    The header is checked first by :func:`ggufheader.check_gguf` (bounded work, no memory map), so
    gguf-py only ever parses a file whose counts, lengths, types and offsets are sound.
    Models go through :class:`alignvec_gguf.ggufread.GGUFModel` instead, which decodes metadata lazily.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    if not path.is_file():
        raise InputError(f"{what} {path} is not a file")
    header = check_gguf(path, what)
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # the check should leave gguf-py nothing to trip on; if it does, still one line
        raise FormatError(f"{what} {path} is not a valid GGUF file ({e}); is it truncated or corrupt?") from e
    # The file may have changed between the check and the map (it is a stranger's file, possibly
    # being written): the reader must see what was checked.
    if len(reader.tensors) != len(header.tensors) or any(
        t.name != h.name or t.data_offset != h.offset or t.data.nbytes != h.nbytes
        for t, h in zip(reader.tensors, header.tensors, strict=True)
    ):
        raise FormatError(f"{what} {path} changed while it was being read; open it again once it is complete")
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


def gguf_signature(reader: GGUFReader) -> str:
    return signature((t.name, tensor_shape(t)) for t in reader.tensors)
