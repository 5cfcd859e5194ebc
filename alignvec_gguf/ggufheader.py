"""Checking a GGUF file's header before anything memory-maps it: bounded work, one-line errors.

gguf-py's ``GGUFReader`` trusts what a header says. A string length of 2^62, an array of 2^40 items
or a tensor count of 2^50 makes it loop for hours or build millions of numpy objects; dims whose
product overflows, offsets past the end or unknown type ids surface later as odd exceptions, deep in
the code that uses the tensors. Files come from strangers, so :func:`check_gguf` walks the header
first with plain ``struct`` reads from a file object (no memory map), checks every count and length
against the bytes left in the file and against the caps below, and raises :class:`FormatError`
naming the file and what is wrong. Only then does :class:`ggufread.GGUFModel` memory-map it and
decode values (:func:`decode_value`, one item when asked). Type ids and block sizes come from
``gguf.constants``; nothing about the format is restated here that gguf-py already knows.

The caps sit far above what real models need (the largest vocabularies have ~262k tokens, a 671B
MoE has ~1,100 tensors, llama.cpp allows 4 dims and 63-byte tensor names) and far below what would
hurt: the walker's own memory is one string (≤ :data:`MAX_STRING`); gguf-py's cost is about 1 KiB
and 10 µs per array item, so :data:`MAX_ARRAY_ITEMS` bounds it to ~2 GiB and ~30 s in the worst case.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from .errors import FormatError

SUPPORTED_VERSIONS = (2, 3)
MAX_KV = 1 << 16  # metadata keys
MAX_KEY = 1 << 10  # bytes of one key
MAX_STRING = 16 << 20  # bytes of one string value (an embedded tokenizer.json fits)
MAX_ARRAY_ITEMS = 1 << 21  # items of all arrays together (a 262k vocabulary with scores, types, merges: ~1M)
MAX_TENSORS = 1 << 17
MAX_HEADER = 256 << 20  # bytes of metadata and tensor infos together
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 63  # GGML_MAX_NAME - 1 (its terminating NUL)
# Metadata value types that hold an integer (for checking a stranger's metadata before use).
INTEGER_TYPES = frozenset(
    {
        GGUFValueType.UINT8,
        GGUFValueType.INT8,
        GGUFValueType.UINT16,
        GGUFValueType.INT16,
        GGUFValueType.UINT32,
        GGUFValueType.INT32,
        GGUFValueType.UINT64,
        GGUFValueType.INT64,
    }
)

# Names gguf-py gives its own pseudo-fields; a key with one of them makes GGUFReader (llama.cpp's Python
# tools, and the tests' oracle) fail on the file and on any model merged from it.
RESERVED_KEYS = frozenset({"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"})

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "B",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its header describes it; ``offset`` is absolute (from the start of the file)."""

    name: str
    tensor_type: GGMLQuantizationType
    ne: tuple[int, ...]  # ggml order (innermost first)
    offset: int
    nbytes: int


@dataclass(frozen=True)
class KeyValue:
    """Where one metadata item lies: the whole record (key, type, value) is ``[start, end)``."""

    key: str
    vtype: GGUFValueType
    start: int
    value_start: int  # the value itself (after the key and its type)
    end: int


@dataclass(frozen=True)
class Header:
    """What the check found: enough to tell where each section of the file lies."""

    version: int
    n_kv: int
    alignment: int
    data_offset: int  # where the tensor data section starts
    tensors: tuple[TensorInfo, ...]
    kv: tuple[KeyValue, ...] = ()


class _NotGGUF(Exception):
    """Not a GGUF file at all (magic, version)."""


class _Truncated(Exception):
    """Something runs past the end of the file."""


class _Corrupt(Exception):
    """A value no valid file has (unknown type, duplicate, over a cap, misaligned...)."""


