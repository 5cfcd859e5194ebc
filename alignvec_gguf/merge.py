"""Merging λ-scaled alignment vectors into a (quantized) GGUF base: θ = θ_base + Σ λ_i Δ_i.

Tensors that no vector touches (or only vectors at λ = 0) are copied byte for byte. Touched tensors
are dequantized with ggml, get Σ λ_i Δ_i added in float32 and are requantized by ggml to the type
the policy picks (``same``: the base tensor's own type). The output is streamed tensor by tensor
into a temporary file and renamed into place; the base file is only ever read.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, GGUFWriter, ReaderTensor
from tqdm import tqdm

from . import ggml
from .atomic import atomic_output
from .avfile import AlignmentVector
from .errors import CompatibilityError, InputError
from .gguffile import GENERATED_TENSORS, Fingerprint, gguf_signature, open_gguf, tensor_bytes, tensor_shape
from .gguffile import field as gguf_field

log = logging.getLogger(__name__)

VectorRef = Union[str, os.PathLike[str], AlignmentVector]
Vectors = Mapping[VectorRef, float]

# Types that need an importance matrix fall back to the nearest type that does not (same 256 blocks).
IMATRIX_FALLBACK: dict[QT, QT] = {QT.IQ2_XXS: QT.Q2_K, QT.IQ2_XS: QT.Q2_K, QT.IQ1_S: QT.Q2_K}
# A base type ggml cannot quantize at all is written as Q8_0 (or F16 where rows do not fit Q8_0).
UNQUANTIZABLE_FALLBACK = QT.Q8_0
_FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
# At 4 bits and below, requantizing dequant(W) + λΔ loses much of a small Δ (benchmarks/knob.py).
COARSE_TYPES = frozenset(
    {QT.Q4_0, QT.Q4_1, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.IQ4_NL, QT.IQ4_XS, QT.IQ3_XXS, QT.IQ3_S, QT.IQ2_S}
    | {QT.IQ1_M, QT.TQ1_0, QT.TQ2_0, QT.MXFP4, QT.NVFP4, QT.Q1_0}
)

K_MERGED_VECTORS = "alignvec.merged.vectors"
K_MERGED_SHA256 = "alignvec.merged.vector_sha256"
K_MERGED_LAMBDAS = "alignvec.merged.lambdas"
K_MERGED_REQUANT = "alignvec.merged.requant"
K_MERGED_BASE = "alignvec.merged.base"


def parse_requant(policy: str) -> QT | None:
    """``"same"`` -> None (keep each tensor's type); a ggml type name (``q8_0``, ``f16``, ``q6_k``...) -> that type."""
    if policy.lower() == "same":
        return None
    choices = sorted(t.name.lower() for t in ggml.QUANTIZABLE if t not in IMATRIX_FALLBACK)
    try:
        qtype = QT[policy.upper()]
    except KeyError:
        qtype = None
    if qtype is None or qtype not in ggml.QUANTIZABLE or qtype in IMATRIX_FALLBACK:
        raise InputError(f"unknown requant policy {policy!r}; use 'same' or one of: {', '.join(choices)}")
    return qtype


def target_type(base_type: QT, shape: tuple[int, ...], policy: QT | None) -> QT:
    """The type a touched tensor is written as, and why it may differ from what was asked."""
    n_per_row = shape[-1]
    if len(shape) <= 1 or base_type in _FLOAT_TYPES and policy is None:
        return base_type if base_type in ggml.QUANTIZABLE else QT.F32
    wanted = base_type if policy is None else policy
    if wanted in IMATRIX_FALLBACK:
        fallback = IMATRIX_FALLBACK[wanted]
        log.warning("%s needs an importance matrix; writing touched tensors as %s", wanted.name, fallback.name)
        wanted = fallback
    if ggml.can_quantize(wanted, n_per_row):
        return wanted
    for fallback in (base_type, UNQUANTIZABLE_FALLBACK, QT.F16):
        if ggml.can_quantize(fallback, n_per_row):
            log.warning("cannot write %s-element rows as %s; using %s", n_per_row, wanted.name, fallback.name)
            return fallback
    return QT.F32


@dataclass
class MergeReport:
    """What a merge did."""

    path: Path
    touched: dict[str, tuple[QT, QT]] = field(default_factory=dict)  # name -> (base type, written type)
    copied: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def open_vectors(vectors: Vectors) -> list[tuple[AlignmentVector, float]]:
    """Open and validate every vector and its λ."""
    if not isinstance(vectors, Mapping):
        raise InputError("vectors must map AV paths (or AlignmentVector objects) to λ, e.g. {'medical.avec.gguf': 0.5}")
    out: list[tuple[AlignmentVector, float]] = []
    for ref, lam in vectors.items():
        av = ref if isinstance(ref, AlignmentVector) else AlignmentVector(ref)
        if isinstance(lam, bool) or not isinstance(lam, (int, float, np.floating)) or not math.isfinite(lam):
            raise InputError(f"λ for {av.path} must be a finite number, got {lam!r}")
        out.append((av, float(lam)))
    return out


def check_compatible(reader: GGUFReader, base: Path, vectors: list[tuple[AlignmentVector, float]]) -> None:
    """Architecture, signature, tensor names and shapes must match before any work is done."""
    arch = gguf_field(reader, "general.architecture")
    shapes = {t.name: tensor_shape(t) for t in reader.tensors}
    signature = gguf_signature(reader)
    for av, _ in vectors:
        what = f"alignment vector {av.path.name} ({av.info.name})"
        if av.info.architecture != arch:
            raise CompatibilityError(
                f"{what} is for architecture {av.info.architecture!r} but {base.name} is {arch!r}; "
                "convert the vector from this model's checkpoints"
            )
        for name in av.names:
            if name not in shapes:
                raise CompatibilityError(f"{what} changes tensor {name}, which {base.name} does not have")
            if av.shape(name) != shapes[name]:
                raise CompatibilityError(
                    f"{what}: tensor {name} has shape {av.shape(name)} but {base.name} has {shapes[name]}"
                )
        if av.info.base_signature != signature:
            raise CompatibilityError(
                f"{what} was made for a model with a different tensor layout than {base.name} "
                "(names or shapes differ); convert it from this model's checkpoints"
            )


def _copy_metadata(reader: GGUFReader, writer: GGUFWriter) -> None:
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture" or f.name.startswith("alignvec.merged."):
            continue
        vtype = f.types[0]
        sub_type = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub_type)
    alignment = gguf_field(reader, "general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment)


def _merged_tensor(t: ReaderTensor, raw: np.ndarray, parts: list[tuple[AlignmentVector, float]]) -> np.ndarray:
    """dequant(base) + Σ λ_i Δ_i as float32 rows (rows x n_per_row)."""
    shape = tensor_shape(t)
    w = ggml.dequantize(raw, t.tensor_type, t.n_elements).reshape(-1, shape[-1])
    for av, lam in parts:
        w += np.float32(lam) * av.delta(t.name).reshape(-1, shape[-1])
    return w


def merge(
    base: str | os.PathLike[str],
    vectors: Vectors,
    out: str | os.PathLike[str],
    *,
    requant: str = "same",
    progress: bool = False,
) -> MergeReport:
    """Write ``base + Σ λ_i Δ_i`` as a GGUF file at ``out`` and return a report.

    ``vectors`` maps AV paths (or :class:`AlignmentVector` objects) to λ. ``requant`` is ``"same"``
    (every tensor keeps the base's type) or a ggml type name for the touched matrices.
    """
    start = time.perf_counter()
    base = Path(base)
    out = Path(out)
    policy = parse_requant(requant)
    opened = open_vectors(vectors)
    reader = open_gguf(base, "base model")
    arch = gguf_field(reader, "general.architecture")
    if not arch:
        raise CompatibilityError(f"base model {base} has no general.architecture; is it a model GGUF?")
    check_compatible(reader, base, opened)
    for av, _ in opened:
        av.check_finite()
    if out.exists() and os.path.samefile(out, base):
        raise InputError(f"output {out} is the base model; the base is never overwritten, choose another path")

    contributions: dict[str, list[tuple[AlignmentVector, float]]] = {}
    for av, lam in opened:
        if lam == 0.0:
            continue
        for name in av.names:
            contributions.setdefault(name, []).append((av, lam))

    report = MergeReport(path=out)
    float_base = all(t.tensor_type in _FLOAT_TYPES for t in reader.tensors if t.name not in GENERATED_TENSORS)
    fingerprint = Fingerprint() if float_base else None

    with atomic_output(out) as tmp:
        writer = GGUFWriter(tmp, arch)
        try:
            _copy_metadata(reader, writer)
            writer.add_array(K_MERGED_VECTORS, [av.info.name or av.path.name for av, _ in opened])
            writer.add_array(K_MERGED_SHA256, [av.sha256 for av, _ in opened])
            writer.add_key_value(
                K_MERGED_LAMBDAS, [lam for _, lam in opened], GGUFValueType.ARRAY, GGUFValueType.FLOAT64
            )
            writer.add_string(K_MERGED_REQUANT, requant.lower())
            writer.add_string(K_MERGED_BASE, base.name)

            types: dict[str, QT] = {}
            for t in reader.tensors:
                shape = tensor_shape(t)
                qtype = target_type(t.tensor_type, shape, policy) if t.name in contributions else t.tensor_type
                types[t.name] = qtype
                nbytes = ggml.row_size(qtype, shape[-1]) * (t.n_elements // shape[-1])
                writer.add_tensor_info(t.name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()

            for t in tqdm(reader.tensors, desc="merging", unit="tensor", disable=not progress):
                raw = tensor_bytes(reader, t)
                if fingerprint is not None:
                    fingerprint.add(t.name, ggml.dequantize(raw, t.tensor_type, t.n_elements))
                parts = contributions.get(t.name)
                if not parts:
                    writer.write_tensor_data(raw)
                    report.copied += 1
                    continue
                rows = _merged_tensor(t, raw, parts)
                writer.write_tensor_data(ggml.quantize(rows, types[t.name]))
                report.touched[t.name] = (t.tensor_type, types[t.name])
        finally:
            writer.close()

    coarse = sorted({w.name for _, w in report.touched.values() if w in COARSE_TYPES})
    if coarse:
        msg = (
            f"touched tensors were requantized to {', '.join(coarse)}: round-to-nearest erases small deltas there "
            "(see README, 'Requantization and the knob'); --requant q8_0 keeps the knob"
        )
        log.warning(msg)
        report.warnings.append(msg)
    if fingerprint is not None:
        digest = fingerprint.hexdigest()
        for av, _ in opened:
            if av.info.base_fingerprint and av.info.base_fingerprint != digest:
                msg = (
                    f"{av.path.name} was made from {av.info.base_source}, whose weights differ from {base.name} "
                    "(a further fine-tuning stage or another precision); AVs usually transfer, check the results"
                )
                log.warning(msg)
                report.warnings.append(msg)
    report.seconds = time.perf_counter() - start
    return report
