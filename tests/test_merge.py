"""The merge against its oracles: transformers logits, exact arithmetic, ggml's own requantization.

Long module: one specification of ``merge()`` over the session's tiny models and their quantized bases;
each test is short and the helpers are few, so splitting it would spread one behaviour over files.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader

from alignvec_gguf import AlignmentVector, ggml, merge
from tests.support import tinymodels as tm
from tests.support.oracle import field, tensor_bytes, tensor_shape

TOKENS = [1, 5, 17, 42, 99, 200, 7, 3, 150, 33, 64, 250]
LAMBDAS = [-1.0, -0.5, 0.0, 0.5, 1.0, 2.0]


def tensors(path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data, dtype=np.float32) for t in GGUFReader(path).tensors}


@pytest.mark.parametrize("lam", LAMBDAS)
def test_f32_logits_match_transformers_on_interpolated_weights(llama_pair, tmp_path, lam):
    merged = merge(llama_pair.base_gguf, {llama_pair.av: lam}, tmp_path / "m.gguf").path
    ours = tm.llama_logits(merged, TOKENS)
    ref = tm.hf_logits(tm.interpolated(llama_pair.base_model, llama_pair.aligned_state, lam), TOKENS)
    assert np.abs(ours - ref).max() <= 2e-3 * np.abs(ref).max()
    if lam != 0:  # the knob really moves the logits, far beyond the tolerance
        base = tm.hf_logits(llama_pair.base_model, TOKENS)
        assert np.abs(ref - base).max() > 5 * 2e-3 * np.abs(ref).max()


def test_lambda_one_reproduces_llama_cpp_conversion_of_aligned(llama_pair, tmp_path):
    merged = tensors(merge(llama_pair.base_gguf, {llama_pair.av: 1.0}, tmp_path / "m.gguf").path)
    aligned = tensors(llama_pair.aligned_gguf)
    assert merged.keys() == aligned.keys()
    for name, want in aligned.items():
        # (b + (a − b)) in float32 is a to within one rounding of a
        np.testing.assert_allclose(merged[name], want, rtol=0, atol=2 * np.spacing(np.abs(want).max()), err_msg=name)


def test_f32_merge_is_exact_arithmetic(llama_pair, tmp_path):
    lam = 0.37
    merged = tensors(merge(llama_pair.base_gguf, {llama_pair.av: lam}, tmp_path / "m.gguf").path)
    base = tensors(llama_pair.base_gguf)
    av = AlignmentVector(llama_pair.av)
    for name, w in base.items():
        want = w + np.float32(lam) * av.delta(name) if name in av.names else w
        assert np.array_equal(merged[name], want), name


def test_two_vectors_add_up(llama_pair, second_av, tmp_path):
    av2_path, state2 = second_av
    l1, l2 = 0.6, -0.8
    merged = merge(llama_pair.base_gguf, {llama_pair.av: l1, av2_path: l2}, tmp_path / "m.gguf").path
    base = tensors(llama_pair.base_gguf)
    av1, av2 = AlignmentVector(llama_pair.av), AlignmentVector(av2_path)
    got = tensors(merged)
    for name, w in base.items():
        want = w.copy()
        if name in av1.names:
            want += np.float32(l1) * av1.delta(name)
        if name in av2.names:
            want += np.float32(l2) * av2.delta(name)
        assert np.array_equal(got[name], want), name
    # and through llama.cpp against transformers on θ_base + λ1Δ1 + λ2Δ2
    base_state = llama_pair.base_model.state_dict()
    model = type(llama_pair.base_model)(llama_pair.base_model.config).eval()
    model.load_state_dict(
        {
            k: base_state[k] + l1 * (llama_pair.aligned_state[k] - base_state[k]) + l2 * (state2[k] - base_state[k])
            for k in base_state
        }
    )
    ref = tm.hf_logits(model, TOKENS)
    assert np.abs(tm.llama_logits(merged, TOKENS) - ref).max() <= 2e-3 * np.abs(ref).max()


@pytest.mark.parametrize("variant", ["Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("lam", [-1.0, 0.5, 2.0])
def test_quantized_merge_keeps_types_and_matches_ggml_requantization(
    llama_pair, quantized_bases, tmp_path, variant, lam
):
    base_path = quantized_bases[variant]
    out = merge(base_path, {llama_pair.av: lam}, tmp_path / "m.gguf", requant="same")
    base, merged = GGUFReader(base_path), GGUFReader(out.path)
    av = AlignmentVector(llama_pair.av)
    by_name = {t.name: t for t in base.tensors}
    assert [t.name for t in merged.tensors] == [t.name for t in base.tensors]
    for t in merged.tensors:
        b = by_name[t.name]
        assert t.tensor_type == b.tensor_type, f"{t.name} changed type"
        if t.name not in av.names:
            assert np.array_equal(tensor_bytes(merged, t), tensor_bytes(base, b)), f"{t.name} not copied verbatim"
            continue
        shape = tensor_shape(b)
        target = ggml.dequantize(tensor_bytes(base, b), b.tensor_type, b.n_elements).reshape(-1, shape[-1])
        target += np.float32(lam) * av.delta(t.name).reshape(-1, shape[-1])
        reference = ggml.quantize(target, b.tensor_type)  # ggml's own quantization of the exact sum
        ours_err = np.abs(ggml.dequantize(tensor_bytes(merged, t), t.tensor_type, t.n_elements) - target.ravel())
        ref_err = np.abs(ggml.dequantize(reference, b.tensor_type, b.n_elements) - target.ravel())
        assert np.sqrt(np.mean(ours_err**2)) <= np.sqrt(np.mean(ref_err**2)) * (1 + 1e-6), t.name
        assert ours_err.max() <= ref_err.max() * (1 + 1e-6), t.name
    touched_types = {b for b, _ in out.touched.values()}
    assert (QT.Q4_K in touched_types) if variant == "Q4_K_M" else (QT.Q8_0 in touched_types)


def test_quantized_merge_moves_logits_like_f32(llama_pair, quantized_bases, tmp_path):
    """On Q8_0 the λ-shift of the logits survives requantization almost whole."""
    lam = 1.0
    f32_shift = tm.llama_logits(
        merge(llama_pair.base_gguf, {llama_pair.av: lam}, tmp_path / "f.gguf").path, TOKENS
    ) - tm.llama_logits(llama_pair.base_gguf, TOKENS)
    q = quantized_bases["Q8_0"]
    q_shift = tm.llama_logits(merge(q, {llama_pair.av: lam}, tmp_path / "q.gguf").path, TOKENS) - tm.llama_logits(
        q, TOKENS
    )
    cos = float((f32_shift * q_shift).sum() / np.linalg.norm(f32_shift) / np.linalg.norm(q_shift))
    assert cos > 0.9


@pytest.mark.parametrize("variant", ["Q8_0", "Q4_K_M"])
def test_lambda_zero_is_the_base_byte_for_byte(llama_pair, quantized_bases, tmp_path, variant):
    base_path = quantized_bases[variant]
    out = merge(base_path, {llama_pair.av: 0.0}, tmp_path / "m.gguf")
    base, merged = GGUFReader(base_path), GGUFReader(out.path)
    assert not out.touched
    for b, m in zip(base.tensors, merged.tensors, strict=True):
        assert np.array_equal(tensor_bytes(base, b), tensor_bytes(merged, m))


def test_merged_file_records_vectors_and_keeps_base_metadata(llama_pair, quantized_bases, tmp_path):
    base_path = quantized_bases["Q4_K_M"]
    out = merge(base_path, {llama_pair.av: 0.5}, tmp_path / "m.gguf", requant="same")
    base, merged = GGUFReader(base_path), GGUFReader(out.path)
    assert field(merged, "alignvec.merged.vectors") == ["aligned"]
    assert field(merged, "alignvec.merged.lambdas") == [0.5]
    av = AlignmentVector(llama_pair.av)
    content = hashlib.sha256(
        b"".join(np.ascontiguousarray(t.data).tobytes() for t in GGUFReader(llama_pair.av).tensors)
    )
    assert field(GGUFReader(llama_pair.av), "alignvec.content_sha256") == content.hexdigest()  # recorded by the writer
    assert field(merged, "alignvec.merged.vector_sha256") == [av.content_sha256] == [content.hexdigest()]
    assert field(merged, "alignvec.merged.requant") == "same"
    for key in ("general.file_type", "llama.block_count", "tokenizer.ggml.tokens", "tokenizer.ggml.scores"):
        assert field(merged, key) == field(base, key), key
    # every base item is copied unchanged (as raw bytes), in order, before the merge's own record
    base_keys = [k for k in base.fields if not k.startswith("GGUF.")]
    merged_keys = [k for k in merged.fields if not k.startswith("GGUF.")]
    assert merged_keys[: len(base_keys)] == base_keys
    assert all(k.startswith("alignvec.merged.") for k in merged_keys[len(base_keys) :])
    assert all(field(merged, k) == field(base, k) for k in base_keys)
    # merging a merged model records the new mix only, once
    again = merge(out.path, {llama_pair.av: 0.25}, tmp_path / "again.gguf", requant="same")
    twice = GGUFReader(again.path)
    assert [k for k in twice.fields if not k.startswith("GGUF.")] == merged_keys
    assert field(twice, "alignvec.merged.lambdas") == [0.25]


def test_model_metadata_is_decoded_like_gguf_py(quantized_bases):
    from alignvec_gguf.ggufread import GGUFModel

    model, reader = GGUFModel(quantized_bases["Q4_K_M"]), GGUFReader(quantized_bases["Q4_K_M"])
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert model.keys() == keys
    for k in keys:
        assert model.field(k) == field(reader, k), k
    assert [(t.name, t.tensor_type, t.shape, t.n_bytes) for t in model.tensors] == [
        (t.name, t.tensor_type, tensor_shape(t), int(t.n_bytes)) for t in reader.tensors
    ]
    for mt, rt in zip(model.tensors, reader.tensors, strict=True):
        assert np.array_equal(mt.raw(), tensor_bytes(reader, rt))


def test_non_finite_values_stop_the_merge(llama_pair, quantized_bases, tmp_path):
    """A base with a NaN block scale, or a λ that overflows float32: an error naming the tensor, no output."""
    from alignvec_gguf.avfile import write_av
    from alignvec_gguf.errors import FormatError, InputError

    with pytest.raises(InputError, match="float32"):
        merge(quantized_bases["Q4_K_M"], {llama_pair.av: 1e39}, tmp_path / "big.gguf")  # inf in float32
    av = AlignmentVector(llama_pair.av)
    huge = tmp_path / "huge.avec.gguf"  # finite values whose λ-multiple overflows float32
    write_av(
        huge,
        av.info.architecture,
        [("blk.1.attn_q.weight", np.full(av.shape("blk.1.attn_q.weight"), 1e30, np.float32))],
        av.info,
    )
    with pytest.raises(FormatError, match="blk.1.attn_q.weight.*beyond float32"):
        merge(quantized_bases["Q4_K_M"], {huge: 1e10}, tmp_path / "big.gguf")
    assert not (tmp_path / "big.gguf").exists()
    bad = tmp_path / "nan-scale.gguf"
    data = bytearray(quantized_bases["Q8_0"].read_bytes())
    reader = GGUFReader(quantized_bases["Q8_0"])
    t = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    assert t.tensor_type == QT.Q8_0
    data[t.data_offset : t.data_offset + 2] = np.array([np.nan], dtype=np.float16).tobytes()  # first block's d
    bad.write_bytes(bytes(data))
    for policy in ("calibrated", "same"):
        with pytest.raises(FormatError, match="blk.1.attn_q.weight"):
            merge(bad, {llama_pair.av: 0.5}, tmp_path / "m.gguf", requant=policy)
        assert not (tmp_path / "m.gguf").exists()


def test_requant_policy_raises_touched_tensors(llama_pair, quantized_bases, tmp_path):
    out = merge(quantized_bases["Q4_K_M"], {llama_pair.av: 1.0}, tmp_path / "m.gguf", requant="q8_0")
    merged = {t.name: t.tensor_type for t in GGUFReader(out.path).tensors}
    for name, (_, written) in out.touched.items():
        assert merged[name] == written
        assert written == (QT.F32 if name.endswith("norm.weight") else QT.Q8_0)


def test_merged_model_loads_and_generates(llama_pair, quantized_bases, tmp_path):
    from alignvec_gguf import load

    llm = load(quantized_bases["Q4_K_M"], {llama_pair.av: 0.5}, cache_dir=tmp_path, n_ctx=64, seed=0)
    out = llm("the patient", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] > 0
    cached = list(tmp_path.glob("*.gguf"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    load(quantized_bases["Q4_K_M"], {llama_pair.av: 0.5}, cache_dir=tmp_path, n_ctx=64)  # a cache hit: no new merge
    assert list(tmp_path.glob("*.gguf")) == cached and cached[0].stat().st_size > 0
    assert mtime <= cached[0].stat().st_mtime_ns


def test_coarse_requantization_is_reported(llama_pair, quantized_bases, tmp_path):
    """Round-to-nearest of a small change on Q4_K erases it: measured, warned in one line, recorded in the file."""
    same = merge(quantized_bases["Q4_K_M"], {llama_pair.av: 0.1}, tmp_path / "a.gguf", requant="same")
    warned = [w for w in same.warnings if "of the requested change" in w]
    assert len(warned) == 1 and "Q4_K" in warned[0] and "--requant unbiased" in warned[0], same.warnings
    assert same.min_kept_share < 0.5
    kept = field(GGUFReader(same.path), "alignvec.merged.kept_share")
    assert kept == pytest.approx([same.kept_share, same.min_kept_share])
    for policy in ("q8_0", "unbiased"):  # a finer type, or the default: the change is kept, no warning
        raised = merge(quantized_bases["Q4_K_M"], {llama_pair.av: 0.1}, tmp_path / "b.gguf", requant=policy)
        assert not raised.warnings and raised.min_kept_share > 0.5, policy


# --- the merge engine at full strength (issue 3) ---


@pytest.mark.parametrize("policy", ["same", "calibrated", "hifi"])
def test_parallel_pipeline_is_byte_identical_to_one_thread(llama_pair, quantized_bases, tmp_path, policy):
    base = quantized_bases["Q4_K_M"]
    one = merge(base, {llama_pair.av: 0.7}, tmp_path / "one.gguf", requant=policy, threads=1).path
    many = merge(base, {llama_pair.av: 0.7}, tmp_path / "many.gguf", requant=policy).path
    assert one.read_bytes() == many.read_bytes()


@pytest.mark.parametrize("policy", ["grid", "calibrated", "dither"])
def test_grid_policies_keep_types_scales_and_untouched_bytes(llama_pair, quantized_bases, tmp_path, policy):
    from alignvec_gguf.blockcodec import CODECS

    base_path = quantized_bases["Q4_K_M"]
    out = merge(base_path, {llama_pair.av: 1.0}, tmp_path / "m.gguf", requant=policy)
    base, merged = GGUFReader(base_path), GGUFReader(out.path)
    assert sum(int(t.n_bytes) for t in merged.tensors) == sum(int(t.n_bytes) for t in base.tensors)
    av = AlignmentVector(llama_pair.av)
    rescaled = 0
    for b, m in zip(base.tensors, merged.tensors, strict=True):
        assert m.tensor_type == b.tensor_type
        if b.name not in av.names:
            assert np.array_equal(tensor_bytes(merged, m), tensor_bytes(base, b))
        elif b.tensor_type in CODECS:  # the same scales; only the integer codes moved
            codec = CODECS[b.tensor_type]
            _, step_b, off_b = codec.unpack(np.asarray(tensor_bytes(base, b)).reshape(-1, codec.type_size))
            _, step_m, off_m = codec.unpack(np.asarray(tensor_bytes(merged, m)).reshape(-1, codec.type_size))
            same_blocks = (step_b == step_m).all(axis=1) & (off_b == off_m).all(axis=1)
            rescaled += int((~same_blocks).sum())
            if b.tensor_type == QT.Q4_K:  # |λΔ| is a fraction of a Q4_K step: its grid holds nearly every block
                assert same_blocks.mean() > 0.95, b.name
    # only blocks the grid could not hold (a code more than a step out of range) were quantized afresh
    assert rescaled <= out.refreshed_blocks


def test_full_precision_base_gives_the_from_scratch_quantization(llama_pair, quantized_bases, tmp_path):
    """With the F32 base, touched tensors are ggml's quantization of θ_f32 + λΔ: what quantizing the aligned
    model from scratch gives (llama.cpp's quantizer, bit for bit)."""
    lam = 1.0
    out = merge(
        quantized_bases["Q4_K_M"], {llama_pair.av: lam}, tmp_path / "m.gguf", requant="same",
        full_base=llama_pair.base_gguf,
    )  # fmt: skip
    aligned_q = tm.quantize_gguf(llama_pair.aligned_gguf, tmp_path / "aligned.Q4_K_M.gguf", "MOSTLY_Q4_K_M")
    merged, ref = GGUFReader(out.path), {t.name: t for t in GGUFReader(aligned_q).tensors}
    ref_reader = GGUFReader(aligned_q)
    for t in merged.tensors:
        if t.name in out.touched and len(tensor_shape(t)) > 1:
            assert t.tensor_type == ref[t.name].tensor_type
            # λ = 1: θ_f32 + Δ equals the aligned model's conversion up to one float rounding
            got = ggml.dequantize(tensor_bytes(merged, t), t.tensor_type, t.n_elements)
            want = ggml.dequantize(tensor_bytes(ref_reader, ref[t.name]), t.tensor_type, t.n_elements)
            assert np.mean(got == want) > 0.99, t.name
    # the kept share is that of λΔ (not of the full base's correction of the 4-bit rounding, which no 4-bit
    # file keeps): the from-scratch quantization keeps the knob, so no erasure warning; at a small λ too
    small = merge(quantized_bases["Q4_K_M"], {llama_pair.av: 0.1}, tmp_path / "s.gguf", requant="same",
                  full_base=llama_pair.base_gguf)  # fmt: skip
    for r in (out, small):
        assert r.min_kept_share > 0.5 and not [w for w in r.warnings if "of the requested change" in w]
    with pytest.raises(Exception, match="F32, F16 or BF16"):
        merge(quantized_bases["Q4_K_M"], {llama_pair.av: lam}, tmp_path / "x.gguf", full_base=quantized_bases["Q8_0"])


def test_direct_load_matches_the_merged_file(llama_pair, quantized_bases, tmp_path):
    """llama_model_init_from_user with the merge plan gives the merged file's model, with no file."""
    from alignvec_gguf import load

    kwargs = dict(n_ctx=64, logits_all=True, n_threads=2)
    for variant, policy, tol in (("Q8_0", "same", 0.0), ("Q4_K_M", "calibrated", 0.05)):
        base = quantized_bases[variant]
        path = merge(base, {llama_pair.av: 0.5}, tmp_path / f"{variant}.gguf", requant=policy).path
        want = tm.llama_logits(path, TOKENS)
        llm = load(base, {llama_pair.av: 0.5}, requant=policy, mode="direct", **kwargs)
        llm.eval(TOKENS)
        got = np.array(llm.scores[: len(TOKENS)])
        llm.close()
        # K-quants run through other kernels when not repacked: equal up to accumulation order
        assert np.abs(got - want).max() <= tol * np.abs(want).max() + 1e-6, policy
    assert not list(tmp_path.glob("*.tmp"))


def test_direct_load_gives_the_file_merges_diagnostics(llama_pair, quantized_bases, tmp_path, caplog):
    """mode="direct" logs what a file merge warns about: the kept-share warning, type fallbacks, the fingerprint."""
    import logging
    import shutil

    from alignvec_gguf import load

    other = tmp_path / "other-f32.gguf"  # the same layout with other weights: a norm moved by 1%
    shutil.copy(llama_pair.base_gguf, other)
    reader = GGUFReader(other, "r+")
    norm = next(t for t in reader.tensors if t.name.endswith("attn_norm.weight"))
    norm.data[...] = norm.data * np.float32(1.01)
    reader.data.flush()
    del reader, norm
    cases = [
        (quantized_bases["Q4_K_M"], "same", 0.1, "of the requested change"),  # round-to-nearest erases it
        (other, "q4_k", 0.5, "was made from"),  # other weights: the transfer warning
    ]
    for base, policy, lam, needle in cases:
        report = merge(base, {llama_pair.av: lam}, tmp_path / "m.gguf", requant=policy)
        assert [w for w in report.warnings if needle in w], (policy, report.warnings)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="alignvec_gguf"):
            llm = load(base, {llama_pair.av: lam}, requant=policy, mode="direct", n_ctx=32, n_threads=2)
            llm.close()
        logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert logged == report.warnings, policy


