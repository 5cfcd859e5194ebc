"""Knob fidelity on a Q4_K_M tiny model: the figures ``alignvec fidelity`` reports, and what they show.

Oracles: the float reference (the F32 base + λΔ, llama.cpp's logits), the from-scratch anchor (the
exact merged F32 model quantized at the base's types), and file sizes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from alignvec_gguf import ggml
from alignvec_gguf.blockcodec import grid_values
from alignvec_gguf.cli import main
from alignvec_gguf.fidelity import fidelity, kl_divergence, shift_stats
from alignvec_gguf.plan import MergePlan
from alignvec_gguf.policy import DEFAULT_POLICY
from alignvec_gguf.requant import dither_noise

TOKENS = [1, 5, 17, 42, 99, 200, 7, 3, 150, 33, 64, 250, 1, 300, 12, 8, 77, 123, 45, 6, 90, 210, 11, 2]


@pytest.fixture(scope="module")
def report(llama_pair, quantized_bases):
    return fidelity(
        quantized_bases["Q4_K_M"],
        {llama_pair.av: 0.5},
        policies=["same", "grid", "calibrated", "calibrated:inf", "unbiased", "hifi", "q8_0"],
        full_base=llama_pair.base_gguf,
        tokens=TOKENS,
    )


def test_metrics_are_what_they_say():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 50))
    assert shift_stats(ref, ref) == pytest.approx((1.0, 1.0))
    assert shift_stats(0.5 * ref, ref) == pytest.approx((0.5, 1.0))
    kept, cos = shift_stats(ref + 10 * rng.standard_normal(ref.shape), ref)
    assert cos < 0.3
    assert kl_divergence(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert kl_divergence(ref, ref + rng.standard_normal(ref.shape)) > 0


def test_fidelity_figures_on_q4_k_m(report, capsys):
    with capsys.disabled():
        print(report.table())
    row = {m.label: m for m in report.rows}
    anchor = report.anchor
    assert anchor is not None and report.reference == "full-precision base"
    # same size for the same-size policies, larger for the high-fidelity ones
    for label in ("same", "grid", "calibrated"):
        assert row[label].size_ratio == pytest.approx(1.0, abs=1e-3)
    assert anchor.size_ratio == pytest.approx(1.0, abs=1e-3)
    assert 1.3 < row["q8_0"].size_ratio < 2.0
    assert row["hifi"].size_ratio <= row["q8_0"].size_ratio + 1e-9
    # round to nearest on the base's grid loses part of the knob; calibrated keeps most of it within its noise
    # budget, at about the anchor's KL; without a budget it keeps all of it like the anchor, for more noise
    assert row["same"].shift_kept < 0.8
    assert row["calibrated"].shift_kept > row["same"].shift_kept + 0.2
    assert row["calibrated"].kl < 1.1 * anchor.kl
    whole = row["calibrated:inf"]
    assert abs(whole.shift_kept - anchor.shift_kept) < 0.15
    assert whole.shift_kept > row["calibrated"].shift_kept and whole.kl > row["calibrated"].kl
    # hifi keeps the knob whole and in direction, at about the anchor's KL
    assert row["hifi"].shift_kept > 0.85 and row["hifi"].shift_cos > 0.8
    assert row["hifi"].kl < 1.2 * anchor.kl
    assert all(m.kl > 0 and np.isfinite(m.kl) for m in [*report.rows, anchor])
    # the default: unbiased rounding, here on Q8_0 grids made from the base's values (this Δ is a tenth of a
    # 4-bit step, far above the budget): the whole knob, like hifi, at no larger a file
    default = row[DEFAULT_POLICY]
    assert DEFAULT_POLICY == "unbiased"
    assert 0.85 < default.shift_kept < 1.15 and default.shift_cos > 0.8
    assert default.size_ratio <= row["hifi"].size_ratio + 1e-9
    assert default.kl < 1.2 * anchor.kl


def test_dither_noise_is_the_added_error_of_unbiased_rounding():
    """12·E[f(1 − f)] in units of the base's own rounding noise: 0 for whole steps, 3 for half steps."""
    rng = np.random.default_rng(3)
    raw = ggml.quantize(rng.standard_normal((8, 256)).astype(np.float32), QT.Q4_0)
    codec_step = _q4_0_steps(raw)
    # the steps are what the codec says: value = d·q + offset on ggml's own dequantized grid
    values = grid_values(raw, QT.Q4_0)
    np.testing.assert_allclose(values, ggml.dequantize(raw, QT.Q4_0, values.size), rtol=1e-6, atol=1e-6)
    assert dither_noise(raw, QT.Q4_0, 3.0 * codec_step) == pytest.approx(0.0, abs=1e-4)
    assert dither_noise(raw, QT.Q4_0, 0.5 * codec_step) == pytest.approx(3.0, rel=1e-6)
    small = dither_noise(raw, QT.Q4_0, 0.01 * codec_step)
    assert small == pytest.approx(12 * 0.01 * 0.99, rel=1e-4)


def _q4_0_steps(raw: np.ndarray) -> np.ndarray:
    """Each element's Q4_0 step (its block's scale d), as float32."""
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    return np.repeat(d, 32, axis=1).reshape(-1)


def test_unbiased_moves_only_costly_tensors_to_a_finer_grid(llama_pair, quantized_bases):
    """unbiased:B keeps a coarse tensor on its grid while dithering adds at most B of its noise, else Q8_0."""
    base = quantized_bases["Q4_K_M"]
    tight = MergePlan(base, {llama_pair.av: 0.5}, requant="unbiased:0")
    loose = MergePlan(base, {llama_pair.av: 0.5}, requant="unbiased:inf")
    for name, job in tight.jobs.items():
        base_type = job.tensor.tensor_type
        coarse = base_type in (QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q5_0, QT.Q4_0) and len(job.tensor.shape) > 1
        assert tight.qtype(name) == (QT.Q8_0 if coarse else base_type), name
        assert loose.qtype(name) == base_type, name


def test_fidelity_cli(llama_pair, quantized_bases, capsys):
    args = ["-q", "fidelity", str(quantized_bases["Q8_0"]), "-v", f"{llama_pair.av}=1", "--policies", "same,calibrated"]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    labels = [r["label"] for r in data["rows"]]
    assert labels == ["same", "calibrated"] and data["anchor"] is None
    assert data["reference"].startswith("quantized base")
    same = data["rows"][0]
    assert same["shift_kept"] > 0.9 and same["shift_cos"] > 0.9  # Q8_0 keeps the knob as it is
    rc = main(["fidelity", str(quantized_bases["Q8_0"]), "-v", f"{llama_pair.av}=0"])
    assert rc == 2 and "λ ≠ 0" in capsys.readouterr().err
