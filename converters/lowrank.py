"""The low-rank form of an alignment vector: a truncated SVD of every matrix Δ, written as a llama.cpp LoRA.

Each Δ (one tensor at a time, as the converter streams them) is factored ``Δ ≈ B @ A`` with
``B = U_r √S_r`` and ``A = √S_r V_rᵀ``, the best rank-r approximation in the Frobenius norm
(Eckart–Young). The rank is a cap (``rank``), the smallest that keeps a share of ‖Δ‖_F² (``energy``),
or both (the smaller). A randomized SVD (Halko, Martinsson & Tropp 2011; subspace iteration with
re-orthonormalization) replaces the full one when the rank is much smaller than the matrix; it is
seeded, so the same checkpoints give the same file. Stacked tensors (MoE experts) are factored one
slice at a time and share one rank. What cannot be low-rank (1-D norms and biases) is dropped, listed
and measured. The file format itself lives in :mod:`alignvec_gguf.avfile`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alignvec_gguf.avfile import AVInfo, LoraStats, is_embedding, storage_nbytes, write_lowrank_av
from alignvec_gguf.errors import FormatError, InputError

log = logging.getLogger(__name__)

OUTPUT_TENSOR = "output.weight"
# A randomized SVD is used when rank + oversampling is at most this share of the smaller dimension.
RANDOMIZED_MAX_SHARE = 0.25
OVERSAMPLE = 10
POWER_ITERATIONS = 4


@dataclass
class LowRankReport:
    """What the low-rank conversion kept and left out."""

    path: Path
    rank: int | None
    energy: float | None
    ranks: dict[str, int] = field(default_factory=dict)  # tensor -> rank written
    tensor_rel_error: dict[str, float] = field(default_factory=dict)  # tensor -> ‖Δ − BA‖_F / ‖Δ‖_F
    rel_error: float = 0.0  # over all matrices
    dropped: dict[str, float] = field(default_factory=dict)  # tensor -> ‖Δ‖_F / ‖W_base‖_F (NaN: base unknown)
    dropped_norm: dict[str, float] = field(default_factory=dict)  # tensor -> ‖Δ‖_F
    dropped_energy: float = 0.0  # share of ‖Δ‖_F² in dropped tensors
    lowrank_bytes: int = 0  # tensor data of the low-rank file
    full_bytes: int = 0  # tensor data the full form would take at the same storage type

    @property
    def tensors_written(self) -> int:
        return len(self.ranks)

    @property
    def size_ratio(self) -> float:
        """Low-rank tensor bytes / full-form tensor bytes (same storage type)."""
        return self.lowrank_bytes / self.full_bytes if self.full_bytes else 0.0

    def summary(self) -> str:
        """One line for the command line."""
        cap = " ".join(
            part
            for part in (f"rank <= {self.rank}" if self.rank else "", f"energy {self.energy:g}" if self.energy else "")
            if part
        )
        ranks = sorted(self.ranks.values())
        span = f"ranks {ranks[0]}..{ranks[-1]}" if ranks else "no matrices"
        line = (
            f"low-rank form ({cap}; {span}): {self.size_ratio:.1%} of the full form's size, "
            f"relative Frobenius error {self.rel_error:.3g}"
        )
        if self.dropped:
            worst = max(self.dropped, key=lambda n: -1.0 if math.isnan(self.dropped[n]) else self.dropped[n])
            line += (
                f"; {len(self.dropped)} tensors cannot be low-rank and are dropped (norms, biases: "
                f"{self.dropped_energy:.2%} of ‖Δ‖², largest relative change {self.dropped[worst]:.3g} in {worst})"
            )
        return line


def check_options(rank: int | None, energy: float | None) -> None:
    """Raise an InputError unless ``rank`` is a positive integer and ``energy`` in (0, 1]."""
    if rank is None and energy is None:
        raise InputError("the low-rank form needs --rank R or --energy E (or both)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InputError(f"--rank must be a positive integer, got {rank!r}")
    if energy is not None and not (0.0 < energy <= 1.0):
        raise InputError(f"--energy must be in (0, 1], e.g. 0.9 for 90% of ‖Δ‖², got {energy!r}")


def choose_rank(singular_values: np.ndarray, total_energy: float, rank: int | None, energy: float | None) -> int:
    """The smallest rank that keeps ``energy`` of ``total_energy`` (= ‖Δ‖_F²), capped at ``rank``."""
    cap = len(singular_values) if rank is None else min(rank, len(singular_values))
    if energy is None or total_energy <= 0:
        return cap
    kept = np.cumsum(singular_values.astype(np.float64) ** 2)
    # a relative slack, so that energy = 1.0 stops at numerical full rank rather than never
    needed = int(np.searchsorted(kept, energy * total_energy * (1 - 1e-6))) + 1
    return max(1, min(needed, cap))


def randomized_svd(m: np.ndarray, k: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leading ``k`` singular triplets of ``m`` (float32): U (rows, k), S (k,), Vt (k, cols)."""
    rng = np.random.default_rng(seed)
    width = min(k + OVERSAMPLE, *m.shape)
    q, _ = np.linalg.qr(m @ rng.standard_normal((m.shape[1], width), dtype=np.float32))
    for _ in range(POWER_ITERATIONS):  # subspace iteration, re-orthonormalized against float32 round-off
        z, _ = np.linalg.qr(m.T @ q)
        q, _ = np.linalg.qr(m @ z)
    u_small, s, vt = np.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ u_small)[:, :k], s[:k], vt[:k]


