"""What a merge did (:class:`MergeReport`) and every warning it emits, decided in one place.

A file merge (``merge.py``) and a direct load (``direct.py``) fill a :class:`MergeReport` while they
write tensors, then call :func:`diagnose`: it words the plan's type fallbacks (``policy.TypeNote``: a
missing importance matrix, rows that do not fit a type, types with no grid rounding), the kept-share
warning (:func:`kept_warning`), and the fingerprint check (does the base hold the weights each vector was
made from), logs them and adds the warnings to ``report.warnings``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGMLQuantizationType as QT

from .blockcodec import GRID_TYPES
from .identity import GENERATED_TENSORS, Fingerprint, check_fingerprint
from .plan import MergePlan
from .policy import DEFAULT_POLICY, FLOAT_TYPES, HIFI_KEEP, PolicyKind, TypeNote, TypeNoteKind, parse_requant
from .tensormerge import Kept

log = logging.getLogger(__name__)

# a merge warns when a touched tensor keeps less than this share of its requested change (weight space)
KEPT_SHARE_WARN = 0.5
# the policies whose warning also points to hifi (hifi itself already writes the larger file)
_HIFI_HELPS = frozenset({PolicyKind.SAME, PolicyKind.GRID, PolicyKind.CALIBRATED, PolicyKind.DITHER})


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


def note_text(note: TypeNote, policy: str) -> str:
    """The warning line of a type fallback of the plan, under the policy named ``policy``."""
    if note.kind is TypeNoteKind.NEEDS_IMATRIX:
        return f"{note.asked.name} needs an importance matrix (--imatrix); touched tensors became {note.written.name}"
    if note.kind is TypeNoteKind.ROW_SIZE:
        return f"{note.n_per_row}-element rows cannot be {note.asked.name}; they were written as {note.written.name}"
    return (
        f"{note.asked.name} has no grid rounding (round-to-nearest keeps a few percent of a small "
        f"change there): --requant {policy} wrote its touched tensors as {note.written.name}; "
        "--requant same keeps the type and erases the knob"
    )


def kept_warning(report: MergeReport) -> str | None:
    """The one line that says where a merge kept less than :data:`KEPT_SHARE_WARN` of the change, if it did.

    It never advises the policy that erased the change (``report.policy``).
    """
    low = {n: k.share for n, k in report.kept.items() if k.ref > 0 and k.share < KEPT_SHARE_WARN}
    if not low:
        return None
    types = sorted({report.touched[n][1].name for n in low})
    bases = {report.touched[n][0] for n in low}
    kind = parse_requant(report.policy).kind
    if kind is not PolicyKind.UNBIASED:
        better = "--requant unbiased keeps it at about the same size"
        if kind in _HIFI_HELPS:
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


def float_fingerprint(plan: MergePlan) -> Fingerprint | None:
    """An empty fingerprint to fill tensor by tensor where the base is all float (else None: not needed)."""
    float_base = all(t.tensor_type in FLOAT_TYPES for t in plan.model.tensors if t.name not in GENERATED_TENSORS)
    return Fingerprint() if float_base else None


def diagnose(plan: MergePlan, report: MergeReport, fingerprint: Fingerprint | None) -> None:
    """Log a merge's diagnostics and add them to ``report.warnings``: type fallbacks, the kept share, and
    whether the base holds the weights each vector was made from. A file merge and a direct load share it.

    ``fingerprint`` is the base's tensor fingerprint computed while its tensors were read (float bases),
    or None (``identity.check_fingerprint`` then compares what the base's storage types allow).
    """
    for line in sorted(note_text(note, plan.policy.name) for note in plan.notes):
        log.warning(line)
        report.warnings.append(line)
    if report.refreshed_blocks:
        log.info("%d blocks left the base's grid and were quantized afresh", report.refreshed_blocks)
    if report.kept:
        log.info(
            "kept %.3f of the requested change (weight space; worst tensor %.3f)",
            report.kept_share,
            report.min_kept_share,
        )
    msg = kept_warning(report)
    if msg is not None:
        log.warning(msg)
        report.warnings.append(msg)
    # Transfer across fine-tuning stages: same signature (checked by MergePlan), other weights -> a warning.
    # What can be compared depends on the base's storage types (identity.check_fingerprint).
    for av, _ in plan.vectors:
        check = check_fingerprint(av.info.base_fingerprint, plan.model, fingerprint)
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
