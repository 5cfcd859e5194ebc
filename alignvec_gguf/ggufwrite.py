"""Writing GGUF files: every GGUF the package writes goes through one of the two writers here.

- :class:`GGUFStreamWriter` writes front to back: header (metadata given as bytes), tensor infos, then
  each tensor's data in order. A merge copies the base's metadata (a tokenizer's hundreds of thousands
  of items) unchanged as raw bytes (``GGUFModel.raw_metadata``) and adds its own with :func:`pack_kv`.
- :class:`SpooledGGUFWriter` takes the tensors first and the metadata last: an AV's signature and
  fingerprint are known only once every delta has streamed past. Tensors are spooled to a temporary
  file by gguf-py's ``GGUFWriter`` (the well-kept writer), and the file is written at :meth:`finish`.
- :class:`DeclaredGGUFWriter` takes the metadata and every tensor's type and shape first, then the
  tensors' data front to back, through gguf-py's ``GGUFWriter`` without a spool: each byte is written
  once. Metadata known only at the end gets placeholders of its final length, patched afterwards.

:func:`patch_header` fills in, after the tensors, metadata a stream writer could only reserve room for.

The writers guard the order of their calls with an explicit state, like gguf-py's writer (``EMPTY`` →
``HEADER`` → ``TENSORS`` → ``DONE``): a tensor before the header, a second header, a ``finish`` with
tensors missing or any call after ``finish`` raises :class:`WriterStateError` naming the state.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType, GGUFWriter


class WriterState(enum.Enum):
    """Where a writer is in its file."""

    EMPTY = "nothing written"
    HEADER = "header written, no tensor data yet"
    TENSORS = "writing tensor data"
    DONE = "finished"


class WriterStateError(ValueError):
    """A writer was called out of order (a bug in the caller, not in a file): the message names the state."""


class _Ordered:
    """The state and its guard, shared by both writers."""

    state = WriterState.EMPTY

    def _expect(self, action: str, *allowed: WriterState) -> None:
        if self.state not in allowed:
            wanted = " or ".join(s.name for s in allowed)
            raise WriterStateError(
                f"{type(self).__name__}: cannot {action} in state {self.state.name} ({self.state.value}); "
                f"it needs state {wanted}"
            )


_W = TypeVar("_W", bound="_OverGGUFPy")


class _OverGGUFPy(_Ordered):
    """What both writers over gguf-py's ``GGUFWriter`` share: typed metadata, closing, the ``with`` block."""

    _writer: GGUFWriter
    _closed = False
    _ADD_STATES: tuple[WriterState, ...] = (WriterState.EMPTY,)  # where add() is allowed

    def add(self, key: str, value: Any, vtype: GGUFValueType, item_type: GGUFValueType | None = None) -> None:
        """One metadata item of an explicit type (strings may be empty; arrays need ``item_type``)."""
        self._expect("add metadata", *self._ADD_STATES)
        if vtype == GGUFValueType.ARRAY and item_type is None:
            raise ValueError(f"metadata {key}: an array needs its item type")
        self._writer.add_key_value(key, value, vtype, item_type)

    def close(self) -> None:
        """Close the file (and drop a spool), also after an error; later calls raise WriterStateError."""
        if not self._closed:
            self._closed = True
            self._writer.close()
        self.state = WriterState.DONE

    def __enter__(self: _W) -> _W:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def patch_header(path: str | os.PathLike[str], end: int, replacements: dict[bytes, bytes]) -> None:
    """Overwrite placeholders in a written file's first ``end`` bytes (its metadata) with same-length values.

    A merge learns some of its metadata (vector digests, the kept share) only after the tensors are written;
    its header holds unique placeholders of the final length (:func:`pack_kv` of random values), replaced
    here in place. Each placeholder must occur exactly once and keep its length, or nothing is written.
    """
    with open(path, "r+b") as f:
        head = f.read(end)
        places = []
        for old, new in replacements.items():
            at = head.find(old)
            if at < 0 or head.find(old, at + 1) >= 0 or len(old) != len(new):
                found = "absent" if at < 0 else "not unique" if len(old) == len(new) else "of another length"
                raise ValueError(f"{path}: a header placeholder of {len(old)} bytes is {found}; nothing was patched")
            places.append((at, new))
        for at, new in places:
            f.seek(at)
            f.write(new)


@dataclass(frozen=True)
class TensorSlot:
    """A tensor of the file being written: name, numpy-order shape, type and stored size."""

    name: str
    shape: tuple[int, ...]
    tensor_type: GGMLQuantizationType
    nbytes: int


