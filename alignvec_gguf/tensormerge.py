"""One touched tensor merged: ``θ + Σ λ_i Δ_i`` computed in float32 and written to its type.

:func:`run_job` is the whole per-tensor step of a merge (a :class:`TensorJob` of the plan in, the tensor's
bytes out): the change is summed from the vectors (full-form vectors range by range, so a big tensor's
change is never whole in memory), added to the base (or the full-precision base), and written by ggml's
quantizer or rounded on the base's own grid (``requant.py``); then the share of the requested change the
bytes keep is measured (:func:`kept_share`). It runs in worker threads; nothing here writes files or logs.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT

from . import ggml
from .avfile import AlignmentVector
from .blockcodec import GRID_TYPES
from .errors import FormatError
from .ggufread import ModelTensor
from .policy import Policy
from .requant import Rounding, requantize_on_grid, scratch, seed_for

_KEPT_SAMPLE = 1 << 16  # elements (whole rows) per tensor on which the kept share is measured
REGRID_CHUNK = 1 << 22  # elements per chunk when a tensor moves to a finer grid: 16 MB of float32, not the whole


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


class Buffers:
    """Output buffers of written tensors, handed back and reused for the next tensor of the same size.

    A merged tensor's bytes are a fresh array of up to a few hundred MB; past glibc's mmap threshold (32 MB)
    each one is new memory, which the kernel faults in and zeroes page by page (12% of a 7B merge's CPU
    time), and freeing it unmaps it again. The merge gives each written tensor's buffer back (:meth:`give`)
    and :func:`run_job` takes one of the same size (:meth:`take`). Up to ``keep`` buffers of each size wait
    unused, none larger than ``largest`` bytes (the few big tensors' buffers are freed). Thread-safe.
    """

    def __init__(self, keep: int, largest: int):
        self.keep, self.largest = keep, largest
        self._idle: dict[int, list[np.ndarray]] = {}  # size -> buffers
        # the buffers handed out, by id (held, so that no other array can take an id while it is listed)
        self._out: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 array of ``nbytes`` (a given-back one where one of that size waits, else new)."""
        with self._lock:
            idle = self._idle.get(nbytes)
            buf = idle.pop() if idle else np.empty(nbytes, dtype=np.uint8)
            self._out[id(buf)] = buf
            return buf

    def give(self, data: np.ndarray) -> None:
        """Hand back ``data`` (or the buffer it is a view of) once it is written; arrays not taken here are ignored."""
        root: Any = data
        while isinstance(root, np.ndarray) and root.base is not None:
            root = root.base
        with self._lock:
            if self._out.get(id(root)) is not root:
                return
            buf = self._out.pop(id(root))
            idle = self._idle.setdefault(buf.nbytes, [])
            if buf.nbytes <= self.largest and len(idle) < self.keep:
                idle.append(buf)


@dataclass(frozen=True)
class TensorJob:
    """Everything one touched tensor needs (:func:`run_job`); the plan makes one per touched tensor."""

    tensor: ModelTensor
    parts: list[tuple[AlignmentVector, float]]
    qtype: QT
    policy: Policy
    imatrix: np.ndarray | None
    full: ModelTensor | None  # the same tensor in the full-precision base, if one was given
    threads: int | None
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


def shift_source(job: TensorJob) -> Callable[[int, int], np.ndarray]:
    """Σ λ_i Δ_i (plus full − dequant(base) with a full-precision base) for an element range, as float32.

    Full-form vectors are decoded range by range, so a big tensor's change is never whole in memory;
    a low-rank vector's product is made once, up front.
    """
    t = job.tensor
    # low-rank vectors are multiplied out here, once (the range function may run in several threads)
    whole = {i: av.delta(t.name).reshape(-1) for i, (av, _) in enumerate(job.parts) if av.lora is not None}

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
                out += _values(job.full, start, stop)
                out -= _values(t, start, stop)
        _check_finite(out, t.name, "the change Σ λ·Δ")
        return out

    return get


def _check_finite(values: np.ndarray, name: str, what: str) -> None:
    if not np.isfinite(values).all():
        raise FormatError(
            f"tensor {name}: {what} holds NaN or infinity (a corrupt base, or λ·Δ beyond float32); nothing was written"
        )


def _merged_rows(job: TensorJob) -> np.ndarray:
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


def _fresh_blocks(job: TensorJob) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """Quantizes blocks afresh with ggml from their exact targets: for blocks the base's grid cannot hold.

    A block is ggml's unit of quantization, so quantizing it alone gives the bytes it would get in its
    row (with an importance matrix, the block gets its own columns' importance).
    """
    qtype, t = job.qtype, job.tensor
    info = ggml.type_info(qtype)
    bsize = info.block_size

    def fresh(index: np.ndarray, blocks: np.ndarray, shift: np.ndarray) -> np.ndarray:
        target = ggml.dequantize(blocks, qtype, index.size * bsize).reshape(-1, bsize) + shift
        if job.imatrix is None:  # on a grid of our own (regrid) ggml's SIMD Q8_0 quantizer is as good (ggml.quantize)
            return ggml.quantize(target, qtype, threads=1, exact=not job.regrid).reshape(-1, info.type_size)
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


def _values(tensor: ModelTensor, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """Elements ``start:stop`` (block-aligned) of a tensor, dequantized to float32 (into ``out`` if given)."""
    info = ggml.type_info(tensor.tensor_type)
    raw = tensor.raw()[start // info.block_size * info.type_size : stop // info.block_size * info.type_size]
    return ggml.dequantize(raw, tensor.tensor_type, stop - start, out=out)


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


def _regrid(
    t: ModelTensor, qtype: QT, imatrix: np.ndarray | None, threads: int, buffers: Buffers | None = None
) -> np.ndarray:
    """The base tensor's values requantized to the finer ``qtype``, a few rows at a time.

    The grid is ggml's round-to-nearest of those values (``exact=False``: on Q8_0 the CPU backend's SIMD
    quantizer, which differs from the file quantizer on rounding ties only; the change is dithered on it next).
    ggml quantizes every row on its own, so chunks give the bytes of one whole call; the float32 copy of
    the tensor (524 MB for a 7B's embedding) is never in memory at once. Stacked matrices with a
    per-matrix importance matrix go whole: their rows map to the matrices by position.
    """
    n_per_row = t.shape[-1]
    n_rows = t.n_elements // n_per_row
    step = n_rows if imatrix is not None and imatrix.ndim > 1 else max(1, REGRID_CHUNK // n_per_row)
    dst_row = ggml.row_size(qtype, n_per_row)
    out = buffers.take(n_rows * dst_row) if buffers is not None else np.empty(n_rows * dst_row, dtype=np.uint8)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        n = (r1 - r0) * n_per_row
        values = _values(t, r0 * n_per_row, r1 * n_per_row, out=scratch("regrid", n, np.float32))
        # the intermediate grid, not a file's bytes: Q8_0 may take the CPU backend's SIMD quantizer
        dst = out[r0 * dst_row : r1 * dst_row]
        ggml.quantize(values.reshape(r1 - r0, n_per_row), qtype, imatrix, threads=threads, exact=False, out=dst)
    return out


def on_grid(job: TensorJob) -> bool:
    """Whether the job rounds on a grid (the base's, or a finer one made from its values) rather than calling
    ggml's quantizer on the whole merged tensor in float32; only the latter holds the tensor whole in float32."""
    fits = job.policy.rounding is not Rounding.GGML and job.qtype in GRID_TYPES
    return fits and (job.qtype == job.tensor.tensor_type or job.regrid)


def run_job(job: TensorJob, buffers: Buffers | None = None) -> tuple[np.ndarray, int, Kept]:
    """The merged tensor's bytes, how many blocks a grid policy had to quantize afresh, and the share kept.

    ``buffers``, if given, supplies the output array of a tensor rounded on a grid (the merge hands each
    written tensor's bytes back to it)."""
    t = job.tensor
    if not on_grid(job):
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
    shift = shift_source(job)
    raw = t.raw()
    threads = job.threads or ggml.default_threads()
    regrid = job.qtype != t.tensor_type
    if regrid:  # the base's values on the finer type's grid (our own copy: the shift is rounded on it in place)
        raw = _regrid(t, job.qtype, job.imatrix, threads, buffers)
    try:
        out, refresh = requantize_on_grid(
            raw,
            job.qtype,
            shift,
            job.policy.rounding,
            seed_for(t.name),
            threads,
            noise_budget=job.policy.noise_budget,
            refresh_fn=_fresh_blocks(job),
            in_place=regrid,
            out=buffers.take(raw.nbytes) if buffers is not None and not regrid else None,
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
