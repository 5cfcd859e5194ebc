"""The vectors of a merge as one value: alignment vectors with their λ, opened and checked once.

Users pass a mapping of AV paths (or :class:`AlignmentVector` objects) to λ (:data:`Vectors`). Every entry
point (``load``, ``cached_merge``, ``merge``, ``MergePlan``, ``load_direct``) turns it into a
:class:`VectorMix` once, with :meth:`VectorMix.open`, and hands the mix on: a mix given where a mapping
is accepted is used as it is, so no file is opened or checked twice on the way from ``load()`` to the
merged file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from .avfile import AlignmentVector
from .errors import CompatibilityError, InputError
from .ggufread import GGUFModel

VectorRef = Union[str, os.PathLike[str], AlignmentVector]
Vectors = Mapping[VectorRef, float]
LAMBDA_MAX = 1e30  # float32 arithmetic: λ·Δ must stay far from its 3.4e38 limit


@dataclass(frozen=True)
class VectorMix:
    """Opened and validated vectors with their λ, in the order the caller gave them (or :meth:`canonical`'s).

    Iterating gives ``(AlignmentVector, λ)`` pairs. Build it with :meth:`open`; it is immutable, and the
    vectors it holds are read lazily (one tensor at a time) by whoever merges it.
    """

    items: tuple[tuple[AlignmentVector, float], ...]

    @classmethod
    def open(cls, vectors: Vectors | VectorMix) -> VectorMix:
        """Open and validate every vector and its λ; a :class:`VectorMix` is returned as it is."""
        if isinstance(vectors, VectorMix):
            return vectors
        if not isinstance(vectors, Mapping):
            raise InputError(
                "vectors must map AV paths (or AlignmentVector objects) to λ, e.g. {'medical.avec.gguf': 0.5}"
            )
        out: list[tuple[AlignmentVector, float]] = []
        for ref, lam in vectors.items():
            av = ref if isinstance(ref, AlignmentVector) else AlignmentVector(ref)
            if isinstance(lam, bool) or not isinstance(lam, (int, float, np.floating)) or not math.isfinite(lam):
                raise InputError(f"λ for {av.path} must be a finite number, got {lam!r}")
            if abs(lam) > LAMBDA_MAX:
                raise InputError(
                    f"λ for {av.path} is {lam!r}; the merge computes in float32, keep |λ| ≤ {LAMBDA_MAX:g}"
                )
            out.append((av, float(lam)))
        return cls(tuple(out))

    def __iter__(self) -> Iterator[tuple[AlignmentVector, float]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def is_identity(self) -> bool:
        """Whether every λ is 0: the mix is the base itself."""
        return all(lam == 0.0 for _, lam in self.items)

    def canonical(self, key: Callable[[AlignmentVector, float], tuple[Any, ...]]) -> VectorMix:
        """The mix as a cache keys and merges it: λ = 0 left out, the rest sorted by ``key(av, λ)``.

        float32 sums depend on their order and the merged file records its vectors, so the merge of a
        cache key must not depend on how the caller listed the mix (``cache.MergeCache.canonical``).
        """
        kept = [(av, lam) for av, lam in self.items if lam != 0.0]
        return VectorMix(tuple(sorted(kept, key=lambda p: key(*p))))

    def check_compatible(self, model: GGUFModel) -> None:
        """Architecture, signature, tensor names and shapes of every vector against the base ``model``."""
        check_compatible(model, model.path, self.items)


def open_vectors(vectors: Vectors | VectorMix) -> VectorMix:
    """Open and validate every vector and its λ (:meth:`VectorMix.open`)."""
    return VectorMix.open(vectors)


def check_compatible(model: GGUFModel, base: Path, vectors: Iterable[tuple[AlignmentVector, float]]) -> None:
    """Architecture, signature, tensor names and shapes must match before any work is done.

    ``vectors`` holds ``(AlignmentVector, λ)`` pairs; ``base`` names the model in errors.
    """
    arch, shapes, signature = model.field("general.architecture"), model.shapes(), model.signature()
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