def factor_matrix(
    delta: np.ndarray, rank: int | None, energy: float | None, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, float]:
    """Truncated SVD of one 2-D Δ: (A (r, n_in), B (n_out, r), squared Frobenius error ‖Δ − BA‖²)."""
    m = np.ascontiguousarray(delta, dtype=np.float32)
    total = float(np.linalg.norm(m)) ** 2
    small = min(m.shape)
    if rank is not None and rank + OVERSAMPLE <= RANDOMIZED_MAX_SHARE * small:
        u, s, vt = randomized_svd(m, rank, seed=seed)
    else:  # energy alone needs the whole spectrum; a large rank is as cheap exactly
        u, s, vt = np.linalg.svd(m, full_matrices=False)
    r = choose_rank(s, total, rank, energy)
    root = np.sqrt(s[:r]).astype(np.float32)
    b = u[:, :r] * root
    a = root[:, None] * vt[:r]
    err2 = float(np.linalg.norm(m - b @ a)) ** 2  # measured, not ‖Δ‖² − Σσ², which cancels near full rank
    return np.ascontiguousarray(a), np.ascontiguousarray(b), err2


def factor(
    delta: np.ndarray, rank: int | None, energy: float | None, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, float]:
    """Truncated SVD of a matrix, or of each slice of a stack of matrices (one shared rank).

    Returns (A (..., r, n_in), B (..., n_out, r), squared Frobenius error). For a stack the rank is
    the largest any slice needs; slices that need fewer are padded with exact further components.
    """
    if delta.ndim == 2:
        return factor_matrix(delta, rank, energy, seed=seed)
    flat = delta.reshape(-1, *delta.shape[-2:])
    if energy is not None:  # the shared rank is the largest any slice needs, then every slice is cut there
        rank = max(factor_matrix(m, rank, energy, seed=seed)[0].shape[0] for m in flat)
    parts = [factor_matrix(m, rank, None, seed=seed) for m in flat]
    a = np.stack([p[0] for p in parts]).reshape(*delta.shape[:-2], -1, delta.shape[-1])
    b = np.stack([p[1] for p in parts]).reshape(*delta.shape[:-1], -1)
    return a, b, sum(p[2] for p in parts)