class _Walker:
    """Reads the header sequentially; every read is checked against the bytes left in the file."""

    def __init__(self, f: BinaryIO, size: int):
        self.f = f
        self.size = size
        self.pos = 0
        self.array_items = 0

    def _room(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise _Truncated(f"{what} at byte {self.pos} needs {n} bytes but the file ends at byte {self.size}")
        if self.pos + n > MAX_HEADER:
            raise _Corrupt(f"{what} at byte {self.pos} runs past {MAX_HEADER >> 20} MiB, the limit for a header")

    def take(self, n: int, what: str) -> bytes:
        self._room(n, what)
        data = self.f.read(n)
        if len(data) != n:  # the file shrank while we read it
            raise _Truncated(f"{what} at byte {self.pos}: the file ended early")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self._room(n, what)
        self.pos += n
        self.f.seek(self.pos)

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(struct.unpack("<Q", self.take(8, what))[0])

    def string(self, what: str, cap: int) -> str:
        start = self.pos
        n = self.u64(f"length of {what}")
        if n > cap:
            raise _Corrupt(f"{what} at byte {start} claims {n} bytes; the limit is {cap}")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"{what} at byte {start} is not valid UTF-8") from None

    def name(self, what: str, cap: int) -> str:
        """A key or tensor name. Error messages quote them, so each must be one printable line."""
        start = self.pos
        text = self.string(what, cap)
        if not text or not text.isprintable():
            raise _Corrupt(f"{what} at byte {start} is {text!r}: empty or not printable")
        return text

    def value(self, vtype: GGUFValueType, key: str) -> int | None:
        """Walk one value; returns it when it is an unsigned 32-bit integer (for general.alignment)."""
        fmt = _SCALARS.get(vtype)
        if fmt is not None:
            (value,) = struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), f"value of {key}"))
            if vtype == GGUFValueType.BOOL and value > 1:
                raise _Corrupt(f"key {key} is a bool with value {value}")
            return int(value) if vtype == GGUFValueType.UINT32 else None
        if vtype == GGUFValueType.STRING:
            self.string(f"value of {key}", MAX_STRING)
            return None
        self.array(key)
        return None

    def array(self, key: str) -> None:
        start = self.pos
        itype = _value_type(self.u32(f"item type of {key}"), f"array {key} at byte {start}")
        n = self.u64(f"length of array {key}")
        if itype == GGUFValueType.ARRAY:
            raise _Corrupt(f"array {key} at byte {start} holds arrays; GGUF arrays of arrays are not supported")
        if n == 0:
            raise _Corrupt(f"array {key} at byte {start} is empty, which gguf-py cannot copy into a merged model")
        self.array_items += n
        if self.array_items > MAX_ARRAY_ITEMS:
            raise _Corrupt(f"array {key} at byte {start} has {n} items; all arrays together may have {MAX_ARRAY_ITEMS}")
        fmt = _SCALARS.get(itype)
        if fmt is None:  # strings, one at a time
            for i in range(n):
                self.string(f"item {i} of {key}", MAX_STRING)
        elif itype == GGUFValueType.BOOL:
            if max(self.take(n, f"array {key}")) > 1:
                raise _Corrupt(f"array {key} at byte {start} holds a bool that is neither 0 nor 1")
        else:
            self.skip(n * struct.calcsize(fmt), f"array {key}")


