"""Merging λ-scaled alignment vectors into a (quantized) GGUF base: θ = θ_base + Σ λ_i Δ_i.

Tensors that no vector touches (or only vectors at λ = 0) are copied byte for byte. Touched tensors
get Σ λ_i Δ_i added in float32 and are requantized as the policy says (see :data:`POLICIES`): by
ggml's own quantizer to a chosen type, or on the base's own grid (same scales, new integer codes;
``requant.py``). The output is streamed tensor by tensor into a temporary file and renamed into place;
the base file is only ever read.

Speed and memory: touched tensors are computed in a pipeline of one worker per core plus one (ctypes
and numpy release the GIL), each tensor on one core except the few big ones (embeddings, output),
which use every core so that they do not hold up the rest; results are written in order, and the
float32 tensors in flight never exceed 1.5 × the largest one.
Pages of the memory-mapped inputs are dropped from the resident set as the merge moves on
(``pages.py``), so peak RSS stays near the base plus a few tensors, whatever the model size.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT
from gguf import GGMLQuantizationType as QT
from tqdm import tqdm

from . import ggml, pages
from .atomic import atomic_output
from .avfile import AlignmentVector
from .errors import CompatibilityError, FormatError, InputError
from .ggufread import SPLIT_KEYS, GGUFModel, ModelTensor
from .ggufwrite import GGUFStreamWriter, TensorSlot, pack_kv
from .identity import GENERATED_TENSORS, Fingerprint, check_fingerprint
from .imatrix import Imatrix, load_imatrix
from .mix import Vectors, check_compatible, open_vectors
from .policy import (
    DEFAULT_POLICY,
    FLOAT_TYPES,
    HIFI_KEEP,
    HIFI_MIN_COS,
    HIFI_MIN_KEPT,
    IMATRIX_FALLBACK,  # noqa: F401 (temporary: tests import it from here until their import line moves)
    NO_GRID_TYPES,
    UNBIASED_BUDGET,
    Policy,
    parse_requant,
    target_type,
)
from .requant import GRID_TYPES, dither_noise, nearest_keeps, requantize_on_grid, scratch, seed_for

log = logging.getLogger(__name__)

# a merge warns when a touched tensor keeps less than this share of its requested change (weight space)
KEPT_SHARE_WARN = 0.5
_KEPT_SAMPLE = 1 << 16  # elements (whole rows) per tensor on which the kept share is measured
BIG_TENSOR_SHARE = 1 / 32  # a tensor with this share of all touched elements is computed on every core
_RELEASE_EVERY = 64 << 20  # bytes streamed between two drops of the inputs' resident pages

K_MERGED_VECTORS = "alignvec.merged.vectors"
K_MERGED_SHA256 = "alignvec.merged.vector_sha256"
K_MERGED_LAMBDAS = "alignvec.merged.lambdas"
K_MERGED_REQUANT = "alignvec.merged.requant"
K_MERGED_BASE = "alignvec.merged.base"
# [whole file, worst tensor]: <realized change, requested change> / |requested change|², weight space (float64)
K_MERGED_KEPT = "alignvec.merged.kept_share"


@dataclass(frozen=True)
class Kept:
    """How much of its requested change a touched tensor kept, in weight space, measured on sampled rows.

    ``dot`` is ``<realized change, requested change>`` and ``ref`` ``|requested change|²`` (float64 sums over
    the same elements), so shares of several tensors combine as ``Σ dot / Σ ref``.
    """

    dot: float
    ref: float

    @property
    def share(self) -> float:
        """``dot / ref``: 1 keeps the whole change, 0 erases it; 1 for a tensor asked to stay as it is."""
        return self.dot / self.ref if self.ref > 0 else 1.0


@dataclass
class MergeReport:
    """What a merge did."""

    path: Path
    touched: dict[str, tuple[QT, QT]] = field(default_factory=dict)  # name -> (base type, written type)
    copied: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    policy: str = DEFAULT_POLICY
    refreshed_blocks: int = 0  # grid policies: blocks quantized afresh because their grid could not hold them
    kept: dict[str, Kept] = field(default_factory=dict)  # touched tensor -> the share of its change it kept

    @property
    def kept_share(self) -> float:
        """The share of the requested change the whole merge kept (weight space, all touched tensors)."""
        ref = sum(k.ref for k in self.kept.values())
        return sum(k.dot for k in self.kept.values()) / ref if ref > 0 else 1.0

    @property
    def min_kept_share(self) -> float:
        """The share kept by the touched tensor that kept least (1.0 when nothing was asked to change)."""
        return min((k.share for k in self.kept.values() if k.ref > 0), default=1.0)


def _merged_metadata(model: GGUFModel, extra: list[bytes]) -> tuple[int, bytes]:
    """The base's metadata as stored (less split keys and an earlier merge's record), then ``extra`` items."""
    leave_out = {*SPLIT_KEYS, *(k for k in model.keys() if k.startswith("alignvec.merged."))}
    n, raw = model.raw_metadata(leave_out)
    return n + len(extra), raw + b"".join(extra)


@dataclass(frozen=True)
class _Job:
    """Everything one touched tensor needs; run in a worker thread."""

    tensor: ModelTensor
    parts: list[tuple[AlignmentVector, float]]
    qtype: QT
    policy: Policy
    imatrix: np.ndarray | None
    full: ModelTensor | None  # the same tensor in the full-precision base, if one was given
    threads: int | None
    rounding: str  # "ggml", or a rounding on the base's grid (requant.ROUNDINGS)
    # round on a finer grid made from the base's own values (quantized to qtype first) instead of the base's
    regrid: bool = False


def _scaled_delta(av: AlignmentVector, name: str, lam: float, n_per_row: int) -> np.ndarray:
    """λ·Δ as float32 rows, scaled in place when the decoded delta is our own copy (saves a tensor of memory).

    An overflow to infinity is not warned about here: the caller reports it (``_check_finite``).
    """
    d = av.delta(name).reshape(-1, n_per_row)
    with np.errstate(over="ignore", invalid="ignore"):
        if _owned(d):
            if lam != 1.0:
                d *= np.float32(lam)
            return d
        return np.multiply(d, np.float32(lam), dtype=np.float32)


def _owned(a: np.ndarray) -> bool:
    """Whether ``a`` may be written: writeable and not a view of a memory-mapped file."""
    if not a.flags.writeable:
        return False
    base: Any = a
    while base is not None:
        if isinstance(base, (np.memmap, mmap.mmap)):
            return False
        base = getattr(base, "base", None)
    return True


def _shift_source(job: _Job) -> Callable[[int, int], np.ndarray]:
    """Σ λ_i Δ_i (plus full − dequant(base) with a full-precision base) for an element range, as float32.

    Full-form vectors are decoded range by range, so a big tensor's change is never whole in memory;
    a low-rank vector's product is made once, up front.
    """
    t = job.tensor
    # low-rank vectors are multiplied out here, once (the range function may run in several threads)
    whole = {i: av.delta(t.name).reshape(-1) for i, (av, _) in enumerate(job.parts) if av.lora is not None}
    base_block = ggml.type_info(t.tensor_type).block_size
    base_size = ggml.type_info(t.tensor_type).type_size

    def get(start: int, stop: int) -> np.ndarray:
        out = scratch("shift", stop - start, np.float32)  # reused per thread: the caller is done with the last
        with np.errstate(over="ignore", invalid="ignore"):  # reported below
            for i, (av, lam) in enumerate(job.parts):
                if i == 0 and i not in whole:
                    av.delta_range(t.name, start, stop, out)  # decoded straight into the buffer
                    if lam != 1.0:
                        out *= np.float32(lam)
                    continue
                part = whole[i][start:stop] if i in whole else av.delta_range(t.name, start, stop)
                assert part is not None
                if i == 0:
                    np.multiply(part, np.float32(lam), out=out)
                else:
                    out += part if lam == 1.0 else part * np.float32(lam)
            if job.full is not None:
                full = job.full
                fb, fs = ggml.type_info(full.tensor_type).block_size, ggml.type_info(full.tensor_type).type_size
                out += ggml.dequantize(full.raw()[start // fb * fs : stop // fb * fs], full.tensor_type, stop - start)
                raw = t.raw()[start // base_block * base_size : stop // base_block * base_size]
                out -= ggml.dequantize(raw, t.tensor_type, stop - start)
        _check_finite(out, t.name, "the change Σ λ·Δ")
        return out

    return get


def _check_finite(values: np.ndarray, name: str, what: str) -> None:
    if not np.isfinite(values).all():
        raise FormatError(
            f"tensor {name}: {what} holds NaN or infinity (a corrupt base, or λ·Δ beyond float32); nothing was written"
        )


def _merged_rows(job: _Job) -> np.ndarray:
    """The merged tensor in float32 rows: (full or dequant(base)) + Σ λ_i Δ_i."""
    t = job.tensor
    n_per_row = t.shape[-1]
    src = job.full if job.full is not None else t
    w = ggml.dequantize(src.raw(), src.tensor_type, t.n_elements).reshape(-1, n_per_row)
    for av, lam in job.parts:
        with np.errstate(over="ignore", invalid="ignore"):  # reported below
            w += _scaled_delta(av, t.name, lam, n_per_row)
    _check_finite(w, t.name, "the merged tensor")
    return w


def _fresh_blocks(job: _Job) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """Quantizes blocks afresh with ggml from their exact targets: for blocks the base's grid cannot hold.

    A block is ggml's unit of quantization, so quantizing it alone gives the bytes it would get in its
    row (with an importance matrix, the block gets its own columns' importance).
    """
    qtype, t = job.qtype, job.tensor
    info = ggml.type_info(qtype)
    bsize = info.block_size

    def fresh(index: np.ndarray, blocks: np.ndarray, shift: np.ndarray) -> np.ndarray:
        target = ggml.dequantize(blocks, qtype, index.size * bsize).reshape(-1, bsize) + shift
        if job.imatrix is None:
            return ggml.quantize(target, qtype, threads=1).reshape(-1, info.type_size)
        out = np.empty((index.size, info.type_size), dtype=np.uint8)
        per_row = t.shape[-1] // bsize
        rows_per_mat = (t.n_elements // t.shape[-1]) // job.imatrix.shape[0]
        mat = index // per_row // rows_per_mat
        col = index % per_row
        for m, c in {(int(a), int(b)) for a, b in zip(mat, col, strict=True)}:
            sel = (mat == m) & (col == c)
            imat = job.imatrix[m, c * bsize : (c + 1) * bsize]
            out[sel] = ggml.quantize(target[sel], qtype, imat, threads=1).reshape(-1, info.type_size)
        return out

    return fresh


def _sample_rows(n_rows: int, n_per_row: int) -> list[tuple[int, int]]:
    """Row ranges of about :data:`_KEPT_SAMPLE` elements, 16 evenly spaced runs (every row of a small tensor)."""
    want = max(1, _KEPT_SAMPLE // n_per_row)
    if n_rows <= want:
        return [(0, n_rows)]
    runs = min(16, want)
    length = want // runs
    starts = np.unique(np.linspace(0, n_rows - length, runs).astype(np.int64))
    return [(int(s), int(s) + length) for s in starts]


def _values(tensor: ModelTensor, start: int, stop: int) -> np.ndarray:
    """Elements ``start:stop`` (block-aligned) of a tensor, dequantized to float32."""
    info = ggml.type_info(tensor.tensor_type)
    raw = tensor.raw()[start // info.block_size * info.type_size : stop // info.block_size * info.type_size]
    return ggml.dequantize(raw, tensor.tensor_type, stop - start)


def kept_share(tensor: ModelTensor, data: np.ndarray, qtype: QT, requested: Callable[[int, int], np.ndarray]) -> Kept:
    """How much of the requested change the merged bytes ``data`` (of ``qtype``) keep over the base's tensor.

    ``requested(start, stop)`` gives the change asked for on an element range (Σ λ·Δ: with a full-precision
    base, not its correction of the base's rounding, which no quantized file keeps); the realized change is
    dequant(merged) − dequant(base).
    Measured on whole rows (:func:`_sample_rows`), so any pair of block types lines up.
    """
    n_per_row = tensor.shape[-1]
    base_row, out_row = ggml.row_size(tensor.tensor_type, n_per_row), ggml.row_size(qtype, n_per_row)
    raw, merged = tensor.raw().reshape(-1), np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    dot = ref = 0.0
    for r0, r1 in _sample_rows(tensor.n_elements // n_per_row, n_per_row):
        n = (r1 - r0) * n_per_row
        want = requested(r0 * n_per_row, r1 * n_per_row).astype(np.float64)
        got = ggml.dequantize(merged[r0 * out_row : r1 * out_row], qtype, n).astype(np.float64)
        got -= ggml.dequantize(raw[r0 * base_row : r1 * base_row], tensor.tensor_type, n)
        dot += float(got @ want)
        ref += float(want @ want)
    return Kept(dot, ref)


def run_job(job: _Job) -> tuple[np.ndarray, int, Kept]:
    """The merged tensor's bytes, how many blocks a grid policy had to quantize afresh, and the share kept."""
    t = job.tensor
    on_grid = job.rounding != "ggml" and job.qtype in GRID_TYPES and (job.qtype == t.tensor_type or job.regrid)
    if not on_grid:
        rows = _merged_rows(job)
        flat = rows.reshape(-1)
        if job.qtype == QT.F32:
            data = flat.view(np.uint8)
        else:
            data = ggml.quantize(rows, job.qtype, job.imatrix, threads=job.threads)
        src = job.full if job.full is not None else t

        def requested(start: int, stop: int) -> np.ndarray:  # the merged target less what it was added to: Σ λ·Δ
            return flat[start:stop] - _values(src, start, stop)

        return data, 0, kept_share(t, data, job.qtype, requested)
    shift = _shift_source(job)
    raw = t.raw()
    threads = job.threads or ggml.default_threads()
    if job.qtype != t.tensor_type:  # regrid: the base's values on the finer type's grid, then the shift on it
        values = ggml.dequantize(raw, t.tensor_type, t.n_elements).reshape(-1, t.shape[-1])
        raw = ggml.quantize(values, job.qtype, job.imatrix, threads=threads)
    try:
        out, refresh = requantize_on_grid(
            raw,
            job.qtype,
            shift,
            job.rounding,
            seed_for(t.name),
            threads,
            noise_budget=job.policy.noise_budget,
            refresh_fn=_fresh_blocks(job),
        )
    except FormatError as e:
        raise FormatError(f"base model tensor {t.name}: {e}") from e
    full = job.full

    def asked(start: int, stop: int) -> np.ndarray:  # Σ λ·Δ: the shift less a full-precision base's correction
        change = shift(start, stop).copy()
        if full is not None:
            change -= _values(full, start, stop) - _values(t, start, stop)
        return change

    return out, int(refresh.sum()), kept_share(t, out, job.qtype, asked)


def _coarse_grid(base_type: QT, qtype: QT) -> bool:
    """Whether a tensor stays on a grid coarser than 8 bits (one of ours: :data:`requant.GRID_TYPES`)."""
    return qtype == base_type and base_type in GRID_TYPES and base_type not in HIFI_KEEP


def _open_full_base(full_base: str | os.PathLike[str], model: GGUFModel) -> GGUFModel:
    full = GGUFModel(full_base, "full-precision base")
    if full.signature() != model.signature():
        raise CompatibilityError(
            f"full-precision base {full.path.name} has other tensors than {model.path.name}; "
            "give the F32/F16/BF16 GGUF the quantized base was made from"
        )
    coarse = sorted({t.tensor_type.name for t in full.tensors if t.tensor_type not in FLOAT_TYPES})
    if coarse:
        raise InputError(
            f"full-precision base {full.path.name} holds {', '.join(coarse)} tensors; give an F32, F16 or BF16 GGUF"
        )
    return full


class MergePlan:
    """What a merge will do, decided before any tensor is written: the checks, and one job per touched tensor.

    :func:`merge` streams it into a file; ``direct.py`` uploads it into llama.cpp without one.
    Construction validates everything (vectors, compatibility, imatrix, full-precision base).
    """

    def __init__(
        self,
        base: str | os.PathLike[str],
        vectors: Vectors,
        *,
        requant: str = DEFAULT_POLICY,
        imatrix: str | os.PathLike[str] | Imatrix | None = None,
        full_base: str | os.PathLike[str] | None = None,
        threads: int | None = None,
    ):
        self.base = Path(base)
        self.policy = parse_requant(requant)
        self.vectors = open_vectors(vectors)
        self.model = GGUFModel(self.base, "base model")
        arch = self.model.field("general.architecture")
        if not arch:
            raise CompatibilityError(f"base model {self.base} has no general.architecture; is it a model GGUF?")
        self.arch = str(arch)
        check_compatible(self.model, self.base, self.vectors)
        imat = load_imatrix(imatrix) if imatrix is not None and not isinstance(imatrix, Imatrix) else imatrix
        full = _open_full_base(full_base, self.model) if full_base is not None else None
        full_tensors = {t.name: t for t in full.tensors} if full is not None else {}
        contributions: dict[str, list[tuple[AlignmentVector, float]]] = {}
        for av, lam in self.vectors:
            if lam == 0.0:
                continue
            for name in av.names:
                contributions.setdefault(name, []).append((av, lam))
        self.notes: set[str] = set()
        self.jobs: dict[str, _Job] = {}
        self.inputs = [
            *self.model.paths,
            *(av.path for av, _ in self.vectors),
            *(full.paths if full is not None else []),
        ]
        unbiased = self.policy.name.startswith("unbiased")
        sampled = 0  # bytes of the base the choices below have paged in (their vectors' pages come with them)
        for t in self.model.tensors:
            parts = contributions.get(t.name)
            if not parts:
                continue
            if sampled >= _RELEASE_EVERY:  # the planning pass samples every touched tensor: keep its pages bounded
                pages.release(self.inputs)
                sampled = 0
            sampled += t.n_bytes
            imat_rows = imat.for_tensor(t.name, t.shape) if imat is not None and len(t.shape) > 1 else None
            # unbiased on a type without a grid rounding (codebooks, ternary): hifi's finer type, dithered there
            no_grid = unbiased and len(t.shape) > 1 and t.tensor_type in NO_GRID_TYPES
            policy = Policy("hifi", None) if no_grid else self.policy
            qtype = target_type(t.tensor_type, t.shape, policy, imat_rows is not None, self.notes)
            if qtype in FLOAT_TYPES:
                imat_rows = None
            job = _Job(t, parts, qtype, self.policy, imat_rows, full_tensors.get(t.name), threads, self.policy.rounding)
            if no_grid and qtype != t.tensor_type:
                self.notes.add(
                    f"{t.tensor_type.name} has no grid rounding (round-to-nearest keeps a few percent of a small "
                    f"change there): --requant {self.policy.name} wrote its touched tensors as {qtype.name}; "
                    "--requant same keeps the type and erases the knob"
                )
                job = replace(job, regrid=qtype in GRID_TYPES)
            if self.policy.name == "hifi" and qtype != t.tensor_type and t.tensor_type in GRID_TYPES:
                # the base type is enough where its grid already keeps this change (large Δ, fine types)
                kept, cos = nearest_keeps(t.raw(), t.tensor_type, _shift_source(job))
                if kept >= HIFI_MIN_KEPT and cos >= HIFI_MIN_COS:
                    job = replace(job, qtype=t.tensor_type)
            elif unbiased and _coarse_grid(t.tensor_type, qtype):
                # where dithering on the base's own grid costs more than the budget, the tensor moves to a finer
                # grid made from its own values and is dithered there: Q8_0's steps are 8-16 times smaller than
                # 4- and 5-bit types', so the same unbiased rounding adds 1/60-1/250 of the noise
                budget = UNBIASED_BUDGET if self.policy.noise_budget is None else self.policy.noise_budget
                if dither_noise(t.raw(), t.tensor_type, _shift_source(job)) > budget:
                    finer = target_type(t.tensor_type, t.shape, Policy("hifi", None), False, self.notes)
                    job = replace(job, qtype=finer, regrid=finer in GRID_TYPES)
            self.jobs[t.name] = job
        pages.release(self.inputs)

    def qtype(self, name: str) -> QT:
        """The type tensor ``name`` is written as."""
        job = self.jobs.get(name)
        return job.qtype if job is not None else next(t.tensor_type for t in self.model.tensors if t.name == name)


def _f32_in_flight(pending: deque[tuple[ModelTensor, Future[tuple[np.ndarray, int, Kept]] | None]]) -> int:
    return sum(4 * t.n_elements for t, f in pending if f is not None)


def _patch(path: Path, limit: int, replacements: dict[bytes, bytes]) -> None:
    """Overwrite each placeholder (unique, found once in the first ``limit`` bytes) with its same-length value."""
    with open(path, "r+b") as f:
        head = f.read(limit)
        for old, new in replacements.items():
            at = head.find(old)
            assert at >= 0 and len(old) == len(new) and head.find(old, at + 1) < 0, "header placeholder"
            f.seek(at)
            f.write(new)


def _kept_warning(report: MergeReport) -> str | None:
    """The one line that says where a merge kept less than :data:`KEPT_SHARE_WARN` of the change, if it did."""
    low = {n: k.share for n, k in report.kept.items() if k.ref > 0 and k.share < KEPT_SHARE_WARN}
    if not low:
        return None
    types = sorted({report.touched[n][1].name for n in low})
    bases = {report.touched[n][0] for n in low}
    if not report.policy.startswith("unbiased"):
        better = "--requant unbiased keeps it at about the same size"
        if report.policy.split(":")[0] in ("same", "grid", "calibrated", "dither"):  # hifi: the larger file already
            better += " (--requant hifi at a larger file)"
    elif bases <= GRID_TYPES | HIFI_KEEP:
        better = "--requant hifi or q8_0 keeps more at a larger file"
    else:
        better = "--requant f16 keeps all of it at a larger file"
    return (
        f"{len(low)} of {len(report.kept)} touched tensors ({', '.join(types)}) kept only "
        f"{min(low.values()):.0%}-{max(low.values()):.0%} of the requested change under --requant {report.policy} "
        f"(the whole merge {report.kept_share:.0%}; weight space, below {KEPT_SHARE_WARN:.0%} counts as erased): "
        f"{better}; see README, 'Requantization and the knob'"
    )


def diagnose(plan: MergePlan, report: MergeReport, fingerprint: Fingerprint | None) -> None:
    """Log a merge's diagnostics and add them to ``report.warnings``: type fallbacks, the kept share, and
    whether the base holds the weights each vector was made from. A file merge and a direct load share it.

    ``fingerprint`` is the base's tensor fingerprint computed while its tensors were read (float bases),
    or None (gguffile.check_fingerprint then compares what the base's storage types allow).
    """
    for note in sorted(plan.notes):
        log.warning(note)
        report.warnings.append(note)
    if report.refreshed_blocks:
        log.info("%d blocks left the base's grid and were quantized afresh", report.refreshed_blocks)
    if report.kept:
        log.info(
            "kept %.3f of the requested change (weight space; worst tensor %.3f)",
            report.kept_share,
            report.min_kept_share,
        )
    msg = _kept_warning(report)
    if msg is not None:
        log.warning(msg)
        report.warnings.append(msg)
    # Transfer across fine-tuning stages: same signature (checked by MergePlan), other weights -> a warning.
    # What can be compared depends on the base's storage types (gguffile.check_fingerprint).
    reader: Any = plan.model  # check_fingerprint reads .tensors (name, tensor_type, data) of any shard set
    for av, _ in plan.vectors:
        check = check_fingerprint(av.info.base_fingerprint, reader, fingerprint)
        if check.status == "different":
            msg = (
                f"{av.path.name} was made from {av.info.base_source}, but {plan.base} has other weights "
                f"({check.detail}: a further fine-tuning stage or another precision); alignment vectors "
                "usually transfer across fine-tuning stages of one model, check the results"
            )
            log.warning(msg)
            report.warnings.append(msg)
        elif check.status == "unverified":
            log.info(
                "cannot tell whether %s holds the weights %s was made from (%s)", plan.base, av.path.name, check.detail
            )


def float_fingerprint(plan: MergePlan) -> Fingerprint | None:
    """An empty fingerprint to fill tensor by tensor where the base is all float (else None: not needed)."""
    float_base = all(t.tensor_type in FLOAT_TYPES for t in plan.model.tensors if t.name not in GENERATED_TENSORS)
    return Fingerprint() if float_base else None


def merge(
    base: str | os.PathLike[str],
    vectors: Vectors,
    out: str | os.PathLike[str],
    *,
    requant: str = DEFAULT_POLICY,
    progress: bool = False,
    imatrix: str | os.PathLike[str] | Imatrix | None = None,
    full_base: str | os.PathLike[str] | None = None,
    threads: int | None = None,
) -> MergeReport:
    """Write ``base + Σ λ_i Δ_i`` as a GGUF file at ``out`` and return a report.

    ``vectors`` maps AV paths (or :class:`AlignmentVector` objects) to λ. ``requant`` is a policy of
    :data:`POLICIES` or a ggml type name for the touched matrices. ``imatrix`` is llama.cpp's importance
    matrix (GGUF or legacy ``.dat``), used for every touched tensor it covers and required by the
    IQ1/IQ2 types (without it they fall back, with a warning; see :data:`IMATRIX_FALLBACK`).
    ``full_base`` is the full-precision GGUF the quantized base was made from: touched tensors are
    then computed from it instead of from the dequantized base. ``base`` may be the first file of a
    split model (``NAME-00001-of-0000N.gguf``); the output is one file. ``threads`` defaults to every
    core. Names, shapes, architecture and signature are checked before any work; each vector tensor is
    checked for NaN and infinity as it is read (it is read once), and a bad value aborts the merge
    before the output exists.
    """
    start = time.perf_counter()
    base = Path(base)
    out = Path(out)
    if isinstance(vectors, Mapping) and not vectors:
        raise InputError("merge needs at least one alignment vector, e.g. {'medical.avec.gguf': 0.5}")
    plan = MergePlan(base, vectors, requant=requant, imatrix=imatrix, full_base=full_base, threads=threads)
    model, opened, policy, jobs = plan.model, plan.vectors, plan.policy, plan.jobs
    if out.exists() and any(os.path.samefile(out, p) for p in model.paths):
        raise InputError(f"output {out} is the base model; the base is never overwritten, choose another path")
    others = [*plan.inputs, *([imatrix] if isinstance(imatrix, (str, os.PathLike)) else [])]
    if out.exists() and any(os.path.exists(p) and os.path.samefile(out, p) for p in others):
        raise InputError(f"output {out} is one of the merge's inputs, which are never overwritten; choose another path")
    report = MergeReport(path=out, policy=policy.name)
    fingerprint = float_fingerprint(plan)
    inputs = plan.inputs

    # The vectors' content sha256 go into the header. Hashing takes a second or more: it runs beside the merge,
    # the header gets placeholders of the same length, and they are patched at the end.
    placeholders = [secrets.token_hex(32) for _ in opened]
    # the kept share is known once every tensor is merged: a placeholder of the same length until then
    kept_placeholder = pack_kv(K_MERGED_KEPT, [1.0 + secrets.randbits(52) / 2**52 for _ in range(2)])
    hasher = ThreadPoolExecutor(1, thread_name_prefix="alignvec-sha256")
    # Each vector is read whole there (AlignmentVector.sha256): the digest recorded is that of what this merge
    # read, and a recorded alignvec.content_sha256 that the tensors no longer match is a FormatError.
    digests = hasher.submit(lambda: [av.sha256 and av.content_sha256 for av, _ in opened])
    hasher.shutdown(wait=False)
    extra = [
        pack_kv(K_MERGED_VECTORS, [av.info.name or av.path.name for av, _ in opened]),
        pack_kv(K_MERGED_SHA256, placeholders),
        pack_kv(K_MERGED_LAMBDAS, [float(lam) for _, lam in opened]),
        pack_kv(K_MERGED_REQUANT, requant.lower()),
        pack_kv(K_MERGED_BASE, base.name),
        kept_placeholder,
    ]
    n_kv, kv = _merged_metadata(model, extra)
    slots = []
    for t in model.tensors:
        qtype = jobs[t.name].qtype if t.name in jobs else t.tensor_type
        nbytes = ggml.row_size(qtype, t.shape[-1]) * (t.n_elements // t.shape[-1])
        slots.append(TensorSlot(t.name, t.shape, qtype, nbytes))
    alignment = int(model.field("general.alignment", GGUF_DEFAULT_ALIGNMENT))  # a UINT32 (ggufheader)
    with atomic_output(out) as tmp:
        try:
            with open(tmp, "wb") as f:
                writer = GGUFStreamWriter(f, alignment)
                kv_end = writer.write_header(n_kv, kv, slots)
                del kv
                total = sum(t.n_bytes for t in model.tensors)
                bar = tqdm(total=total, desc="merging", unit="B", unit_scale=True, disable=not progress, delay=1.0)
                streamed = 0
                pending: deque[tuple[ModelTensor, Future[tuple[np.ndarray, int, Kept]] | None]] = deque()

                def write_head() -> None:
                    nonlocal streamed
                    t, fut = pending.popleft()
                    if fut is None:
                        writer.write_tensor(t.raw())
                        report.copied += 1
                    else:
                        data, refreshed, report.kept[t.name] = fut.result()
                        writer.write_tensor(data)
                        report.touched[t.name] = (t.tensor_type, jobs[t.name].qtype)
                        report.refreshed_blocks += refreshed
                    bar.update(t.n_bytes)
                    streamed += t.n_bytes + (t.n_elements * 4 if fut is not None else 0)
                    if streamed >= _RELEASE_EVERY:
                        pages.release(inputs)
                        streamed = 0

                largest = max((4 * j.tensor.n_elements for j in jobs.values()), default=0)
                touched = sum(j.tensor.n_elements for j in jobs.values())
                cores = threads or ggml.default_threads()
                workers = cores + 1 if cores > 1 else 1
                budget = largest + largest // 2  # float32 bytes of touched tensors in flight
                with ThreadPoolExecutor(workers, thread_name_prefix="alignvec-merge") as pool:
                    try:
                        for t in model.tensors:
                            if fingerprint is not None:
                                fingerprint.add(t.name, ggml.dequantize(t.raw(), t.tensor_type, t.n_elements))
                            job = jobs.get(t.name)
                            if job is not None:  # memory: two of the largest tensors are never in flight at once
                                while pending and _f32_in_flight(pending) + 4 * t.n_elements > budget:
                                    write_head()
                            if job is not None:
                                big = job.tensor.n_elements >= BIG_TENSOR_SHARE * touched
                                job = replace(job, threads=cores if big else 1)
                            pending.append((t, pool.submit(run_job, job) if job is not None else None))
                            while pending and (
                                pending[0][1] is None
                                or pending[0][1].done()
                                or sum(f is not None for _, f in pending) > workers
                            ):
                                write_head()
                        while pending:
                            write_head()
                    finally:
                        for _, fut in pending:
                            if fut is not None:
                                fut.cancel()
                        bar.close()
                writer.finish()
        finally:
            pages.release(inputs)
        patches = {old.encode(): new.encode() for old, new in zip(placeholders, digests.result(), strict=True)}
        patches[kept_placeholder] = pack_kv(K_MERGED_KEPT, [report.kept_share, report.min_kept_share])
        _patch(tmp, kv_end, patches)

    diagnose(plan, report, fingerprint)
    report.seconds = time.perf_counter() - start
    return report