def lowrank_factors(
    deltas: Iterable[tuple[str, np.ndarray]],
    report: LowRankReport,
    dtype: str,
    base_tensor: Callable[[str], np.ndarray] | None = None,
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Turn a stream of full-form deltas into low-rank pairs, recording ranks, errors and dropped tensors.

    The stream must name every tensor of the model (unchanged ones with a zero delta), as the converter
    does: the token embedding's pair is held back to the end and dropped when there is no
    ``output.weight``, because llama.cpp then reuses ``token_embd.weight`` as the output matrix and would
    apply the embedding's (flipped) pair there too, which aborts it.
    """
    total = err = dropped = 0.0
    seen: set[str] = set()
    held: tuple[str, np.ndarray, np.ndarray, float, float] | None = None

    def drop(name: str, energy: float) -> None:
        nonlocal dropped
        dropped += energy
        report.dropped_norm[name] = math.sqrt(energy)
        rel = float("nan")
        if base_tensor is not None:
            base_norm = float(np.linalg.norm(np.asarray(base_tensor(name), dtype=np.float64)))
            rel = math.sqrt(energy) / base_norm if base_norm else float("inf")
        report.dropped[name] = rel

    def keep(name: str, a: np.ndarray, b: np.ndarray, err2: float, energy: float) -> None:
        nonlocal err
        err += err2
        report.ranks[name] = a.shape[-2]
        report.tensor_rel_error[name] = math.sqrt(err2 / energy)
        report.lowrank_bytes += storage_nbytes(dtype, a.shape) + storage_nbytes(dtype, b.shape)

    for i, (name, delta) in enumerate(deltas):
        seen.add(name)
        delta = np.asarray(delta, dtype=np.float32)
        if not np.all(np.isfinite(delta)):
            raise FormatError(f"delta for {name} has NaN or infinite values; check both checkpoints")
        energy = float(np.linalg.norm(delta)) ** 2
        if energy == 0.0:
            continue
        total += energy
        report.full_bytes += storage_nbytes(dtype, delta.shape)
        if delta.ndim < 2 or name.endswith(".bias"):
            drop(name, energy)
            continue
        a, b, err2 = factor(delta, report.rank, report.energy, seed=i)
        if is_embedding(name) and delta.ndim == 2:
            held = (name, a, b, err2, energy)
            continue
        keep(name, a, b, err2, energy)
        yield name, a, b
    if held is not None:
        name, a, b, err2, energy = held
        if OUTPUT_TENSOR in seen:
            keep(name, a, b, err2, energy)
            yield name, a, b
        else:  # tied embeddings
            log.warning("%s is tied to the output, which a llama.cpp LoRA cannot change: dropped", name)
            drop(name, energy)
    matrices = total - dropped
    report.rel_error = math.sqrt(err / matrices) if matrices else 0.0
    report.dropped_energy = dropped / total if total else 0.0


def write_lowrank(
    out: str | os.PathLike[str],
    architecture: str,
    deltas: Iterable[tuple[str, np.ndarray]],
    info: AVInfo | Callable[[], AVInfo],
    *,
    rank: int | None = None,
    energy: float | None = None,
    dtype: str = "f32",
    base_tensor: Callable[[str], np.ndarray] | None = None,
) -> LowRankReport:
    """Write the low-rank form of the full-form ``deltas`` stream to ``out``; return what it kept and left out.

    ``base_tensor(name)``, if given, returns a base tensor in GGUF layout; it is called only for the
    tensors that cannot be low-rank, to measure their relative change ``‖Δ‖_F / ‖W_base‖_F``.
    ``adapter.lora.alpha`` is the rank cap (1.0 for an energy threshold alone); either way llama.cpp's
    scale for the adapter is λ itself.
    """
    check_options(rank, energy)
    report = LowRankReport(Path(out), rank, energy)

    def stats() -> LoraStats:
        return LoraStats(
            rank=rank or 0,
            energy=energy or 0.0,
            rel_error=report.rel_error,
            dropped=tuple(report.dropped),
            dropped_norm=tuple(report.dropped_norm.values()),
            dropped_rel_change=tuple(report.dropped.values()),
            dropped_energy=report.dropped_energy,
        )

    alpha = float(rank) if rank is not None else 1.0
    write_lowrank_av(
        out, architecture, lowrank_factors(deltas, report, dtype, base_tensor), info, stats, alpha=alpha, dtype=dtype
    )
    return report