def _value_type(raw: int, where: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise _Corrupt(f"{where} has unknown value type {raw}") from None


def _tensor_type(raw: int, name: str) -> GGMLQuantizationType:
    try:
        qtype = GGMLQuantizationType(raw)
    except ValueError:
        qtype = None
    if qtype is None or qtype not in GGML_QUANT_SIZES:
        raise _Corrupt(f"tensor {name} has unknown type id {raw}")
    return qtype


_RawInfo = tuple[str, GGMLQuantizationType, tuple[int, ...], int]  # name, type, ne, offset from the data section


def _walk(f: BinaryIO, size: int) -> Header:
    w = _Walker(f, size)
    if size < 8:
        raise _NotGGUF(f"it has only {size} bytes")
    magic = w.take(4, "magic")
    if struct.unpack("<I", magic)[0] != GGUF_MAGIC:
        raise _NotGGUF(f"it starts with {magic!r}, not b'GGUF'")
    version = w.u32("version")
    if version & 0xFFFF == 0 and version:
        raise _NotGGUF(f"version {version:#x} looks byte-swapped: big-endian GGUF files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise _NotGGUF(f"it is GGUF version {version}; alignvec reads versions 2 and 3 (re-convert it)")
    n_tensors = w.u64("tensor count")
    n_kv = w.u64("metadata count")
    if n_tensors > MAX_TENSORS:
        raise _Corrupt(f"it claims {n_tensors} tensors; the limit is {MAX_TENSORS}")
    if n_kv > MAX_KV:
        raise _Corrupt(f"it claims {n_kv} metadata keys; the limit is {MAX_KV}")

    alignment = GGUF_DEFAULT_ALIGNMENT
    keys: set[str] = set()
    kvs: list[KeyValue] = []
    for i in range(n_kv):
        start = w.pos
        key = w.name(f"key {i}", MAX_KEY)
        if key in keys:
            raise _Corrupt(f"key {key} at byte {start} appears twice")
        if key in RESERVED_KEYS:
            raise _Corrupt(f"key {key} at byte {start} is reserved")
        keys.add(key)
        vtype = _value_type(w.u32(f"type of {key}"), f"key {key} at byte {start}")
        value_start = w.pos
        value = w.value(vtype, key)
        kvs.append(KeyValue(key, vtype, start, value_start, w.pos))
        if key == "general.alignment":
            if vtype != GGUFValueType.UINT32 or value is None:
                raise _Corrupt(f"general.alignment is a {vtype.name}, not a UINT32")
            if value == 0 or value & (value - 1):
                raise _Corrupt(f"general.alignment is {value}, not a power of two")
            alignment = value

    infos: list[_RawInfo] = []
    names: set[str] = set()
    for i in range(n_tensors):
        start = w.pos
        name = w.name(f"name of tensor {i}", MAX_NAME)
        if name in names:
            raise _Corrupt(f"tensor {name} at byte {start} appears twice")
        names.add(name)
        n_dims = w.u32(f"dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Corrupt(f"tensor {name} has {n_dims} dimensions; ggml allows 1 to {MAX_DIMS}")
        ne = tuple(w.u64(f"dimension {d} of {name}") for d in range(n_dims))
        qtype = _tensor_type(w.u32(f"type of {name}"), name)
        offset = w.u64(f"data offset of {name}")
        infos.append((name, qtype, ne, offset))

    data_offset = -(-w.pos // alignment) * alignment
    tensors = tuple(_place(info, data_offset, alignment, size) for info in infos)
    end = 0
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.offset < end:
            raise _Corrupt(f"the data of tensor {t.name} overlaps the tensor before it")
        end = t.offset + t.nbytes
    return Header(int(version), int(n_kv), alignment, data_offset, tensors, tuple(kvs))


def _place(info: _RawInfo, data_offset: int, alignment: int, size: int) -> TensorInfo:
    name, qtype, ne, offset = info
    block, type_size = GGML_QUANT_SIZES[qtype]
    if min(ne) < 1:
        raise _Corrupt(f"tensor {name} has shape {list(ne)}; every dimension must be at least 1")
    if ne[0] % block:
        raise _Corrupt(f"tensor {name} has rows of {ne[0]} values, not a multiple of {qtype.name}'s block of {block}")
    n = 1
    for d in ne:  # exact integers: a product that would overflow int64 just exceeds the file
        n *= d
    nbytes = n // block * type_size
    if offset % alignment:
        raise _Corrupt(f"tensor {name} has data offset {offset}, not a multiple of the alignment {alignment}")
    start = data_offset + offset
    if start + nbytes > size:
        raise _Truncated(f"tensor {name} ({qtype.name} {list(ne)}) ends at byte {start + nbytes}, past the end")
    return TensorInfo(name, qtype, ne, start, nbytes)


def check_gguf(path: str | os.PathLike[str], what: str = "GGUF file") -> Header:
    """Check the header of the GGUF file at ``path``; raise :class:`FormatError` (one line) if it is bad.

    Reads the header once, sequentially; memory is bounded by one metadata string. Checks the magic,
    the version (2 or 3, little-endian), every count and length against the bytes left and the
    module's caps, value and tensor type ids, UTF-8 of keys, strings and names, keys and tensor names
    (unique, one printable line), general.alignment, dimensions (1 to 4, each ≥ 1, rows a whole
    number of blocks), and that each tensor's data is aligned, inside the file and overlaps no other.
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            return _walk(f, size)
    except _NotGGUF as e:
        raise FormatError(f"{what} {path} is not a valid GGUF file: {e}") from None
    except _Truncated as e:
        raise FormatError(f"{what} {path} is truncated: {e}; re-download or re-create it") from None
    except _Corrupt as e:
        raise FormatError(f"{what} {path} is corrupt: {e}; re-download or re-create it") from None


def decode_value(data: bytes | memoryview, vtype: GGUFValueType) -> Any:
    """The value of one metadata item from its bytes (``KeyValue.value_start`` to ``end`` of a checked file).

    Scalars as Python numbers (bools as bool), strings as str, arrays as lists; the bytes were checked
    by :func:`check_gguf`, so lengths and types are sound. Decoding one item at a time, when asked,
    is what makes opening a model with a 262k-token vocabulary cost a header walk instead of gguf-py's
    eager parse of every item (15 s there).
    """
    value, _ = _decode(memoryview(data), 0, vtype)
    return value


def _decode(buf: memoryview, pos: int, vtype: GGUFValueType) -> tuple[Any, int]:
    fmt = _SCALARS.get(vtype)
    if fmt is not None:
        (value,) = struct.unpack_from("<" + fmt, buf, pos)
        return (bool(value) if vtype == GGUFValueType.BOOL else value), pos + struct.calcsize(fmt)
    if vtype == GGUFValueType.STRING:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return bytes(buf[pos + 8 : pos + 8 + n]).decode("utf-8"), pos + 8 + n
    itype, n = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    item = GGUFValueType(itype)
    fmt = _SCALARS.get(item)
    if fmt is not None:
        size = struct.calcsize(fmt)
        items = list(struct.unpack_from(f"<{n}{fmt}", buf, pos))
        return ([bool(v) for v in items] if item == GGUFValueType.BOOL else items), pos + n * size
    out = []
    for _ in range(n):
        value, pos = _decode(buf, pos, item)
        out.append(value)
    return out, pos
