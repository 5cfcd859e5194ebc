"""The ggml binding against llama.cpp's own quantizer (bit for bit) and gguf-py's dequantizer."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize as np_dequantize

from alignvec_gguf import ggml
from alignvec_gguf.errors import CompatibilityError
from tests.support.oracle import tensor_bytes, tensor_shape


@pytest.mark.parametrize("variant", ["Q8_0", "Q4_K_M"])
def test_quantize_matches_llama_cpp_quantizer(llama_pair, quantized_bases, variant):
    f32 = {t.name: t for t in GGUFReader(llama_pair.base_gguf).tensors}
    q = GGUFReader(quantized_bases[variant])
    checked = set()
    for t in q.tensors:
        if t.tensor_type == QT.F32:
            continue
        rows = np.asarray(f32[t.name].data).reshape(-1, tensor_shape(t)[-1])
        ours = ggml.quantize(rows, t.tensor_type)
        assert np.array_equal(ours, tensor_bytes(q, t)), f"{t.name} ({t.tensor_type.name}) differs from llama.cpp"
        checked.add(t.tensor_type)
    assert checked >= ({QT.Q8_0} if variant == "Q8_0" else {QT.Q4_K, QT.Q6_K})


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q5_1, QT.Q2_K, QT.Q4_K, QT.Q6_K, QT.IQ4_NL, QT.F16, QT.BF16])
def test_dequantize_matches_gguf_py(qtype):
    rows = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    raw = ggml.quantize(rows, qtype)
    ours = ggml.dequantize(raw, qtype, rows.size)
    theirs = np_dequantize(raw.reshape(8, -1), qtype).reshape(-1)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    assert ggml.row_size(qtype, 512) * 8 == raw.nbytes


def test_threaded_quantize_is_byte_identical_to_one_call():
    rows = np.random.default_rng(1).standard_normal((257, 256)).astype(np.float32)
    whole = ggml.quantize(rows, QT.Q4_K)
    parts = np.concatenate([ggml.quantize(rows[i : i + 1], QT.Q4_K) for i in range(len(rows))])
    assert np.array_equal(whole, parts)


def test_inexact_q8_0_differs_from_the_file_quantizer_only_on_rounding_ties():
    """exact=False (the CPU backend's SIMD Q8_0 rows): the same scales, and a code one step off only where
    a value sits on a rounding tie (ties to even, inverse scale 127/max): a handful per million, never more."""
    rows = (0.02 * np.random.default_rng(2).standard_normal((1024, 2048))).astype(np.float32)
    rows[0, :32] = 0.5  # one block of scale 1 (max 127) holding exact halves: ties, which the two round apart
    rows[0, 0], rows[0, 1:4] = 127.0, (2.5, -3.5, 4.5)
    exact = ggml.quantize(rows, QT.Q8_0)
    fast = ggml.quantize(rows, QT.Q8_0, exact=False, threads=2)
    blocks, fblocks = exact.reshape(-1, 34), fast.reshape(-1, 34)
    assert np.array_equal(blocks[:, :2], fblocks[:, :2])  # every block's scale
    step = np.abs(blocks[:, 2:].view(np.int8).astype(np.int16) - fblocks[:, 2:].view(np.int8))
    assert step.max() == 1 and 0 < np.count_nonzero(step) <= 1e-5 * rows.size + 32
    out = np.empty_like(fast)
    assert ggml.quantize(rows, QT.Q8_0, exact=False, out=out) is out and np.array_equal(out, fast)
    assert np.array_equal(ggml.quantize(rows[:3], QT.Q4_K, exact=False), ggml.quantize(rows[:3], QT.Q4_K))
    with pytest.raises(ValueError, match="contiguous uint8"):
        ggml.quantize(rows, QT.Q8_0, out=np.empty(10, np.uint8))


def test_preconditions_are_checked_before_ggml_asserts():
    rows = np.zeros((2, 100), dtype=np.float32)
    with pytest.raises(CompatibilityError, match="multiple of 256"):
        ggml.quantize(rows, QT.Q4_K)
    with pytest.raises(CompatibilityError, match="importance matrix"):
        ggml.quantize(np.zeros((2, 256), dtype=np.float32), QT.IQ2_XXS)
    assert ggml.requires_imatrix(QT.IQ1_S) and not ggml.requires_imatrix(QT.Q4_K)
    assert not ggml.can_quantize(QT.Q4_K, 100) and ggml.can_quantize(QT.Q8_0, 128)


@pytest.mark.parametrize("qtype", [QT.F16, QT.BF16], ids=lambda t: t.name)
def test_fast_float_conversions_equal_ggml_base(qtype, monkeypatch):
    """ggml-cpu's SIMD F16/BF16 conversions give the bytes and values of ggml-base's scalar rows."""
    assert ggml._cpu_lib() is not None, "llama-cpp-python ships libggml-cpu beside libggml-base"
    x = np.random.default_rng(0).standard_normal((300, 4096)).astype(np.float32)
    x[0, :6] = [np.inf, -np.inf, np.nan, 1e-8, 65504, 7e4]  # specials, subnormal, F16's max and overflow
    fast = ggml.quantize(x, qtype)
    fast_back = ggml.dequantize(fast, qtype, x.size)
    monkeypatch.setattr(ggml, "_cpu_lib", lambda: None)
    assert np.array_equal(fast, ggml.quantize(x, qtype))
    np.testing.assert_array_equal(fast_back, ggml.dequantize(fast, qtype, x.size))
    np.testing.assert_array_equal(fast_back, np_dequantize(fast.reshape(300, -1), qtype).ravel())
