"""The vectors of a merge: references to alignment vectors with their λ, opened and checked against a base."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import numpy as np
from gguf import GGUFReader

from .avfile import AlignmentVector
from .errors import CompatibilityError, InputError
from .gguffile import field as gguf_field
from .gguffile import gguf_signature, tensor_shape
from .ggufread import GGUFModel

VectorRef = Union[str, os.PathLike[str], AlignmentVector]
Vectors = Mapping[VectorRef, float]
LAMBDA_MAX = 1e30  # float32 arithmetic: λ·Δ must stay far from its 3.4e38 limit


def open_vectors(vectors: Vectors) -> list[tuple[AlignmentVector, float]]:
    """Open and validate every vector and its λ."""
    if not isinstance(vectors, Mapping):
        raise InputError("vectors must map AV paths (or AlignmentVector objects) to λ, e.g. {'medical.avec.gguf': 0.5}")
    out: list[tuple[AlignmentVector, float]] = []
    for ref, lam in vectors.items():
        av = ref if isinstance(ref, AlignmentVector) else AlignmentVector(ref)
        if isinstance(lam, bool) or not isinstance(lam, (int, float, np.floating)) or not math.isfinite(lam):
            raise InputError(f"λ for {av.path} must be a finite number, got {lam!r}")
        if abs(lam) > LAMBDA_MAX:
            raise InputError(f"λ for {av.path} is {lam!r}; the merge computes in float32, keep |λ| ≤ {LAMBDA_MAX:g}")
        out.append((av, float(lam)))
    return out


def check_compatible(reader: GGUFReader | GGUFModel, base: Path, vectors: list[tuple[AlignmentVector, float]]) -> None:
    """Architecture, signature, tensor names and shapes must match before any work is done."""
    if isinstance(reader, GGUFModel):
        arch, shapes, signature = reader.field("general.architecture"), reader.shapes(), reader.signature()
    else:
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
