"""The alignment-vector file format v1 (``*.avec.gguf``): the one place that reads and writes it.

An AV file is a GGUF v3 file with ``general.type = "adapter"``. The full form has
``adapter.type = "alignment_vector"`` and one tensor per changed base tensor, named and shaped exactly
like the base tensor in GGUF layout. The low-rank form has ``adapter.type = "lora"`` and the tensor
pairs ``NAME.lora_a`` / ``NAME.lora_b`` that llama.cpp loads unmodified as a LoRA adapter; what cannot
be low-rank (norms, biases) is listed in ``alignvec.lora.dropped``. See DESIGN.md, "AV file format v1".

Files are read through :class:`ggufread.GGUFModel` (one file, checked header, lazy metadata, memory-mapped
tensors) and written through :class:`ggufwrite.SpooledGGUFWriter`; what is here is the format itself.

Long module: DESIGN.md keeps every reader and writer of the AV format in one module, and both forms
(full and low-rank) share its keys, storage types and checks; the GGUF layer beneath is apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFValueType
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize as np_quantize

from . import ggml
from ._version import __version__
from .atomic import atomic_output
from .errors import FormatError
from .ggufheader import INTEGER_TYPES
from .ggufread import GGUFModel, ModelTensor
from .ggufwrite import DeclaredGGUFWriter, SpooledGGUFWriter, patch_header

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
# sha256 over every stored tensor's bytes in file order, recorded by the writer (optional: older files lack it)
K_CONTENT_SHA256 = "alignvec.content_sha256"
# The low-rank form (llama.cpp's LoRA layout, src/llama-adapter.cpp).
K_LORA_ALPHA = "adapter.lora.alpha"
K_LORA_RANK = "alignvec.lora.rank"
K_LORA_ENERGY = "alignvec.lora.energy"
K_LORA_REL_ERROR = "alignvec.lora.rel_error"
K_LORA_DROPPED = "alignvec.lora.dropped"
K_LORA_DROPPED_NORM = "alignvec.lora.dropped_norm"
K_LORA_DROPPED_REL_CHANGE = "alignvec.lora.dropped_rel_change"
K_LORA_DROPPED_ENERGY = "alignvec.lora.dropped_energy"
LORA_A = ".lora_a"
LORA_B = ".lora_b"
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

_FLOATS = frozenset({GGUFValueType.FLOAT32, GGUFValueType.FLOAT64})
# What AlignmentVector._meta accepts for each kind of value: the value types (as gguf-py lists them) and a word.
_KINDS: dict[str, tuple[frozenset[tuple[GGUFValueType, ...]], str]] = {
    "str": (frozenset({(GGUFValueType.STRING,)}), "a string"),
    "int": (frozenset((t,) for t in INTEGER_TYPES), "an integer"),
    "float": (frozenset((t,) for t in INTEGER_TYPES | _FLOATS), "a number"),
    "strs": (frozenset({(GGUFValueType.ARRAY, GGUFValueType.STRING)}), "an array of strings"),
    "floats": (frozenset((GGUFValueType.ARRAY, t) for t in _FLOATS), "an array of floats"),
}


def producer() -> str:
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


@dataclass(frozen=True)
class LoraStats:
    """What the low-rank form keeps and leaves out, measured when it was written.

    ``rel_error`` is ``‖Δ − BA‖_F / ‖Δ‖_F`` over all matrices. ``dropped`` are the changed tensors
    that cannot be low-rank (norms, biases), with their ``‖Δ‖_F``, their relative change
    ``‖Δ‖_F / ‖W_base‖_F`` (NaN when the base was not at hand) and ``dropped_energy``, their share of
    the whole ``‖Δ‖_F²``.
    """

    rank: int  # the rank cap; 0 for an energy threshold alone
    energy: float  # the energy threshold; 0 for a rank cap alone
    rel_error: float
    dropped: tuple[str, ...] = ()
    dropped_norm: tuple[float, ...] = ()
    dropped_rel_change: tuple[float, ...] = ()
    dropped_energy: float = 0.0


def is_embedding(name: str) -> bool:
    """llama.cpp applies a LoRA on the token embedding with A and B flipped (llm_build_inp_embd)."""
    return name.endswith("token_embd.weight")


def storage_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of this shape takes in an AV file stored as ``dtype``."""
    block, size = GGML_QUANT_SIZES[_storage_type(dtype, shape)]
    return int(np.prod(shape)) // block * size


