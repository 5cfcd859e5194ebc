"""Writing a GGUF file as a stream: header, tensor infos, then tensor data in order."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType


def _pack_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def pack_kv(key: str, value: str | Sequence[str] | Sequence[float]) -> bytes:
    """One metadata item as GGUF stores it: a string, or a non-empty array of strings or of float64."""
    if isinstance(value, str):
        return _pack_string(key) + struct.pack("<I", GGUFValueType.STRING) + _pack_string(value)
    items = list(value)
    if not items:
        raise ValueError(f"metadata {key}: GGUF arrays here are never empty")
    head = _pack_string(key) + struct.pack("<I", GGUFValueType.ARRAY)
    if all(isinstance(v, str) for v in items):
        body = b"".join(_pack_string(str(v)) for v in items)
        return head + struct.pack("<IQ", GGUFValueType.STRING, len(items)) + body
    return head + struct.pack("<IQ", GGUFValueType.FLOAT64, len(items)) + struct.pack(f"<{len(items)}d", *items)


@dataclass(frozen=True)
class TensorSlot:
    """A tensor of the file being written: name, numpy-order shape, type and stored size."""

    name: str
    shape: tuple[int, ...]
    tensor_type: GGMLQuantizationType
    nbytes: int


class GGUFStreamWriter:
    """Writes a GGUF v3 file front to back: header (metadata given as bytes), tensor infos, then data.

    gguf-py's ``GGUFWriter`` wants every metadata item as a Python value; a merge copies the base's
    (a tokenizer's hundreds of thousands of items) unchanged as raw bytes (``GGUFModel.raw_metadata``)
    and adds its own with :func:`pack_kv`. Tensor data follows in the order of the infos, each padded
    to ``alignment`` as llama.cpp expects.
    """

    def __init__(self, f: BinaryIO, alignment: int = GGUF_DEFAULT_ALIGNMENT):
        self.f = f
        self.alignment = alignment
        self._pending: list[TensorSlot] = []

    def _pad(self) -> None:
        self.f.write(b"\0" * (-self.f.tell() % self.alignment))

    def write_header(self, n_kv: int, kv: bytes, tensors: Sequence[TensorSlot]) -> int:
        """Write everything before the tensor data; returns where the metadata ends (for later patches)."""
        self.f.write(struct.pack("<IIQQ", GGUF_MAGIC, 3, len(tensors), n_kv))
        self.f.write(kv)
        kv_end = self.f.tell()
        offset = 0
        for t in tensors:
            ne = tuple(reversed(t.shape))
            info = _pack_string(t.name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, t.tensor_type, offset)
            self.f.write(info)
            offset += -(-t.nbytes // self.alignment) * self.alignment
        self._pad()
        self._pending = list(tensors)
        return kv_end

    def write_tensor(self, data: np.ndarray) -> None:
        """The next tensor's bytes, exactly its slot's size."""
        slot = self._pending.pop(0)
        data = np.ascontiguousarray(data)
        if data.nbytes != slot.nbytes:
            raise ValueError(f"tensor {slot.name}: {data.nbytes} bytes given, its slot holds {slot.nbytes}")
        self.f.write(data.data.cast("B"))
        self._pad()

    def finish(self) -> None:
        if self._pending:
            raise ValueError(f"tensor {self._pending[0].name} and {len(self._pending) - 1} more were never written")