class GGUFStreamWriter(_Ordered):
    """Writes a GGUF v3 file front to back: header (metadata given as bytes), tensor infos, then data.

    gguf-py's ``GGUFWriter`` wants every metadata item as a Python value; this one takes them as the
    bytes a file already holds. Tensor data follows in the order of the infos, each padded to
    ``alignment`` as llama.cpp expects. Order: :meth:`write_header` once, :meth:`write_tensor` once per
    slot, :meth:`finish`.
    """

    def __init__(self, f: BinaryIO, alignment: int = GGUF_DEFAULT_ALIGNMENT):
        self.f = f
        self.alignment = alignment
        self._pending: list[TensorSlot] = []

    def _pad(self) -> None:
        self.f.write(b"\0" * (-self.f.tell() % self.alignment))

    def write_header(self, n_kv: int, kv: bytes, tensors: Sequence[TensorSlot]) -> int:
        """Write everything before the tensor data; returns where the metadata ends (for later patches)."""
        self._expect("write the header", WriterState.EMPTY)
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
        self.state = WriterState.HEADER
        return kv_end

    def write_tensor(self, data: np.ndarray) -> None:
        """The next tensor's bytes, exactly its slot's size."""
        self._expect("write a tensor", WriterState.HEADER, WriterState.TENSORS)
        if not self._pending:
            raise WriterStateError(f"{type(self).__name__}: every tensor the header lists is written; no slot is left")
        slot = self._pending[0]
        data = np.ascontiguousarray(data)
        if data.nbytes != slot.nbytes:
            raise ValueError(f"tensor {slot.name}: {data.nbytes} bytes given, its slot holds {slot.nbytes}")
        self._pending.pop(0)
        self.state = WriterState.TENSORS
        self.f.write(data.data.cast("B"))
        self._pad()

    def finish(self) -> None:
        """Check that every slot was written; afterwards the writer takes no more calls."""
        self._expect("finish", WriterState.HEADER, WriterState.TENSORS)
        if self._pending:
            raise WriterStateError(
                f"{type(self).__name__}: cannot finish in state {self.state.name}: tensor {self._pending[0].name} "
                f"and {len(self._pending) - 1} more were never written"
            )
        self.state = WriterState.DONE


class SpooledGGUFWriter(_OverGGUFPy):
    """A GGUF v3 file whose tensors are given before its metadata (an AV's identity is known at the end).

    :meth:`add_tensor` (state ``EMPTY`` → ``TENSORS``) spools each tensor's bytes to a temporary file;
    :meth:`add` records metadata at any time before :meth:`finish`, which writes header, metadata and
    tensors to ``path`` (state ``DONE``). :meth:`close` (or leaving the ``with`` block) frees the
    spool whatever happened. Metadata and tensors are serialized by gguf-py's ``GGUFWriter``.
    """

    _ADD_STATES = (WriterState.EMPTY, WriterState.TENSORS)  # metadata may come after the tensors

    def __init__(self, path: str | os.PathLike[str], architecture: str):
        self._writer = GGUFWriter(os.fspath(path), architecture, use_temp_file=True)

    def add_tensor(self, name: str, data: np.ndarray, tensor_type: GGMLQuantizationType | None = None) -> None:
        """One tensor: F32/F16 values as they are, or ``tensor_type``'s raw blocks (uint8, numpy-order rows)."""
        self._expect("add a tensor", WriterState.EMPTY, WriterState.TENSORS)
        if tensor_type is None:
            self._writer.add_tensor(name, data)
        else:
            self._writer.add_tensor(name, data, raw_dtype=tensor_type)
        self.state = WriterState.TENSORS

    def finish(self) -> None:
        """Write the file: header, metadata, then every spooled tensor."""
        self._expect("finish", WriterState.EMPTY, WriterState.TENSORS)
        self._writer.write_header_to_file()
        self._writer.write_kv_data_to_file()
        self._writer.write_tensors_to_file()
        self.state = WriterState.DONE


class DeclaredGGUFWriter(_OverGGUFPy):
    """A GGUF v3 file whose tensors are declared before any data, then written in that order (no spool).

    :meth:`add` metadata and :meth:`declare` every tensor (state ``EMPTY``); :meth:`begin` writes header,
    metadata and tensor infos and returns where the metadata ends (for :func:`patch_header`); then
    :meth:`write_tensor` once per declared tensor, in order (``TENSORS``), and :meth:`finish` (``DONE``).
    Serialized by gguf-py's ``GGUFWriter``; :meth:`close` (or leaving the ``with`` block) closes the file.
    """

    def __init__(self, path: str | os.PathLike[str], architecture: str):
        self.path = os.fspath(path)
        self._writer = GGUFWriter(self.path, architecture)
        self._left = 0

    def declare(
        self, name: str, dtype: np.dtype[Any], shape: Sequence[int], tensor_type: GGMLQuantizationType | None = None
    ) -> None:
        """A tensor to come: the dtype and shape of the array :meth:`write_tensor` will get, as
        ``GGUFWriter.add_tensor`` takes it (F32/F16 values, or ``tensor_type``'s raw blocks as uint8 rows)."""
        self._expect("declare a tensor", WriterState.EMPTY)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        self._writer.add_tensor_info(name, shape, np.dtype(dtype), nbytes, raw_dtype=tensor_type)
        self._left += 1

    def begin(self) -> int:
        """Write everything before the tensor data; returns where the metadata ends."""
        self._expect("begin", WriterState.EMPTY)
        self._writer.write_header_to_file()
        self._writer.write_kv_data_to_file()  # flushes
        kv_end = os.path.getsize(self.path)
        self._writer.write_ti_data_to_file()
        self.state = WriterState.HEADER
        return kv_end

    def write_tensor(self, data: np.ndarray) -> None:
        """The next declared tensor's data (its declared size; gguf-py checks it)."""
        self._expect("write a tensor", WriterState.HEADER, WriterState.TENSORS)
        if not self._left:
            raise WriterStateError(f"{type(self).__name__}: every declared tensor is written; no slot is left")
        self._writer.write_tensor_data(np.ascontiguousarray(data))
        self._left -= 1
        self.state = WriterState.TENSORS

    def finish(self) -> None:
        """Check that every declared tensor was written, and close the file."""
        self._expect("finish", WriterState.HEADER, WriterState.TENSORS)
        if self._left:
            raise WriterStateError(f"{type(self).__name__}: cannot finish: {self._left} declared tensors never written")
        self.close()