def _storage_type(dtype: str, shape: tuple[int, ...]) -> QT:
    # 1-D tensors (norms, biases) stay F32, as llama.cpp's converter keeps them.
    if len(shape) <= 1:
        return QT.F32
    qtype = STORAGE_TYPES[dtype]
    if qtype == QT.Q8_0 and shape[-1] % 32:
        return QT.F32
    return qtype


def _stored(data: np.ndarray, qtype: QT) -> np.ndarray:
    """A float32 tensor as a GGUF writer takes it in ``qtype``: F32/F16 values, else raw blocks (uint8 rows)."""
    if qtype == QT.F32:
        return data
    if qtype == QT.F16:  # ggml-cpu's SIMD conversion: the bytes of numpy's astype (round to nearest even), 4x faster
        return ggml.quantize(data.reshape(-1, data.shape[-1]), QT.F16).view(np.float16).reshape(data.shape)
    return np_quantize(data, qtype)


def _stored_spec(qtype: QT, shape: tuple[int, ...]) -> tuple[np.dtype[Any], tuple[int, ...]]:
    """The dtype and shape of :func:`_stored`'s array for a tensor of ``shape``."""
    if qtype in (QT.F32, QT.F16):
        return np.dtype(np.float32 if qtype == QT.F32 else np.float16), shape
    block, size = GGML_QUANT_SIZES[qtype]
    return np.dtype(np.uint8), (*shape[:-1], shape[-1] // block * size)


def _add_storage_tensor(writer: SpooledGGUFWriter, name: str, data: np.ndarray, dtype: str, content: Any) -> None:
    """Add one tensor in its storage type; ``content`` (a sha256) takes its stored bytes."""
    qtype = _storage_type(dtype, data.shape)
    stored = _stored(data, qtype)
    writer.add_tensor(name, stored, None if qtype in (QT.F32, QT.F16) else qtype)
    content.update(np.ascontiguousarray(stored).data)


class MetadataSink(Protocol):
    """Where :func:`put_metadata` puts the keys: :class:`SpooledGGUFWriter`, or any writer with its ``add``."""

    def add(self, key: str, value: Any, vtype: GGUFValueType, item_type: GGUFValueType | None = None) -> None: ...


def put_metadata(
    writer: MetadataSink, info: AVInfo | Callable[[], AVInfo], architecture: str, form: str, content: Any
) -> None:
    """Every metadata key of the AV format, for either form, through ``writer.add(key, value, vtype)``.

    ``info`` is evaluated now if it is a callable; ``content`` is the sha256 that took every stored
    tensor's bytes. Public for writers that stream an AV in another order (the benchmarks' 7B vector).
    """
    if callable(info):
        info = info()
    if info.architecture != architecture:
        raise ValueError(f"info is for {info.architecture!r}, file for {architecture!r}")
    adapter_type = ADAPTER_TYPE_LORA if form == "lora" else ADAPTER_TYPE_FULL

    def put(key: str, value: str) -> None:  # empty strings too
        writer.add(key, value, GGUFValueType.STRING)

    put("general.type", "adapter")
    put("adapter.type", adapter_type)
    writer.add(K_VERSION, FORMAT_VERSION, GGUFValueType.UINT32)
    put(K_NAME, info.name)
    put(K_DESCRIPTION, info.description)
    put(K_DOMAIN, info.domain)
    put(K_FORM, form)
    put(K_BASE_SOURCE, info.base_source)
    put(K_ALIGNED_SOURCE, info.aligned_source)
    put(K_BASE_SIGNATURE, info.base_signature)
    put(K_BASE_FINGERPRINT, info.base_fingerprint)
    put(K_PRODUCER, info.producer or producer())
    put(K_CONTENT_SHA256, content.hexdigest())


def write_av(
    path: str | os.PathLike[str],
    architecture: str,
    deltas: Iterable[tuple[str, np.ndarray]],
    info: AVInfo | Callable[[], AVInfo],
    dtype: str = "f32",
    planned: Sequence[tuple[str, tuple[int, ...]]] | None = None,
) -> int:
    """Write a full-form AV file atomically; tensors whose delta is exactly zero are left out.

    ``deltas`` yields (GGUF tensor name, float32 delta in GGUF layout), consumed one at a time, so memory
    holds one tensor. ``info`` may be a callable, evaluated after the last delta, for metadata computed
    while streaming (signature, fingerprint). Returns the number of tensors written.

    Without ``planned`` the tensors are spooled to a temporary file and copied into the AV at the end.
    ``planned``, the (name, shape) of every delta in the order ``deltas`` yields them, lets the file be
    written front to back instead, each byte once (:func:`_write_planned`): at 7B that is 13.8 GB fewer.
    """
    if dtype not in STORAGE_TYPES:
        raise ValueError(f"storage dtype must be one of {', '.join(STORAGE_TYPES)}, got {dtype!r}")
    if planned is not None:
        return _write_planned(path, architecture, deltas, info, dtype, planned)
    written = 0
    content = hashlib.sha256()
    with atomic_output(path) as tmp, SpooledGGUFWriter(tmp, architecture) as writer:
        for name, delta in deltas:
            delta = np.ascontiguousarray(delta, dtype=np.float32)
            if not np.all(np.isfinite(delta)):
                raise FormatError(f"delta for {name} has NaN or infinite values; check both checkpoints")
            if not np.any(delta):
                continue
            _add_storage_tensor(writer, name, delta, dtype, content)
            written += 1
        put_metadata(writer, info, architecture, "full", content)
        writer.finish()
    return written


class _Digest:
    """What :func:`put_metadata` reads of a content hash: a fixed hex digest (a placeholder, or the final one)."""

    def __init__(self, hexdigest: str):
        self._hex = hexdigest

    def hexdigest(self) -> str:
        return self._hex


def _placeholder(text: str) -> str:
    """A unique stand-in of ``text``'s length for a header value known only at the end."""
    return secrets.token_hex(len(text) // 2 + 1)[: len(text)]


def _write_planned(
    path: str | os.PathLike[str],
    architecture: str,
    deltas: Iterable[tuple[str, np.ndarray]],
    info: AVInfo | Callable[[], AVInfo],
    dtype: str,
    planned: Sequence[tuple[str, tuple[int, ...]]],
) -> int:
    """:func:`write_av` front to back: header first, then each tensor's bytes once, in ``planned`` order.

    The values known only after the last delta (the base's signature and fingerprint, the content digest)
    are written as placeholders of their final length and patched in place (``patch_header``). Storing a
    tensor (hashing it, writing it) runs on a second thread while the next delta is computed. A delta
    that turns out exactly zero fills its slot with zeros and is left out afterwards by writing the file
    once more without it (the rare case: two fine-tunes that share a tensor exactly).
    """
    specs = [(name, tuple(shape), _storage_type(dtype, tuple(shape))) for name, shape in planned]
    start = info() if callable(info) else info
    marks = {
        "base_signature": _placeholder(start.base_signature),
        "base_fingerprint": _placeholder(start.base_fingerprint),
    }
    content_mark = _placeholder("0" * 64)
    marked = dataclasses.replace(start, **marks)
    content = hashlib.sha256()
    zero: set[str] = set()

    def write_file(target: Path, meta: AVInfo, digest: str, keep: list[tuple[str, tuple[int, ...], QT]]) -> Any:
        writer = DeclaredGGUFWriter(target, architecture)
        put_metadata(writer, meta, architecture, "full", _Digest(digest))
        for name, shape, qtype in keep:
            st_dtype, st_shape = _stored_spec(qtype, shape)
            writer.declare(name, st_dtype, st_shape, None if qtype in (QT.F32, QT.F16) else qtype)
        return writer

    with atomic_output(path) as tmp:
        with write_file(tmp, marked, content_mark, specs) as writer, ThreadPoolExecutor(1, "av-write") as pool:
            kv_end = writer.begin()
            pending: Future[None] | None = None

            def store(stored: np.ndarray, hashed: bool) -> None:
                if hashed:
                    content.update(np.ascontiguousarray(stored).data)  # hashlib releases the GIL
                writer.write_tensor(stored)

            count = 0
            for name, delta in deltas:
                want, shape, qtype = specs[count] if count < len(specs) else (None, None, QT.F32)
                if name != want or tuple(delta.shape) != shape:
                    raise ValueError(
                        f"planned deltas: tensor {count} should be {want} {shape}, got {name} {delta.shape}"
                    )
                count += 1
                delta = np.ascontiguousarray(delta, dtype=np.float32)
                if not np.all(np.isfinite(delta)):
                    raise FormatError(f"delta for {name} has NaN or infinite values; check both checkpoints")
                if np.any(delta):
                    stored = _stored(delta, qtype)
                else:
                    zero.add(name)
                    st_dtype, st_shape = _stored_spec(qtype, shape)
                    stored = np.zeros(st_shape, st_dtype)
                if pending is not None:
                    pending.result()
                pending = pool.submit(store, stored, name not in zero)
                if np.shares_memory(stored, delta):  # the stream may reuse the delta's buffer for the next one
                    pending.result()
            if count != len(specs):
                raise ValueError(f"planned deltas: {len(specs)} planned, {count} given")
            if pending is not None:
                pending.result()
            writer.finish()
        final = info() if callable(info) else info
        digest = content.hexdigest()
        values = {field: getattr(final, field) for field in marks}
        if (
            zero
            or dataclasses.replace(final, **marks) != marked
            or any(len(v) != len(marks[k]) for k, v in values.items())
        ):
            # write it again without the zero deltas (or with metadata of other lengths than the placeholders)
            kept = [spec for spec in specs if spec[0] not in zero]
            again = tmp.with_name(tmp.name + ".final")
            try:
                source = GGUFModel(tmp, "alignment vector", split=False)
                with write_file(again, final, digest, kept) as rewriter:
                    rewriter.begin()
                    for name, _, _ in kept:
                        rewriter.write_tensor(source.tensor(name).raw())
                    rewriter.finish()
                del source
                os.replace(again, tmp)
            finally:
                again.unlink(missing_ok=True)
        else:
            patches = {marks[k].encode(): values[k].encode() for k in marks}
            patches[content_mark.encode()] = digest.encode()
            patch_header(tmp, kv_end, patches)
    return len(specs) - len(zero)


def write_lowrank_av(
    path: str | os.PathLike[str],
    architecture: str,
    factors: Iterable[tuple[str, np.ndarray, np.ndarray]],
    info: AVInfo | Callable[[], AVInfo],
    stats: LoraStats | Callable[[], LoraStats],
    *,
    alpha: float,
    dtype: str = "f32",
) -> int:
    """Write a low-rank AV file atomically: a LoRA adapter that llama.cpp loads unmodified.

    ``factors`` yields (GGUF base tensor name, A, B) with ``Δ ≈ B @ A`` in numpy order: A is
    ``(..., r, n_in)``, B is ``(..., n_out, r)``; leading dimensions (stacked experts) are kept. They
    are written as ``NAME.lora_a`` / ``NAME.lora_b`` in llama.cpp's layout (the token embedding's pair
    flipped and transposed, as ``convert_lora_to_gguf.py`` writes it). ``alpha`` becomes
    ``adapter.lora.alpha`` (by convention the rank cap); ``r / alpha`` is folded into each B so that
    llama.cpp's scale ``λ · alpha / r`` applies exactly ``λ · B @ A`` whatever a pair's rank ``r``.
    ``info`` and ``stats`` may be callables, evaluated after the last pair. Returns the number of
    pairs written.
    """
    if dtype not in STORAGE_TYPES:
        raise ValueError(f"storage dtype must be one of {', '.join(STORAGE_TYPES)}, got {dtype!r}")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    written = 0
    content = hashlib.sha256()
    with atomic_output(path) as tmp, SpooledGGUFWriter(tmp, architecture) as writer:
        for name, a, b in factors:
            a = np.ascontiguousarray(a, dtype=np.float32)
            b = np.ascontiguousarray(b, dtype=np.float32)
            if a.ndim < 2 or a.ndim != b.ndim or a.shape[-2] != b.shape[-1] or a.shape[:-2] != b.shape[:-2]:
                raise ValueError(f"{name}: A {a.shape} and B {b.shape} are not a (…, r, n_in) / (…, n_out, r) pair")
            if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
                raise FormatError(f"low-rank factors of {name} have NaN or infinite values; check both checkpoints")
            rank = a.shape[-2]
            if rank == 0 or not (np.any(a) and np.any(b)):
                continue
            b = b * np.float32(rank / alpha) if alpha else b
            if is_embedding(name) and a.ndim == 2:
                lora_a, lora_b = b, np.ascontiguousarray(a.T)  # (n_vocab, r), (n_embd, r)
            else:
                lora_a, lora_b = a, b
            _add_storage_tensor(writer, name + LORA_A, lora_a, dtype, content)
            _add_storage_tensor(writer, name + LORA_B, lora_b, dtype, content)
            written += 1
        if callable(stats):
            stats = stats()
        put_metadata(writer, info, architecture, "lora", content)
        f32, u32, arr = GGUFValueType.FLOAT32, GGUFValueType.UINT32, GGUFValueType.ARRAY
        writer.add(K_LORA_ALPHA, float(alpha), f32)
        writer.add(K_LORA_RANK, int(stats.rank), u32)
        writer.add(K_LORA_ENERGY, float(stats.energy), f32)
        writer.add(K_LORA_REL_ERROR, float(stats.rel_error), f32)
        if stats.dropped:  # GGUF has no empty arrays: absent means nothing was dropped
            writer.add(K_LORA_DROPPED, list(stats.dropped), arr, GGUFValueType.STRING)
            for key, values in (
                (K_LORA_DROPPED_NORM, stats.dropped_norm),
                (K_LORA_DROPPED_REL_CHANGE, stats.dropped_rel_change),
            ):
                writer.add(key, [float(v) for v in values], arr, f32)
        writer.add(K_LORA_DROPPED_ENERGY, float(stats.dropped_energy), f32)
        writer.finish()
    return written


class AlignmentVector:
    """A validated, memory-mapped AV file (full or low-rank form). Tensors are read lazily, one at a time.

    Both forms answer the same questions: :attr:`names` and :meth:`shape` are the base tensors the
    vector changes, :meth:`delta` is that change (for the low-rank form, the expansion
    ``alpha / r · B @ A`` exactly as llama.cpp applies it at scale 1). :attr:`form` tells them apart;
    :attr:`lora` holds the low-rank form's statistics and :meth:`factors` its stored pairs.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._file = file = GGUFModel(self.path, "alignment vector", split=False)
        where = self._where = f"alignment vector {self.path}"
        if file.field("general.type") != "adapter" or file.field_type(K_VERSION) is None:
            raise FormatError(f"{where} is a GGUF file but not an alignment vector (no {K_VERSION})")
        version = self._meta(K_VERSION, "int")
        if version != FORMAT_VERSION:
            raise FormatError(
                f"{where} has format version {version}; this alignvec reads version {FORMAT_VERSION}: upgrade alignvec"
            )
        adapter_type = file.field("adapter.type")
        if adapter_type not in (ADAPTER_TYPE_FULL, ADAPTER_TYPE_LORA):
            raise FormatError(
                f"{where} has adapter.type {adapter_type!r}, expected {ADAPTER_TYPE_FULL!r} or {ADAPTER_TYPE_LORA!r}"
            )
        keys = ("general.architecture", *_REQUIRED)
        missing = [k for k in keys if file.field_type(k) is None]
        if missing:
            raise FormatError(f"{where} lacks metadata {', '.join(missing)}; re-create it with alignvec convert")
        text = {k: self._meta(k, "str") for k in keys}
        self.info = AVInfo(
            architecture=text["general.architecture"],
            name=text[K_NAME],
            description=text[K_DESCRIPTION],
            domain=text[K_DOMAIN],
            base_source=text[K_BASE_SOURCE],
            aligned_source=text[K_ALIGNED_SOURCE],
            base_signature=text[K_BASE_SIGNATURE],
            base_fingerprint=text[K_BASE_FINGERPRINT],
            form=text[K_FORM],
            producer=text[K_PRODUCER],
        )
        self._tensors: dict[str, ModelTensor] = {}
        for t in file.tensors:
            if t.tensor_type not in STORAGE_TYPES.values():
                raise FormatError(
                    f"{where}: tensor {t.name} is stored as {t.tensor_type.name}; v1 allows F32/F16/BF16/Q8_0"
                )
            self._tensors[t.name] = t
        expected_form = "lora" if adapter_type == ADAPTER_TYPE_LORA else "full"
        if self.info.form != expected_form:
            raise FormatError(f"{where} says {K_FORM} = {self.info.form!r} but adapter.type is {adapter_type!r}")
        self.lora: LoraStats | None = None
        self.alpha = 0.0
        self._pairs: dict[str, tuple[ModelTensor, ModelTensor]] = {}
        if adapter_type == ADAPTER_TYPE_LORA:
            self._read_lora(where)

    def _meta(self, key: str, kind: str, default: Any = None) -> Any:
        """The value of ``key`` if it is of ``kind`` (a key of :data:`_KINDS`), ``default`` if absent.

        A stranger's file may hold a string where a number belongs.
        """
        types = self._file.field_types(key)
        if types is None:
            return default
        accepted, expected = _KINDS[kind]
        if types not in accepted:
            found = " of ".join(t.name for t in types)
            raise FormatError(f"{self._where}: metadata {key} is {found}, expected {expected}")
        return self._file.field(key)

    def _read_lora(self, where: str) -> None:
        missing = [k for k in (K_LORA_ALPHA, K_LORA_REL_ERROR) if self._file.field_type(k) is None]
        if missing:
            raise FormatError(f"{where} lacks metadata {', '.join(missing)}; re-create it with alignvec convert --rank")
        self.alpha = float(self._meta(K_LORA_ALPHA, "float"))
        if not (math.isfinite(self.alpha) and self.alpha >= 0):  # it scales every delta
            raise FormatError(f"{where}: {K_LORA_ALPHA} is {self.alpha}, expected a finite number >= 0")
        dropped = tuple(self._meta(K_LORA_DROPPED, "strs", ()))
        norms = tuple(float(v) for v in self._meta(K_LORA_DROPPED_NORM, "floats", ()))
        changes = tuple(float(v) for v in self._meta(K_LORA_DROPPED_REL_CHANGE, "floats", ()))
        if (norms or changes) and not len(norms) == len(changes) == len(dropped):
            raise FormatError(
                f"{where}: {K_LORA_DROPPED} lists {len(dropped)} tensors, with {len(norms)} norms and "
                f"{len(changes)} changes; re-create it with alignvec convert --rank"
            )
        self.lora = LoraStats(
            rank=int(self._meta(K_LORA_RANK, "int", 0)),
            energy=float(self._meta(K_LORA_ENERGY, "float", 0.0)),
            rel_error=float(self._meta(K_LORA_REL_ERROR, "float")),
            dropped=dropped,
            dropped_norm=norms,
            dropped_rel_change=changes,
            dropped_energy=float(self._meta(K_LORA_DROPPED_ENERGY, "float", 0.0)),
        )
        halves: dict[str, dict[str, ModelTensor]] = {}
        for tname, t in self._tensors.items():
            suffix = tname[-len(LORA_A) :]
            if suffix not in (LORA_A, LORA_B):
                raise FormatError(f"{where}: tensor {tname} is not a {LORA_A}/{LORA_B} half as the low-rank form needs")
            halves.setdefault(tname[: -len(suffix)], {})[suffix] = t
        for name, half in halves.items():
            if len(half) != 2:
                lacking = LORA_B if LORA_A in half else LORA_A
                raise FormatError(f"{where}: {name} has no {name}{lacking}; the file is incomplete, re-create it")
            a, b = half[LORA_A].shape, half[LORA_B].shape
            if len(a) != len(b) or len(a) < 2 or a[:-2] != b[:-2]:
                raise FormatError(f"{where}: {name} has lora_a {a} and lora_b {b}, which are not a rank-r pair")
            flipped = is_embedding(name) and len(a) == 2
            if (a[-1] if flipped else a[-2]) != b[-1]:
                raise FormatError(f"{where}: {name} has lora_a {a} and lora_b {b}, whose ranks differ")
            self._pairs[name] = (half[LORA_A], half[LORA_B])

    def __repr__(self) -> str:
        name, form, n = self.info.name, self.form, len(self.names)
        return f"AlignmentVector({str(self.path)!r}, name={name!r}, form={form}, tensors={n})"

    @property
    def form(self) -> str:
        """``"full"`` or ``"lora"`` (the low-rank form)."""
        return self.info.form

    @property
    def names(self) -> list[str]:
        """The GGUF names of the base tensors this vector changes."""
        return list(self._pairs) if self.lora is not None else list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """The numpy-order shape of the base tensor ``name`` (and of its delta)."""
        if self.lora is None:
            return self._tensors[name].shape
        a, b = (t.shape for t in self._pairs[name])
        if is_embedding(name) and len(a) == 2:
            return (a[0], b[0])
        return (*a[:-2], b[-2], a[-1])

    def stored(self, name: str) -> list[ModelTensor]:
        """The file's tensors that hold ``name``'s delta: one in the full form, the A/B pair in the low-rank one."""
        return list(self._pairs[name]) if self.lora is not None else [self._tensors[name]]

    def storage_type(self, name: str) -> QT:
        if self.lora is None:
            return self._tensors[name].tensor_type
        return self._pairs[name][0].tensor_type

    def rank(self, name: str) -> int:
        """The rank of one low-rank pair."""
        if self.lora is None:
            raise ValueError(f"{self.path.name} is the full form; it has no ranks")
        return self._pairs[name][1].shape[-1]

    def _read(self, t: ModelTensor, name: str) -> np.ndarray:
        if t.tensor_type == QT.F32:
            data = t.values()
        else:  # ggml's converters: F16/BF16 through ggml-cpu's SIMD rows, about 10x numpy's astype
            data = ggml.dequantize(t.raw(), t.tensor_type, t.n_elements).reshape(t.shape)
        if not np.all(np.isfinite(data)):
            raise FormatError(f"alignment vector {self.path}: tensor {name} has NaN or infinite values")
        return data

    def factors(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The stored low-rank pair of one tensor, (A, B) as float32 with ``delta = alpha / r · B @ A``.

        A is ``(..., r, n_in)`` and B ``(..., n_out, r)`` whatever the file's layout (the token
        embedding's pair is stored flipped and transposed for llama.cpp; it is turned back here).
        """
        if self.lora is None:
            raise ValueError(f"{self.path.name} is the full form; it has no low-rank factors")
        ta, tb = self._pairs[name]
        a, b = self._read(ta, ta.name), self._read(tb, tb.name)
        if is_embedding(name) and a.ndim == 2:
            a, b = np.ascontiguousarray(b.T), a
        return a, b

    def delta_range(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray | None:
        """Elements ``[start, stop)`` of one tensor's flattened delta as float32, decoded from just those bytes.

        For the full form only (None for the low-rank form, whose pairs are multiplied whole); ``start``
        and ``stop`` must be multiples of the storage block (32 covers every storage type). Raises if a
        value is not finite. Lets a merge stream a big tensor in chunks instead of decoding it whole;
        ``out`` (float32, ``stop - start`` values) receives them if given.
        """
        if self.lora is not None:
            return None
        t = self._tensors[name]
        qtype = QT(t.tensor_type)
        block, size = GGML_QUANT_SIZES[qtype]
        if start % block or stop % block or not 0 <= start <= stop <= int(t.n_elements):
            raise ValueError(f"{name}: range [{start}, {stop}) is not whole {qtype.name} blocks of the tensor")
        raw = t.raw()[start // block * size : stop // block * size]
        data = (
            ggml.dequantize(raw, qtype, stop - start, out)
            if out is not None or qtype != QT.F32
            else raw.view(np.float32)
        )
        if not np.isfinite(data).all():
            raise FormatError(f"alignment vector {self.path}: tensor {name} has NaN or infinite values")
        return data

    def delta(self, name: str) -> np.ndarray:
        """The delta of one tensor as float32 in numpy-order shape; raises if it is not finite."""
        if self.lora is None:
            return self._read(self._tensors[name], name)
        a, b = self.factors(name)
        scale = self.alpha / self.rank(name) if self.alpha else 1.0  # llama.cpp's llama_adapter_lora_weight::get_scale
        with np.errstate(over="ignore", invalid="ignore"):
            delta = (np.matmul(b, a) * np.float32(scale)).astype(np.float32, copy=False)
        if not np.all(np.isfinite(delta)):  # finite factors can still overflow float32 when multiplied
            raise FormatError(f"alignment vector {self.path}: the low-rank delta of {name} overflows float32")
        return delta

    def check_finite(self) -> None:
        """Raise if any stored tensor holds NaN or infinity (reads every tensor once)."""
        for name, t in self._tensors.items():
            self._read(t, name)

    @cached_property
    def content_sha256(self) -> str:
        """sha256 over every stored tensor's bytes in file order: what merged models record as the vector.

        Recorded by the writer (``alignvec.content_sha256``), so a merge need not read the file twice;
        computed here for files that lack it.
        """
        recorded = self._meta(K_CONTENT_SHA256, "str", None)
        if recorded is not None:
            if len(recorded) != 64 or any(c not in "0123456789abcdef" for c in recorded):
                raise FormatError(f"{self._where}: {K_CONTENT_SHA256} is not a sha256 hex digest; re-create it")
            return str(recorded)
        h = hashlib.sha256()
        for t in sorted(self._file.tensors, key=lambda t: t.offset):
            h.update(t.raw().data)
        return h.hexdigest()

    @cached_property
    def sha256(self) -> str:
        """sha256 of the whole file (the merge cache keys on it), with its content digest checked on the way."""
        return self.hash_file()

    def hash_file(self) -> str:
        """Read the file once: return its sha256, and check the recorded ``alignvec.content_sha256``.

        The content digest (its tensors' bytes in file order) is what merged models record as the
        vector; a file edited after it was written would otherwise lend them a false provenance, so a
        mismatch is a :class:`FormatError`. Afterwards :attr:`content_sha256` is the digest of what was read.
        """
        ranges = sorted((t.offset, t.offset + t.n_bytes) for t in self._file.tensors)
        whole, content = hashlib.sha256(), hashlib.sha256()
        pos, i = 0, 0
        with open(self.path, "rb") as f:
            while chunk := f.read(1 << 22):
                whole.update(chunk)
                end = pos + len(chunk)
                while i < len(ranges) and ranges[i][0] < end:
                    a, b = max(ranges[i][0], pos), min(ranges[i][1], end)
                    if a < b:
                        content.update(memoryview(chunk)[a - pos : b - pos])
                    if ranges[i][1] > end:
                        break  # the rest of this tensor is in the next chunk
                    i += 1
                pos = end
        actual = content.hexdigest()
        recorded = self._meta(K_CONTENT_SHA256, "str", None)
        if recorded is not None and recorded != actual:
            raise FormatError(
                f"{self._where}: its tensors changed after it was written ({K_CONTENT_SHA256} says "
                f"{recorded[:12]}..., the file holds {actual[:12]}...); re-create it with alignvec convert"
            )
        self.__dict__["content_sha256"] = actual  # the cached_property, now from what was read
        return whole.hexdigest()
