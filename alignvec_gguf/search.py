"""The multidomain search (arXiv 2410.19206, section on multidomain preference): one λ per domain.

Every point of a grid over (λ_1, ..., λ_n) is merged once (all domain vectors together) and scored on
every domain's held-out questions (:mod:`alignvec_gguf.eval`). Then, for each of the 3^n combinations
of target levels (27 for three domains), the point with the best worst-domain share of its target is
picked; the combination is *reached* when that share is at least ``threshold`` in every domain (0.5 by
default: the target is the majority answer everywhere).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .errors import InputError
from .eval import check_inputs, score_mix, vector_refs
from .evalset import LEVELS, EvalItem, Shares
from .mix import VectorRef
from .policy import DEFAULT_POLICY

DEFAULT_GRID = (-1.0, -0.5, 0.0, 0.5, 1.0)
DEFAULT_THRESHOLD = 0.5


@dataclass
class Point:
    """One grid point: λ per domain and each domain's level shares there."""

    lambdas: dict[str, float]
    shares: dict[str, Shares]


@dataclass
class Combination:
    """One combination of target levels and the best point found for it."""

    targets: dict[str, str]  # domain -> target level
    lambdas: dict[str, float]
    target_shares: dict[str, float]  # domain -> share of its target level at that point
    reached: bool


@dataclass
class SearchResult:
    """Every grid point scored, and the best point for each combination of targets."""

    grid: list[float]
    threshold: float
    domains: list[str]
    points: list[Point] = field(default_factory=list)
    combinations: list[Combination] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def reached(self) -> int:
        """How many combinations reach their targets in every domain."""
        return sum(c.reached for c in self.combinations)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "grid": self.grid,
            "threshold": self.threshold,
            "domains": self.domains,
            "n_points": len(self.points),
            "n_combinations": len(self.combinations),
            "reached": self.reached,
            "seconds": self.seconds,
            "combinations": [
                {
                    "targets": c.targets,
                    "lambdas": c.lambdas,
                    "target_shares": c.target_shares,
                    "reached": c.reached,
                }
                for c in self.combinations
            ],
        }


def best_points(
    points: Sequence[Point], domains: Sequence[str], threshold: float = DEFAULT_THRESHOLD
) -> list[Combination]:
    """For each combination of target levels, the point with the highest worst-domain target share.

    Ties go to the higher mean target share, then to the smaller Σ|λ| (the mildest mix).
    """
    if not points:
        raise InputError("the search grid is empty")
    out = []
    for levels in itertools.product(LEVELS, repeat=len(domains)):
        targets = dict(zip(domains, levels, strict=True))

        def rank(p: Point, targets: dict[str, str] = targets) -> tuple[float, float, float]:
            got = [p.shares[d][targets[d]] for d in domains]
            return (min(got), sum(got) / len(got), -sum(abs(v) for v in p.lambdas.values()))

        best = max(points, key=rank)
        target_shares = {d: best.shares[d][targets[d]] for d in domains}
        out.append(Combination(targets, dict(best.lambdas), target_shares, min(target_shares.values()) >= threshold))
    return out


def search(
    base: str | os.PathLike[str],
    vectors: Mapping[str, str | os.PathLike[str]],
    items: Sequence[EvalItem],
    grid: Sequence[float] = DEFAULT_GRID,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    requant: str = DEFAULT_POLICY,
    n_threads: int | None = None,
    progress: bool = False,
) -> SearchResult:
    """Grid search over one λ per domain (vectors: domain -> AV path) for every combination of targets."""
    import time

    start = time.perf_counter()
    if not 0 < threshold <= 1:
        raise InputError(f"--threshold must be in (0, 1], got {threshold}")
    base, values, groups = check_inputs(base, vectors, items, grid)
    domains = list(vectors)
    result = SearchResult(grid=values, threshold=threshold, domains=domains)
    combos = list(itertools.product(values, repeat=len(domains)))
    ref = vector_refs(vectors)  # each vector opened once for the whole grid
    with tempfile.TemporaryDirectory(prefix="alignvec-search-") as tmp:
        for lams in tqdm(combos, desc="search", unit="mix", disable=not progress, leave=False):
            mix: dict[VectorRef, float] = {ref(d, lam): lam for d, lam in zip(domains, lams, strict=True)}
            got = score_mix(base, mix, groups, Path(tmp), requant=requant, n_threads=n_threads)
            result.points.append(Point(dict(zip(domains, lams, strict=True)), got))
    result.combinations = best_points(result.points, domains, threshold)
    result.seconds = time.perf_counter() - start
    return result
