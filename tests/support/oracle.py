"""gguf-py's ``GGUFReader``, the tests' independent oracle for what the package writes and reads.

Production code reads every GGUF through :class:`alignvec_gguf.ggufread.GGUFModel` (its own header walk
and lazy metadata); tests read the same files through gguf-py, a reader written by other people, so that
a bug in ours cannot hide behind itself. These helpers are thin conveniences over ``GGUFReader``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, ReaderTensor

from alignvec_gguf.identity import signature


def open_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """gguf-py's reader of ``path``, read-only and memory-mapped (no header check of ours first)."""
    return GGUFReader(Path(path), "r")


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
    """The layout signature of the file as gguf-py sees its tensors."""
    return signature((t.name, tensor_shape(t)) for t in reader.tensors)