def test_inputs_leave_the_resident_set(quantized_bases):
    from alignvec_gguf import pages

    reader = GGUFReader(quantized_bases["Q4_K_M"])
    _ = int(np.asarray(reader.data).sum())  # touch every page
    released = pages.release([quantized_bases["Q4_K_M"]])
    assert released >= reader.data.nbytes * 0.9 or not pages._libc()


def _resident(path) -> int:
    """Bytes of ``path``'s mappings resident in this process (/proc/self/smaps)."""
    import os

    real, total, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line
                inside = len(head) >= 6 and head[5] == real
            elif inside and head and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def test_the_plan_leaves_no_pages_of_its_inputs_resident(llama_pair, quantized_bases):
    """Choosing types samples every touched tensor (unbiased's noise, hifi's check): a 7B plan paged in GBs."""
    from alignvec_gguf import pages
    from alignvec_gguf.plan import MergePlan

    if not pages._libc():
        pytest.skip("no libc madvise here")
    base = quantized_bases["Q4_K_M"]
    plan = MergePlan(base, {llama_pair.av: 0.5})
    assert plan.jobs and any(t.n_bytes for t in plan.model.tensors)
    resident = _resident(base) + _resident(llama_pair.av)
    assert resident <= 64 << 10, f"{resident} bytes of the inputs still resident after planning"


