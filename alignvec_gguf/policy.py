"""Requantization policies: how the touched tensors of a merge are written (their type and their rounding).

A policy is a name of :data:`POLICIES` (``unbiased``, ``calibrated[:B]``, ``same``, ``grid``, ``dither``,
``hifi``, ``unbiased:B``) or a ggml type name (``q8_0``, ``f16``...); :func:`parse_requant` turns it into a
:class:`Policy`, and :func:`target_type` gives the type a touched tensor is written as under it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from gguf import GGMLQuantizationType as QT

from . import ggml
from .errors import InputError
from .requant import Rounding

# The policies besides plain ggml type names, with what they do (shown by --help and in errors).
POLICIES: dict[str, str] = {
    "unbiased": "about the same size: unbiased random rounding on the base's scales where it adds at most a noise "
    "budget, else (and always on types with no grid rounding: IQ1-IQ3, TQ, Q1_0) on a Q8_0 grid made from the "
    "tensor's own values (unbiased:B sets the budget, default 0.05)",
    "calibrated": "same size: the base's scales, rounding threshold per tensor keeps the knob within a noise budget "
    "(calibrated:B sets the budget, default 0.1); measured to overshoot λ on real fine-tuning vectors",
    "same": "every tensor keeps the base's type; ggml requantizes (round to nearest): small deltas are erased",
    "grid": "like same on the base's own scales: same fidelity, several times faster on K-quants",
    "dither": "same size: the base's scales, unbiased random rounding everywhere",
    "hifi": "touched tensors coarser than 8 bits become Q8_0 unless their own grid keeps the change (larger file)",
}
# chosen from benchmarks/fidelity.py --model smollm2 (a real model and vector): README, "Requantization and the knob"
DEFAULT_POLICY = "unbiased"

# Types that need an importance matrix fall back, without one, to the nearest type that does not.
# ggml itself insists for IQ2_XXS, IQ2_XS and IQ1_S; llama.cpp's quantizer refuses the other three too
# ("the result will be garbage", src/llama-quant.cpp).
IMATRIX_FALLBACK: dict[QT, QT] = {
    QT.IQ2_XXS: QT.Q2_K,
    QT.IQ2_XS: QT.Q2_K,
    QT.IQ2_S: QT.Q2_K,
    QT.IQ1_S: QT.Q2_K,
    QT.IQ1_M: QT.Q2_K,
    QT.IQ3_XXS: QT.Q3_K,
}
# A base type ggml cannot quantize at all is written as Q8_0 (or F16 where rows do not fit Q8_0).
UNQUANTIZABLE_FALLBACK = QT.Q8_0
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
HIFI_KEEP = frozenset({QT.Q8_0, QT.F16, QT.BF16, QT.F32})
# Coarse types with no grid rounding here (blockcodec.GRID_TYPES): codebook lattices (IQ1-IQ3), ternary and 1-bit
# types. ggml's round-to-nearest keeps 0.3-19% of a change of 2-10% of mean |w| on them (README, 'Quant types
# and the knob'); unbiased writes their touched tensors at Q8_0 instead, dithered on a grid made from their values.
NO_GRID_TYPES = frozenset(
    {QT.IQ3_XXS, QT.IQ3_S, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ1_S, QT.IQ1_M, QT.TQ1_0, QT.TQ2_0, QT.Q1_0}
)
# hifi keeps a tensor's base type where round-to-nearest on its grid keeps this much of Δ (weight space)
HIFI_MIN_KEPT = 0.95
HIFI_MIN_COS = 0.95
# unbiased: a coarse tensor stays on its grid while dithering adds at most this share of its own rounding noise
UNBIASED_BUDGET = 0.05


class PolicyKind(Enum):
    """The family of a policy: one of :data:`POLICIES`, or a fixed ggml type (``TYPE``)."""

    UNBIASED = "unbiased"
    CALIBRATED = "calibrated"
    SAME = "same"
    GRID = "grid"
    DITHER = "dither"
    HIFI = "hifi"
    TYPE = "type"


@dataclass(frozen=True)
class Policy:
    """How touched tensors are written: their type, and how values are rounded onto it."""

    name: str  # as given, lower case ("calibrated:0.2", "q8_0"): what the merged file and the cache key record
    kind: PolicyKind
    target: QT | None = None  # a fixed type for touched matrices (kind TYPE); None: decided per tensor
    rounding: Rounding = Rounding.GGML  # GGML: ggml's quantizer; else a rounding on the base's own grid
    noise_budget: float | None = None  # calibrated and unbiased rounding: see requant.calibrate_threshold

    def type_for(self, base_type: QT) -> QT:
        """The type asked for a touched matrix of ``base_type`` (before fallbacks: :func:`target_type`)."""
        if self.target is not None:
            return self.target
        if self.kind is PolicyKind.HIFI and base_type not in HIFI_KEEP:
            return QT.Q8_0
        return base_type


# policy name -> (kind, rounding); the budgets of calibrated:B and unbiased:B are parsed apart
_NAMED: dict[str, tuple[PolicyKind, Rounding]] = {
    "same": (PolicyKind.SAME, Rounding.GGML),
    # Q8_0 where the base is coarser; where the base type stays, calibrated rounding on its grid
    "hifi": (PolicyKind.HIFI, Rounding.CALIBRATED),
    "grid": (PolicyKind.GRID, Rounding.NEAREST),
    "dither": (PolicyKind.DITHER, Rounding.DITHER),
    "calibrated": (PolicyKind.CALIBRATED, Rounding.CALIBRATED),
    "unbiased": (PolicyKind.UNBIASED, Rounding.DITHER),
}
# the families that take a noise budget, and the budget each has without one (None: requant.NOISE_BUDGET)
_BUDGETED: dict[PolicyKind, float | None] = {PolicyKind.CALIBRATED: None, PolicyKind.UNBIASED: UNBIASED_BUDGET}


def parse_requant(policy: str) -> Policy:
    """A policy name (:data:`POLICIES`) or a ggml type name (``q8_0``, ``f16``, ``q6_k``...) -> :class:`Policy`."""
    key = policy.lower()
    family, colon, text = key.partition(":")
    if family in _NAMED and (not colon or _NAMED[family][0] in _BUDGETED):
        kind, rounding = _NAMED[family]
        budget = _BUDGETED.get(kind)
        if colon:
            try:
                budget = float(text)
            except ValueError:
                budget = -1.0
            if not budget >= 0.0:  # NaN fails too; "inf" keeps the whole projection whatever it costs
                raise InputError(
                    f"requant {policy!r}: the noise budget after '{family}:' must be a number ≥ 0, e.g. 0.1"
                )
        return Policy(key, kind, None, rounding, budget)
    choices = sorted(t.name.lower() for t in ggml.QUANTIZABLE if t not in IMATRIX_FALLBACK)
    try:
        qtype: QT | None = QT[policy.upper()]
    except KeyError:
        qtype = None
    if qtype is None or qtype not in ggml.QUANTIZABLE:
        raise InputError(
            f"unknown requant policy {policy!r}; use one of {', '.join(POLICIES)} or a type: {', '.join(choices)}"
        )
    return Policy(key, PolicyKind.TYPE, qtype)


class TypeNoteKind(Enum):
    """Why touched tensors are written in another type than their policy asks."""

    NEEDS_IMATRIX = "needs an importance matrix"  # an IQ1/IQ2/IQ3_XXS type without --imatrix
    ROW_SIZE = "rows do not fit the type"  # the row length is not a multiple of the type's block
    NO_GRID = "no grid rounding"  # unbiased on a type with no grid rounding here (NO_GRID_TYPES)


@dataclass(frozen=True)
class TypeNote:
    """One reason a merge wrote touched tensors as ``written`` where ``asked`` was wanted (``diagnose.py``
    words it and logs it, once per merge)."""

    kind: TypeNoteKind
    asked: QT
    written: QT
    n_per_row: int = 0


def target_type(
    base_type: QT, shape: tuple[int, ...], policy: Policy, has_imatrix: bool = False, notes: set[TypeNote] | None = None
) -> QT:
    """The type a touched tensor is written as; why it differs from what was asked goes into ``notes``."""
    notes = notes if notes is not None else set()
    n_per_row = shape[-1]
    if len(shape) <= 1 or base_type in FLOAT_TYPES and policy.target is None:
        return base_type if base_type in ggml.QUANTIZABLE else QT.F32
    wanted = policy.type_for(base_type)
    if wanted in IMATRIX_FALLBACK and not has_imatrix:
        fallback = IMATRIX_FALLBACK[wanted]
        notes.add(TypeNote(TypeNoteKind.NEEDS_IMATRIX, wanted, fallback))
        wanted = fallback
    if ggml.can_quantize(wanted, n_per_row, has_imatrix):
        return wanted
    for fallback in (base_type, UNQUANTIZABLE_FALLBACK, QT.F16):
        if ggml.can_quantize(fallback, n_per_row):
            notes.add(TypeNote(TypeNoteKind.ROW_SIZE, wanted, fallback, n_per_row))
            return fallback
    return QT.F32


# the types hifi asks for, wherever a finer type than the base's is chosen (unbiased's regrid, no-grid types)
HIFI = parse_requant("hifi")
