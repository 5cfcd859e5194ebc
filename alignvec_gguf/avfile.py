"""The alignment-vector file format v1 (``*.avec.gguf``): the one place that reads and writes it.

An AV file is a GGUF v3 file with ``general.type = "adapter"``, ``adapter.type = "alignment_vector"``
(full form) and one tensor per changed base tensor, named and shaped exactly like the base tensor
in GGUF layout. See DESIGN.md, "AV file format v1".
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, GGUFWriter, ReaderTensor
from gguf.quants import dequantize as np_dequantize
from gguf.quants import quantize as np_quantize

from .atomic import atomic_output
from .errors import FormatError
from .gguffile import field, open_gguf, tensor_shape

FORMAT_VERSION = 1
ADAPTER_TYPE_FULL = "alignment_vector"
ADAPTER_TYPE_LORA = "lora"
SUFFIX = ".avec.gguf"

STORAGE_TYPES: dict[str, QT] = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0}

K_VERSION = "alignvec.format_version"
K_NAME = "alignvec.name"
K_DESCRIPTION = "alignvec.description"
K_DOMAIN = "alignvec.domain"
K_FORM = "alignvec.form"
K_BASE_SOURCE = "alignvec.base.source"
K_ALIGNED_SOURCE = "alignvec.aligned.source"
K_BASE_SIGNATURE = "alignvec.base.signature"
K_BASE_FINGERPRINT = "alignvec.base.fingerprint"
K_PRODUCER = "alignvec.producer"
_REQUIRED: tuple[str, ...] = (
    K_NAME,
    K_DESCRIPTION,
    K_DOMAIN,
    K_FORM,
    K_BASE_SOURCE,
    K_ALIGNED_SOURCE,
    K_BASE_SIGNATURE,
    K_BASE_FINGERPRINT,
    K_PRODUCER,
)


def producer() -> str:
    from . import __version__

    return f"alignvec-gguf {__version__}"


@dataclass(frozen=True)
class AVInfo:
    """The metadata of an alignment vector."""

    architecture: str
    name: str
    description: str
    domain: str
    base_source: str
    aligned_source: str
    base_signature: str
    base_fingerprint: str
    form: str = "full"
    producer: str = ""


def _storage_type(dtype: str, shape: tuple[int, ...]) -> QT:
    # 1-D tensors (norms, biases) stay F32, as llama.cpp's converter keeps them.
    if len(shape) <= 1:
        return QT.F32
    qtype = STORAGE_TYPES[dtype]
    if qtype == QT.Q8_0 and shape[-1] % 32:
        return QT.F32
    return qtype


def write_av(
    path: str | os.PathLike[str],
    architecture: str,
    deltas: Iterable[tuple[str, np.ndarray]],
    info: AVInfo | Callable[[], AVInfo],
    dtype: str = "f32",
) -> int:
    """Write a full-form AV file atomically; tensors whose delta is exactly zero are left out.

    ``deltas`` yields (GGUF tensor name, float32 delta in GGUF layout), consumed one at a time and
    spooled to a temporary file, so memory holds one tensor. ``info`` may be a callable, evaluated
    after the last delta, for metadata computed while streaming (signature, fingerprint).
    Returns the number of tensors written.
    """
    if dtype not in STORAGE_TYPES:
        raise ValueError(f"storage dtype must be one of {', '.join(STORAGE_TYPES)}, got {dtype!r}")
    written = 0
    with atomic_output(path) as tmp:
        writer = GGUFWriter(tmp, architecture, use_temp_file=True)
        try:
            for name, delta in deltas:
                delta = np.ascontiguousarray(delta, dtype=np.float32)
                if not np.all(np.isfinite(delta)):
                    raise FormatError(f"delta for {name} has NaN or infinite values; check both checkpoints")
                if not np.any(delta):
                    continue
                qtype = _storage_type(dtype, delta.shape)
                if qtype == QT.F32:
                    writer.add_tensor(name, delta)
                elif qtype == QT.F16:
                    writer.add_tensor(name, delta.astype(np.float16))
                else:
                    writer.add_tensor(name, np_quantize(delta, qtype), raw_dtype=qtype)
                written += 1
            if callable(info):
                info = info()
            if info.architecture != architecture:
                raise ValueError(f"info is for {info.architecture!r}, file for {architecture!r}")

            def put(key: str, value: str) -> None:  # add_string would drop empty strings
                writer.add_key_value(key, value, GGUFValueType.STRING)

            writer.add_type("adapter")
            writer.add_string("adapter.type", ADAPTER_TYPE_FULL)
            writer.add_uint32(K_VERSION, FORMAT_VERSION)
            put(K_NAME, info.name)
            put(K_DESCRIPTION, info.description)
            put(K_DOMAIN, info.domain)
            put(K_FORM, "full")
            put(K_BASE_SOURCE, info.base_source)
            put(K_ALIGNED_SOURCE, info.aligned_source)
            put(K_BASE_SIGNATURE, info.base_signature)
            put(K_BASE_FINGERPRINT, info.base_fingerprint)
            put(K_PRODUCER, info.producer or producer())
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return written


class AlignmentVector:
    """A validated, memory-mapped full-form AV file. Tensors are read lazily, one at a time."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        reader = open_gguf(self.path, "alignment vector")
        self._reader: GGUFReader = reader
        where = f"alignment vector {self.path}"
        if field(reader, "general.type") != "adapter" or field(reader, K_VERSION) is None:
            raise FormatError(f"{where} is a GGUF file but not an alignment vector (no {K_VERSION})")
        version = field(reader, K_VERSION)
        if version != FORMAT_VERSION:
            raise FormatError(
                f"{where} has format version {version}; this alignvec reads version {FORMAT_VERSION}: upgrade alignvec"
            )
        adapter_type = field(reader, "adapter.type")
        if adapter_type == ADAPTER_TYPE_LORA:
            raise FormatError(f"{where} is the low-rank (LoRA) form; merging it is not supported yet")
        if adapter_type != ADAPTER_TYPE_FULL:
            raise FormatError(f"{where} has adapter.type {adapter_type!r}, expected {ADAPTER_TYPE_FULL!r}")
        missing = [k for k in _REQUIRED if reader.get_field(k) is None]
        if missing:
            raise FormatError(f"{where} lacks metadata {', '.join(missing)}; re-create it with alignvec convert")
        arch = field(reader, "general.architecture")
        self.info = AVInfo(
            architecture=str(arch),
            name=field(reader, K_NAME),
            description=field(reader, K_DESCRIPTION),
            domain=field(reader, K_DOMAIN),
            base_source=field(reader, K_BASE_SOURCE),
            aligned_source=field(reader, K_ALIGNED_SOURCE),
            base_signature=field(reader, K_BASE_SIGNATURE),
            base_fingerprint=field(reader, K_BASE_FINGERPRINT),
            form=field(reader, K_FORM),
            producer=field(reader, K_PRODUCER),
        )
        self._tensors: dict[str, ReaderTensor] = {}
        for t in reader.tensors:
            if t.tensor_type not in STORAGE_TYPES.values():
                raise FormatError(
                    f"{where}: tensor {t.name} is stored as {t.tensor_type.name}; v1 allows F32/F16/BF16/Q8_0"
                )
            self._tensors[t.name] = t

    def __repr__(self) -> str:
        return f"AlignmentVector({str(self.path)!r}, name={self.info.name!r}, tensors={len(self._tensors)})"

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tensor_shape(self._tensors[name])

    def storage_type(self, name: str) -> QT:
        return self._tensors[name].tensor_type

    def delta(self, name: str) -> np.ndarray:
        """The delta of one tensor as float32 in numpy-order shape; raises if it is not finite."""
        t = self._tensors[name]
        data = np_dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32, copy=False)
        data = data.reshape(tensor_shape(t))
        if not np.all(np.isfinite(data)):
            raise FormatError(f"alignment vector {self.path}: tensor {name} has NaN or infinite values")
        return data

    def check_finite(self) -> None:
        """Raise if any tensor holds NaN or infinity (reads every tensor once)."""
        for name in self._tensors:
            self.delta(name)

    @cached_property
    def sha256(self) -> str:
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        return h.hexdigest()
