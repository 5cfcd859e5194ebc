"""The merge plan: what each tensor of the base becomes, decided before any tensor is written.

:class:`MergePlan` opens the base (:class:`GGUFModel`), takes the vectors as a :class:`VectorMix` (opened
and checked once), checks them against the base, and makes one :class:`TensorJob` per touched tensor: its
type under the policy (``policy.target_type``), and for the grid policies whether the base's own grid is
fine enough for the change (hifi) or costs more noise than the budget (unbiased: a finer grid made from the
tensor's own values). ``merge.py`` streams the plan into a file; ``direct.py`` uploads it into llama.cpp.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

from . import pages
from .avfile import AlignmentVector
from .blockcodec import GRID_TYPES
from .errors import CompatibilityError, InputError
from .ggufread import GGUFModel, ModelTensor
from .imatrix import Imatrix, load_imatrix
from .mix import VectorMix, Vectors
from .policy import (
    DEFAULT_POLICY,
    FLOAT_TYPES,
    HIFI,
    HIFI_KEEP,
    HIFI_MIN_COS,
    HIFI_MIN_KEPT,
    NO_GRID_TYPES,
    UNBIASED_BUDGET,
    PolicyKind,
    TypeNote,
    TypeNoteKind,
    parse_requant,
    target_type,
)
from .requant import dither_noise, nearest_keeps
from .tensormerge import TensorJob, shift_source

RELEASE_EVERY = 64 << 20  # bytes streamed (or sampled) between two drops of the inputs' resident pages


def _coarse_grid(base_type: QT, qtype: QT) -> bool:
    """Whether a tensor stays on a grid coarser than 8 bits (one of ours: :data:`blockcodec.GRID_TYPES`)."""
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

    ``vectors`` is the mapping users pass (AV path or object -> λ) or a :class:`VectorMix` (used as it is).
    Construction validates everything (vectors, compatibility, imatrix, full-precision base).
    """

    def __init__(
        self,
        base: str | os.PathLike[str],
        vectors: Vectors | VectorMix,
        *,
        requant: str = DEFAULT_POLICY,
        imatrix: str | os.PathLike[str] | Imatrix | None = None,
        full_base: str | os.PathLike[str] | None = None,
        threads: int | None = None,
    ):
        self.base = Path(base)
        self.policy = parse_requant(requant)
        self.vectors = VectorMix.open(vectors)
        self.model = GGUFModel(self.base, "base model")
        arch = self.model.field("general.architecture")
        if not arch:
            raise CompatibilityError(f"base model {self.base} has no general.architecture; is it a model GGUF?")
        self.arch = str(arch)
        self.vectors.check_compatible(self.model)
        imat = load_imatrix(imatrix) if imatrix is not None and not isinstance(imatrix, Imatrix) else imatrix
        full = _open_full_base(full_base, self.model) if full_base is not None else None
        full_tensors = {t.name: t for t in full.tensors} if full is not None else {}
        contributions: dict[str, list[tuple[AlignmentVector, float]]] = {}
        for av, lam in self.vectors:
            if lam == 0.0:
                continue
            for name in av.names:
                contributions.setdefault(name, []).append((av, lam))
        self.notes: set[TypeNote] = set()  # why types differ from what the policy asked (diagnose.py words them)
        self.jobs: dict[str, TensorJob] = {}
        self.inputs = [
            *self.model.paths,
            *(av.path for av, _ in self.vectors),
            *(full.paths if full is not None else []),
        ]
        sampled = 0  # bytes of the base the choices below have paged in (their vectors' pages come with them)
        for t in self.model.tensors:
            parts = contributions.get(t.name)
            if not parts:
                continue
            if sampled >= RELEASE_EVERY:  # the planning pass samples every touched tensor: keep its pages bounded
                pages.release(self.inputs)
                sampled = 0
            sampled += t.n_bytes
            imat_rows = imat.for_tensor(t.name, t.shape) if imat is not None and len(t.shape) > 1 else None
            self.jobs[t.name] = self._job(t, parts, imat_rows, full_tensors.get(t.name), threads)
        pages.release(self.inputs)

    def _job(
        self,
        t: ModelTensor,
        parts: list[tuple[AlignmentVector, float]],
        imat_rows: np.ndarray | None,
        full: ModelTensor | None,
        threads: int | None,
    ) -> TensorJob:
        """The job of one touched tensor: its type, and whether it is rounded on a finer grid than the base's."""
        unbiased = self.policy.kind is PolicyKind.UNBIASED
        # unbiased on a type without a grid rounding (codebooks, ternary): hifi's finer type, dithered there
        no_grid = unbiased and len(t.shape) > 1 and t.tensor_type in NO_GRID_TYPES
        qtype = target_type(t.tensor_type, t.shape, HIFI if no_grid else self.policy, imat_rows is not None, self.notes)
        if qtype in FLOAT_TYPES:
            imat_rows = None
        job = TensorJob(t, parts, qtype, self.policy, imat_rows, full, threads)
        if no_grid and qtype != t.tensor_type:
            self.notes.add(TypeNote(TypeNoteKind.NO_GRID, t.tensor_type, qtype))
            job = replace(job, regrid=qtype in GRID_TYPES)
        if self.policy.kind is PolicyKind.HIFI and qtype != t.tensor_type and t.tensor_type in GRID_TYPES:
            # the base type is enough where its grid already keeps this change (large Δ, fine types)
            kept, cos = nearest_keeps(t.raw(), t.tensor_type, shift_source(job))
            if kept >= HIFI_MIN_KEPT and cos >= HIFI_MIN_COS:
                job = replace(job, qtype=t.tensor_type)
        elif unbiased and _coarse_grid(t.tensor_type, qtype):
            # where dithering on the base's own grid costs more than the budget, the tensor moves to a finer
            # grid made from its own values and is dithered there: Q8_0's steps are 8-16 times smaller than
            # 4- and 5-bit types', so the same unbiased rounding adds 1/60-1/250 of the noise
            budget = UNBIASED_BUDGET if self.policy.noise_budget is None else self.policy.noise_budget
            if dither_noise(t.raw(), t.tensor_type, shift_source(job)) > budget:
                finer = target_type(t.tensor_type, t.shape, HIFI, False, self.notes)
                job = replace(job, qtype=finer, regrid=finer in GRID_TYPES)
        return job

    def qtype(self, name: str) -> QT:
        """The type tensor ``name`` is written as."""
        job = self.jobs.get(name)
        return job.qtype if job is not None else self.model.tensor(name).tensor_type