def test_a_merged_tensors_input_pages_go_and_no_other_memory(tmp_path):
    """The merge drops each written tensor's input pages (pages.release_views): only in file maps."""
    from alignvec_gguf import pages

    if not pages._libc():
        pytest.skip("no libc madvise here")
    path = tmp_path / "inputs.bin"
    path.write_bytes(np.arange(1 << 20, dtype=np.uint32).tobytes())  # 4 MB
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    assert int(mapped.sum(dtype=np.uint64)) > 0  # every page resident
    before = _resident(path)
    middle = mapped[1_000_001:3_000_001]  # not page-aligned: only the whole pages inside it go
    advised = pages.release_views([middle])
    assert advised == (3_000_001 // 4096 - -(-1_000_001 // 4096)) * 4096
    # (a file page mapped whole as a huge page goes whole: it faults back in from the page cache)
    assert before - _resident(path) >= advised
    assert np.array_equal(mapped.view(np.uint32), np.arange(1 << 20, dtype=np.uint32))  # read again from the file
    # memory that is not a file's map would lose its data to MADV_DONTNEED: such views are never advised
    anonymous = np.arange(1 << 20, dtype=np.uint32)
    anonymous.flags.writeable = False
    from_bytes = np.frombuffer(anonymous.tobytes(), dtype=np.uint32)
    writable = np.memmap(path, dtype=np.uint8, mode="r+")
    assert pages.release_views([anonymous, from_bytes, writable, mapped[:0]]) == 0
    assert np.array_equal(anonymous, from_bytes) and int(anonymous[-1]) == (1 << 20) - 1


def test_written_tensors_buffers_are_reused_by_size_within_their_limits():
    from alignvec_gguf.tensormerge import Buffers

    buffers = Buffers(keep=1, largest=1000)
    a = buffers.take(800)
    buffers.give(a.reshape(8, 100)[:, :50])  # any view of it hands the whole buffer back
    assert buffers.take(800) is a
    buffers.give(np.empty(800, dtype=np.uint8))  # not one of ours: ignored
    b = buffers.take(800)
    assert b is not a
    buffers.give(a)
    buffers.give(b)  # one of each size waits at most
    assert buffers.take(800) is a and buffers.take(800) is not b
    big = buffers.take(2000)
    buffers.give(big)  # beyond `largest`: freed, not kept
    assert buffers.take(2000) is not big
    buffers.give(a)
    assert buffers.take(400) is not a  # only the same size is reused


def test_merge_never_writes_over_its_inputs(llama_pair, quantized_bases, tmp_path):
    import shutil

    from alignvec_gguf.errors import InputError

    av = tmp_path / "v.avec.gguf"
    shutil.copy(llama_pair.av, av)
    before = av.read_bytes()
    with pytest.raises(InputError, match="inputs"):
        merge(quantized_bases["Q8_0"], {av: 0.5}, av)
    assert av.read_bytes() == before


def test_content_digest_of_vectors_without_one(tmp_path):
    """Vectors written before alignvec.content_sha256 existed (the bundled demo's) get it computed, the same way."""
    from pathlib import Path

    import alignvec_gguf

    path = Path(alignvec_gguf.__file__).parent / "demo_data" / "medical.avec.gguf"
    reader = GGUFReader(path)
    assert field(reader, "alignvec.content_sha256") is None
    tensors = sorted(reader.tensors, key=lambda t: t.data_offset)
    expected = hashlib.sha256(b"".join(np.ascontiguousarray(t.data).tobytes() for t in tensors)).hexdigest()
    assert AlignmentVector(path).content_sha256 == expected


def test_a_plain_merge_records_what_it_read_and_refuses_an_edited_vector(llama_pair, quantized_bases, tmp_path):
    """Not only the cache: merge() itself reads each vector whole beside the merge, so a vector whose tensors
    changed after writing (its recorded content digest is stale) is a one-line FormatError and nothing is written."""
    from alignvec_gguf.errors import FormatError

    edited = tm.edited_copy(llama_pair.av, tmp_path / "edited.avec.gguf")
    out = tmp_path / "m.gguf"
    with pytest.raises(FormatError, match="tensors changed after it was written") as e:
        merge(quantized_bases["Q8_0"], {edited: 0.5}, out)
    assert "\n" not in str(e.value) and not out.exists() and not list(tmp_path.glob("*.tmp"))
    report = merge(quantized_bases["Q8_0"], {llama_pair.av: 0.5}, out)
    content = hashlib.sha256()
    reader = GGUFReader(llama_pair.av)
    for t in sorted(reader.tensors, key=lambda t: t.data_offset):
        content.update(np.ascontiguousarray(t.data).tobytes())
    assert field(GGUFReader(report.path), "alignvec.merged.vector_sha256") == [content.hexdigest()]


@pytest.mark.parametrize(
    ("policy", "advice"),
    [
        ("calibrated", "--requant unbiased keeps it at about the same size (--requant hifi at a larger file)"),
        ("hifi", "--requant unbiased keeps it at about the same size;"),
        ("unbiased", "--requant hifi or q8_0 keeps more at a larger file"),
    ],
)
def test_kept_share_warning_advises_a_policy_other_than_the_one_used(policy, advice):
    from types import SimpleNamespace

    from alignvec_gguf.diagnose import kept_warning as _kept_warning
    from alignvec_gguf.tensormerge import Kept

    report = SimpleNamespace(
        kept={"blk.0.attn_v.weight": Kept(0.4, 1.0), "blk.0.attn_q.weight": Kept(1.0, 1.0)},
        touched={"blk.0.attn_v.weight": (QT.Q8_0, QT.Q8_0), "blk.0.attn_q.weight": (QT.Q4_K, QT.Q4_K)},
        policy=policy,
        kept_share=0.7,
    )
    line = _kept_warning(report)  # type: ignore[arg-type]
    assert line is not None and "1 of 2 touched tensors (Q8_0) kept only 40%-40%" in line and advice in line
    assert f"--requant {policy}" not in line.split("erased): ")[1]  # never advises the policy that erased it


def test_regrid_in_chunks_gives_the_bytes_of_one_whole_call(quantized_bases, monkeypatch):
    # A tensor moving to a finer grid is requantized a few rows at a time (memory at 7B); ggml quantizes rows
    # independently, so the bytes must equal one call over the whole dequantized tensor (with the same
    # quantizer: the intermediate grid takes ggml-cpu's SIMD Q8_0 rows, exact=False).
    from alignvec_gguf import tensormerge
    from alignvec_gguf.ggufread import GGUFModel

    model = GGUFModel(quantized_bases["Q4_K_M"])
    t = next(t for t in model.tensors if t.tensor_type == QT.Q4_K and t.n_elements // t.shape[-1] % 3)
    values = ggml.dequantize(t.raw(), t.tensor_type, t.n_elements).reshape(-1, t.shape[-1])
    whole = ggml.quantize(values, QT.Q8_0, exact=False)
    monkeypatch.setattr(tensormerge, "REGRID_CHUNK", 3 * t.shape[-1])  # three rows a chunk, the last one short
    chunked = tensormerge._regrid(t, QT.Q8_0, None, threads=2)
    assert chunked.dtype == np.uint8 and np.array_equal(chunked, whole)
