"""Requant policies as typed values: every accepted spelling maps to one kind and one rounding.

Oracles: the table of what each policy does (README, 'Requantization and the knob'), and the grid
roundings ``requant.requantize_on_grid`` accepts, which must be exactly the grid members of ``Rounding``.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from alignvec_gguf import requant
from alignvec_gguf.errors import InputError
from alignvec_gguf.policy import (
    DEFAULT_POLICY,
    HIFI,
    POLICIES,
    UNBIASED_BUDGET,
    PolicyKind,
    TypeNote,
    TypeNoteKind,
    parse_requant,
    target_type,
)
from alignvec_gguf.requant import ROUNDINGS, Rounding


@pytest.mark.parametrize(
    ("spec", "kind", "rounding", "budget", "target"),
    [
        ("unbiased", PolicyKind.UNBIASED, Rounding.DITHER, UNBIASED_BUDGET, None),
        ("UNBIASED:0.2", PolicyKind.UNBIASED, Rounding.DITHER, 0.2, None),
        ("calibrated", PolicyKind.CALIBRATED, Rounding.CALIBRATED, None, None),
        ("calibrated:inf", PolicyKind.CALIBRATED, Rounding.CALIBRATED, float("inf"), None),
        ("same", PolicyKind.SAME, Rounding.GGML, None, None),
        ("grid", PolicyKind.GRID, Rounding.NEAREST, None, None),
        ("dither", PolicyKind.DITHER, Rounding.DITHER, None, None),
        ("hifi", PolicyKind.HIFI, Rounding.CALIBRATED, None, None),
        ("q8_0", PolicyKind.TYPE, Rounding.GGML, None, QT.Q8_0),
        ("F16", PolicyKind.TYPE, Rounding.GGML, None, QT.F16),
    ],
)
def test_each_spelling_is_one_kind_and_rounding(spec, kind, rounding, budget, target):
    p = parse_requant(spec)
    assert (p.name, p.kind, p.rounding, p.noise_budget, p.target) == (spec.lower(), kind, rounding, budget, target)


def test_every_named_policy_parses_to_its_own_kind_and_the_default_is_one():
    kinds = {name: parse_requant(name).kind for name in POLICIES}
    assert {k.value for k in kinds.values()} == set(POLICIES) and len(set(kinds.values())) == len(POLICIES)
    assert DEFAULT_POLICY in POLICIES


@pytest.mark.parametrize("spec", ["same:1", "grid:0.1", "hifi:2", "q4_0:1", "unbiased:x", "calibrated:-1", "bogus"])
def test_a_budget_only_where_a_policy_takes_one(spec):
    with pytest.raises(InputError, match=r"^(unknown requant policy|requant ')"):
        parse_requant(spec)


def test_the_grid_roundings_are_the_enum_less_ggml_and_the_only_ones_requantize_accepts():
    assert set(ROUNDINGS) == set(Rounding) - {Rounding.GGML}
    raw = np.zeros(34, dtype=np.uint8)  # one Q8_0 block: scale 0, codes 0
    for r in ROUNDINGS:
        out, _ = requant.requantize_on_grid(raw, QT.Q8_0, np.zeros(32, np.float32), r.value)
        assert out.tobytes() == raw.tobytes()  # a block whose step is 0 cannot move, whatever the rounding
    with pytest.raises(ValueError, match="rounding must be one of nearest, dither, calibrated"):
        requant.requantize_on_grid(raw, QT.Q8_0, np.zeros(32, np.float32), Rounding.GGML)


def test_type_notes_say_why_a_type_differs_from_what_was_asked():
    notes: set[TypeNote] = set()
    assert target_type(QT.Q4_K, (8, 256), parse_requant("iq2_xxs"), False, notes) == QT.Q2_K
    assert notes == {TypeNote(TypeNoteKind.NEEDS_IMATRIX, QT.IQ2_XXS, QT.Q2_K)}
    notes.clear()
    assert target_type(QT.F32, (8, 48), parse_requant("q4_k"), False, notes) == QT.F32  # 48: not a 256 multiple
    assert notes == {TypeNote(TypeNoteKind.ROW_SIZE, QT.Q4_K, QT.F32, 48)}
    notes.clear()
    assert target_type(QT.Q4_K, (8, 256), HIFI, False, notes) == QT.Q8_0 and not notes
    assert target_type(QT.Q4_K, (8, 256), parse_requant("same"), False, notes) == QT.Q4_K and not notes
