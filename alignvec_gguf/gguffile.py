"""Reading GGUF files safely, writing them as a stream, and a model's identity.

A model's identity is its tensor layout (signature) and its weights (fingerprint).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderTensor

from .errors import FormatError, InputError
from .ggufcheck import check_gguf

# Tensors that llama.cpp's converter generates from the config rather than from checkpoint
# weights; they are not part of the signature because an AV can never touch them.
GENERATED_TENSORS = frozenset({"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"})
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


def open_gguf(path: str | os.PathLike[str], what: str = "GGUF file") -> GGUFReader:
    """Open a GGUF file read-only (memory-mapped) or raise a one-line error that names it.

    The header is checked first by :func:`ggufcheck.check_gguf` (bounded work, no memory map), so
    gguf-py only ever parses a file whose counts, lengths, types and offsets are sound.
    Models go through :class:`alignvec_gguf.split.GGUFModel` instead, which decodes metadata lazily.
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


def signature(pairs: Iterable[tuple[str, Sequence[int]]]) -> str:
    """sha256 over the sorted (GGUF tensor name, numpy-order shape) pairs, generated tensors left out."""
    h = hashlib.sha256()
    for name, shape in sorted((n, tuple(int(d) for d in s)) for n, s in pairs if n not in GENERATED_TENSORS):
        h.update(f"{name}:{'x'.join(map(str, shape))}\n".encode())
    return h.hexdigest()


def gguf_signature(reader: GGUFReader) -> str:
    return signature((t.name, tensor_shape(t)) for t in reader.tensors)


# Tensors that llama.cpp stores as F32 in every file type: its converter writes 1-D tensors, norms and MoE
# routers as F32, and its quantizer never quantizes them (src/llama-quant.cpp). Their values survive
# quantization bit for bit, so they can be compared on any base.
_ANCHOR_SUFFIXES = (".bias", "norm.weight", "ffn_gate_inp.weight")
_FLOAT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16})
FINGERPRINT_PREFIX = "v2."
_PART = 30  # hex digits per part: "v2." + 30 + "." + 30 = 64 characters, like a sha256 digest


def is_anchor(name: str) -> bool:
    """Whether llama.cpp keeps this tensor at F32 in every file type (see ``Fingerprint``)."""
    return name.endswith(_ANCHOR_SUFFIXES)


class Fingerprint:
    """Content hash of a model's weights in GGUF layout, in two parts: ``v2.<all>.<anchors>``.

    ``all`` hashes every tensor's float32 values; ``anchors`` hashes only the tensors llama.cpp keeps at
    F32 in every file type (norms, biases, MoE routers; :func:`is_anchor`). The converter feeds it the
    base checkpoint's tensors; a merge recomputes what the base GGUF allows (:func:`check_fingerprint`):
    both parts on a float base, the anchors on a quantized one, where the matrices are no longer the
    values the vector was made from. Each part is 120 bits of sha256.

    ``add`` may be called several times for one tensor with consecutive chunks (C order), e.g. one
    expert at a time of a stacked tensor; the hash is the same as for the whole tensor at once.
    """

    def __init__(self) -> None:
        self._parts: dict[str, Any] = {}

    def add(self, name: str, values: np.ndarray) -> None:
        if name in GENERATED_TENSORS:
            return
        data = np.ascontiguousarray(values, dtype=np.float32)
        h = self._parts.get(name)
        if h is None:
            h = self._parts[name] = hashlib.sha256()
        h.update(data.data)

    def names(self) -> list[str]:
        return sorted(self._parts)

    def _digest(self, names: Iterable[str]) -> str:
        h = hashlib.sha256()
        for name in sorted(names):
            h.update(f"{name}:{self._parts[name].hexdigest()}\n".encode())
        return h.hexdigest()

    def whole_digest(self) -> str:
        """sha256 over every tensor (the v1 fingerprint, which AVs written before v2 carry)."""
        return self._digest(self._parts)

    def anchor_digest(self) -> str:
        return self._digest(n for n in self._parts if is_anchor(n))

    def has_anchors(self) -> bool:
        return any(is_anchor(n) for n in self._parts)

    def hexdigest(self) -> str:
        """The fingerprint as recorded in ``alignvec.base.fingerprint``: ``v2.<all>.<anchors>``."""
        return f"{FINGERPRINT_PREFIX}{self.whole_digest()[:_PART]}.{self.anchor_digest()[:_PART]}"


@dataclass(frozen=True)
class FingerprintCheck:
    """Whether a base GGUF holds the weights an AV was made from.

    ``status``: ``same`` (every part the base allows to check matches), ``different`` (some part
    differs: another fine-tuning stage, or another precision) or ``unverified`` (nothing comparable,
    e.g. a v1 fingerprint on a quantized base). ``checked`` names what was compared.
    """

    status: str
    checked: str
    detail: str = ""


def _anchor_fingerprint(reader: GGUFReader) -> Fingerprint | None:
    """The anchors of a base GGUF, or None if one of them is not stored at F32 (then they cannot match)."""
    fp = Fingerprint()
    for t in reader.tensors:
        if not is_anchor(t.name) or t.name in GENERATED_TENSORS:
            continue
        if t.tensor_type != GGMLQuantizationType.F32:
            return None
        fp.add(t.name, np.asarray(t.data))
    return fp


def check_fingerprint(recorded: str, reader: GGUFReader, computed: Fingerprint | None = None) -> FingerprintCheck:
    """Compare an AV's recorded base fingerprint with a base GGUF.

    ``computed`` is the fingerprint of every base tensor dequantized to float32, if the caller has it
    (a merge computes it while streaming a float base). What can be checked depends on the base:

    - all F32: every weight, exactly;
    - F16 / BF16: every weight if they match exactly, else the anchors (a mismatch of the matrices
      may be the storage precision alone);
    - quantized: the anchors only (norms, biases, MoE routers). A fine-tuning stage that changed
      matrices alone (e.g. a merged LoRA) goes unnoticed there.
    """
    if not recorded:
        return FingerprintCheck("unverified", "nothing", "the vector records no fingerprint")
    tensors = [t for t in reader.tensors if t.name not in GENERATED_TENSORS]
    all_f32 = all(t.tensor_type == GGMLQuantizationType.F32 for t in tensors)
    all_float = all(t.tensor_type in _FLOAT_TYPES for t in tensors)
    if not recorded.startswith(FINGERPRINT_PREFIX):  # v1: one sha256 over every weight
        if computed is None or not all_float:
            return FingerprintCheck("unverified", "nothing", "a whole-model fingerprint cannot be checked on this base")
        same = computed.whole_digest() == recorded
        return FingerprintCheck("same" if same else "different", "all weights", "" if same else "its weights differ")

    whole, _, anchors = recorded[len(FINGERPRINT_PREFIX) :].partition(".")
    if computed is not None and all_float and computed.whole_digest()[:_PART] == whole:
        return FingerprintCheck("same", "all weights")
    anchor_fp = _anchor_fingerprint(reader)
    comparable = anchor_fp is not None and anchor_fp.has_anchors()
    if comparable and anchor_fp is not None and anchor_fp.anchor_digest()[:_PART] != anchors:
        return FingerprintCheck("different", "norms and biases", "its norms and biases differ")
    if computed is not None and all_f32:
        return FingerprintCheck("different", "all weights", "its weights differ")
    if comparable:
        return FingerprintCheck("same", "norms and biases")
    return FingerprintCheck("unverified", "nothing", "no tensor of this base is stored exactly")


# --- writing -------------------------------------------------------------------------------------


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
