"""Requantization policies: how the touched tensors of a merge are written (their type and their rounding).

A policy is a name of :data:`POLICIES` (``unbiased``, ``calibrated[:B]``, ``same``, ``grid``, ``dither``,
``hifi``, ``unbiased:B``) or a ggml type name (``q8_0``, ``f16``...); :func:`parse_requant` turns it into a
:class:`Policy`, and :func:`target_type` gives the type a touched tensor is written as under it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as QT

from . import ggml
from .errors import InputError

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
# Coarse types with no grid rounding here (requant.GRID_TYPES): codebook lattices (IQ1-IQ3), ternary and 1-bit
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


@dataclass(frozen=True)
class Policy:
    """How touched tensors are written: their type, and how values are rounded onto it."""

    name: str
    target: QT | None  # a fixed type for touched matrices; None: decided per tensor from the base type
    rounding: str = "ggml"  # "ggml": ggml's quantizer; else a rounding on the base's own grid (requant.py)
    noise_budget: float | None = None  # calibrated rounding: see requant.calibrate_threshold

    def type_for(self, base_type: QT) -> QT:
        if self.target is not None:
            return self.target
        if self.name == "hifi" and base_type not in HIFI_KEEP:
            return QT.Q8_0
        return base_type


def parse_requant(policy: str) -> Policy:
    """A policy name (:data:`POLICIES`) or a ggml type name (``q8_0``, ``f16``, ``q6_k``...) -> :class:`Policy`."""
    key = policy.lower()
    if key == "same":
        return Policy(key, None)
    if key == "hifi":  # Q8_0 where the base is coarser; where the base type stays, calibrated rounding on its grid
        return Policy(key, None, "calibrated")
    if key == "grid":
        return Policy(key, None, "nearest")
    if key in ("dither", "calibrated"):
        return Policy(key, None, key)
    if key == "unbiased":
        return Policy(key, None, "dither", UNBIASED_BUDGET)
    if key.startswith(("calibrated:", "unbiased:")):
        family, _, text = key.partition(":")
        try:
            budget = float(text)
        except ValueError:
            budget = -1.0
        if not budget >= 0.0:  # NaN fails too; "inf" keeps the whole projection whatever it costs
            raise InputError(f"requant {policy!r}: the noise budget after '{family}:' must be a number ≥ 0, e.g. 0.1")
        return Policy(key, None, "calibrated" if family == "calibrated" else "dither", budget)
    choices = sorted(t.name.lower() for t in ggml.QUANTIZABLE if t not in IMATRIX_FALLBACK)
    try:
        qtype: QT | None = QT[policy.upper()]
    except KeyError:
        qtype = None
    if qtype is None or qtype not in ggml.QUANTIZABLE:
        raise InputError(
            f"unknown requant policy {policy!r}; use one of {', '.join(POLICIES)} or a type: {', '.join(choices)}"
        )
    return Policy(key, qtype)


def target_type(
    base_type: QT, shape: tuple[int, ...], policy: Policy, has_imatrix: bool = False, notes: set[str] | None = None
) -> QT:
    """The type a touched tensor is written as; why it differs from what was asked goes into ``notes``."""
    notes = notes if notes is not None else set()
    n_per_row = shape[-1]
    if len(shape) <= 1 or base_type in FLOAT_TYPES and policy.target is None:
        return base_type if base_type in ggml.QUANTIZABLE else QT.F32
    wanted = policy.type_for(base_type)
    if wanted in IMATRIX_FALLBACK and not has_imatrix:
        fallback = IMATRIX_FALLBACK[wanted]
        notes.add(f"{wanted.name} needs an importance matrix (--imatrix); touched tensors became {fallback.name}")
        wanted = fallback
    if ggml.can_quantize(wanted, n_per_row, has_imatrix):
        return wanted
    for fallback in (base_type, UNQUANTIZABLE_FALLBACK, QT.F16):
        if ggml.can_quantize(fallback, n_per_row):
            notes.add(f"{n_per_row}-element rows cannot be {wanted.name}; they were written as {fallback.name}")
            return fallback
    return QT.F32
