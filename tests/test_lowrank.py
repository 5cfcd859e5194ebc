"""The low-rank form against its oracles: numpy's exact SVD (Eckart–Young), llama.cpp's own LoRA loader."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from alignvec_gguf import AlignmentVector, merge
from alignvec_gguf.avfile import AVInfo, LoraStats, write_lowrank_av
from alignvec_gguf.cli import main
from alignvec_gguf.errors import FormatError, InputError
from converters import convert
from converters.lowrank import choose_rank, factor, factor_matrix, write_lowrank
from tests.support import tinymodels as tm

TOKENS = [1, 5, 17, 42, 99, 200, 7, 3, 150, 33, 64, 250]


def spectrum_matrix(m: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A matrix with a known, decaying spectrum σ_i = 1/(i+1)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    s = 1.0 / np.arange(1, min(m, n) + 1)
    return ((u * s) @ v.T).astype(np.float32), s


def logits(model: Path, lora: Path | None = None, scale: float = 1.0) -> np.ndarray:
    """llama.cpp's logits for TOKENS, optionally through its own LoRA loader (one thread: 2 spin on a busy machine)."""
    from alignvec_gguf.cpu import new_llama

    kwargs = {"lora_path": str(lora), "lora_scale": scale} if lora is not None else {}
    llm = new_llama(model, n_ctx=64, n_threads=1, n_threads_batch=1, logits_all=True, verbose=False, **kwargs)
    llm.eval(TOKENS)
    out = np.array(llm.scores[: len(TOKENS)], dtype=np.float32)
    llm.close()
    return out


def info(arch: str = "llama") -> AVInfo:
    return AVInfo(arch, "t", "", "", "base", "aligned", "sig", "fp")


@pytest.mark.parametrize("shape,rank", [((96, 64), 12), ((256, 384), 8)])  # exact and randomized SVD
def test_truncation_is_the_best_rank_r_approximation(shape, rank):
    delta, s = spectrum_matrix(*shape)
    a, b, err2 = factor_matrix(delta, rank, None)
    assert a.shape == (rank, shape[1]) and b.shape == (shape[0], rank)
    optimal = math.sqrt(float(np.sum(s[rank:] ** 2)))  # Eckart–Young: what the tail singular values hold
    measured = float(np.linalg.norm(delta - b @ a))
    assert measured == pytest.approx(math.sqrt(err2), rel=1e-3)
    assert optimal * (1 - 1e-3) <= measured <= optimal * 1.01


def test_energy_threshold_keeps_the_smallest_sufficient_rank():
    delta, s = spectrum_matrix(64, 64)
    kept = np.cumsum(s**2) / np.sum(s**2)
    for energy in (0.5, 0.9, 0.99):
        want = int(np.argmax(kept >= energy)) + 1
        a, b, err2 = factor_matrix(delta, None, energy)
        assert a.shape[0] == want
        assert 1 - err2 / np.sum(s**2) >= energy * (1 - 1e-4)
        assert factor_matrix(delta, 3, energy)[0].shape[0] == min(3, want)  # a rank cap wins when smaller
    assert choose_rank(s, float(np.sum(s**2)), None, 1.0) == 64


def test_full_rank_reproduces_the_matrix_and_stacks_share_one_rank():
    delta, _ = spectrum_matrix(48, 32)
    a, b, err2 = factor_matrix(delta, 32, None)
    np.testing.assert_allclose(b @ a, delta, atol=2e-6)
    assert err2 < 1e-10
    stack = np.stack([spectrum_matrix(48, 32, seed)[0] for seed in range(3)])
    a, b, _ = factor(stack, None, 0.9)
    assert a.shape[0] == 3 and a.shape[2] == 32 and b.shape[:2] == (3, 48) and a.shape[1] == b.shape[2]
    for i in range(3):
        single = factor_matrix(stack[i], a.shape[1], None)
        np.testing.assert_allclose(b[i] @ a[i], single[1] @ single[0], atol=1e-5)


def test_lowrank_file_roundtrip_with_embedding_and_stacked_tensors(tmp_path):
    rng = np.random.default_rng(0)
    deltas = {
        "token_embd.weight": spectrum_matrix(320, 64, 1)[0],  # flipped in the file, as llama.cpp wants
        "blk.0.attn_q.weight": spectrum_matrix(64, 64, 2)[0],
        "blk.0.ffn_up_exps.weight": np.stack([spectrum_matrix(96, 64, s)[0] for s in (3, 4)]),
        "blk.0.attn_norm.weight": rng.standard_normal(64).astype(np.float32),
        "blk.0.attn_q.bias": rng.standard_normal(64).astype(np.float32),
        "blk.0.attn_k.weight": np.zeros((32, 64), np.float32),  # unchanged: left out
        "output.weight": np.zeros((320, 64), np.float32),  # present: the embedding is not tied to the output
    }
    base_norm = {"blk.0.attn_norm.weight": 10.0, "blk.0.attn_q.bias": 4.0}
    out = tmp_path / "v.avec.gguf"
    report = write_lowrank(
        out,
        "llama",
        iter(deltas.items()),
        info(),
        rank=8,
        base_tensor=lambda n: np.full(1, base_norm[n], np.float32),
    )
    av = AlignmentVector(out)
    assert av.form == "lora" and av.alpha == 8.0
    assert sorted(av.names) == ["blk.0.attn_q.weight", "blk.0.ffn_up_exps.weight", "token_embd.weight"]
    reader = {t.name: t for t in GGUFReader(out).tensors}
    assert list(reader["token_embd.weight.lora_a"].shape) == [8, 320]  # ggml ne: (r, n_vocab)
    assert list(reader["token_embd.weight.lora_b"].shape) == [8, 64]  # (r, n_embd)
    assert list(reader["blk.0.ffn_up_exps.weight.lora_a"].shape) == [64, 8, 2]
    for name in av.names:
        assert av.shape(name) == deltas[name].shape and av.rank(name) == 8
        a, b, _ = factor(deltas[name], 8, None)
        np.testing.assert_allclose(av.delta(name), np.matmul(b, a), atol=1e-5, err_msg=name)
    assert av.lora is not None and set(av.lora.dropped) == set(base_norm)
    for name, norm, rel in zip(av.lora.dropped, av.lora.dropped_norm, av.lora.dropped_rel_change, strict=True):
        assert norm == pytest.approx(float(np.linalg.norm(deltas[name])), rel=1e-5)
        assert rel == pytest.approx(norm / base_norm[name], rel=1e-5)
    matrix_energy = sum(float(np.sum(deltas[n] ** 2)) for n in av.names)
    err = sum(float(np.sum((deltas[n] - av.delta(n)) ** 2)) for n in av.names)
    assert av.lora.rel_error == pytest.approx(math.sqrt(err / matrix_energy), rel=1e-3)
    dropped_energy = sum(float(np.sum(deltas[n] ** 2)) for n in base_norm)
    assert report.dropped_energy == pytest.approx(dropped_energy / (matrix_energy + dropped_energy), rel=1e-5)
    assert av.lora.dropped_energy == pytest.approx(report.dropped_energy, rel=1e-6)
    assert report.tensors_written == 3 and report.size_ratio < 1


def test_a_tied_embedding_is_dropped_because_llama_cpp_would_apply_it_to_the_output(tmp_path):
    """Without output.weight llama.cpp uses token_embd.weight as the output and aborts on an embedding pair."""
    deltas = [
        ("token_embd.weight", spectrum_matrix(320, 64, 1)[0]),
        ("blk.0.attn_q.weight", spectrum_matrix(64, 64)[0]),
    ]
    report = write_lowrank(tmp_path / "t.avec.gguf", "llama", iter(deltas), info(), rank=4)
    av = AlignmentVector(tmp_path / "t.avec.gguf")
    assert av.names == ["blk.0.attn_q.weight"] and av.lora is not None and av.lora.dropped == ("token_embd.weight",)
    assert math.isnan(av.lora.dropped_rel_change[0]) and report.dropped_energy == pytest.approx(0.5)


def test_broken_lowrank_files_are_refused(tmp_path):
    stats = LoraStats(rank=4, energy=0.0, rel_error=0.1)
    path = tmp_path / "half.avec.gguf"
    a, b, _ = factor_matrix(spectrum_matrix(16, 16)[0], 4, None)
    write_lowrank_av(path, "llama", [("blk.0.attn_q.weight", a, b)], info(), stats, alpha=4)
    assert AlignmentVector(path).rank("blk.0.attn_q.weight") == 4
    with pytest.raises(ValueError, match="not a"):
        write_lowrank_av(tmp_path / "x.avec.gguf", "llama", [("w", a, b.T)], info(), stats, alpha=4)
    with pytest.raises(FormatError, match="NaN"):
        write_lowrank_av(tmp_path / "y.avec.gguf", "llama", [("w", a * np.nan, b)], info(), stats, alpha=4)
    assert not (tmp_path / "y.avec.gguf").exists()
    # a file with only one half of a pair: rewrite it without lora_b
    import gguf

    src = GGUFReader(path)
    w = gguf.GGUFWriter(tmp_path / "broken.avec.gguf", "llama")
    for f in src.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.asarray(src.tensors[0].data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(FormatError, match="lora_b"):
        AlignmentVector(tmp_path / "broken.avec.gguf")


def test_converted_lowrank_vector_reports_error_size_and_dropped(llama_pair, lowrank_pair):
    full, low = AlignmentVector(lowrank_pair.full_av), AlignmentVector(lowrank_pair.lowrank_av)
    assert low.form == "lora" and low.alpha == 16 and low.lora is not None
    matrices = [n for n in full.names if len(full.shape(n)) == 2]
    assert sorted(low.names) == sorted(matrices)
    assert all(low.rank(n) == 16 for n in low.names)
    # the recorded error is the measured distance to the full form over the matrices
    err = sum(float(np.sum((full.delta(n) - low.delta(n)) ** 2)) for n in matrices)
    total = sum(float(np.sum(full.delta(n) ** 2)) for n in matrices)
    assert low.lora.rel_error == pytest.approx(math.sqrt(err / total), rel=1e-3)
    assert 0.05 < low.lora.rel_error < 0.6  # rank 16 of a rank-8 + noise Δ: most, not all
    # what cannot be low-rank is exactly the 1-D tensors, and its relative change is measured on the base
    assert set(low.lora.dropped) == {n for n in full.names if len(full.shape(n)) == 1}
    base = {t.name: np.asarray(t.data, dtype=np.float32) for t in GGUFReader(llama_pair.base_gguf).tensors}
    for name, rel in zip(low.lora.dropped, low.lora.dropped_rel_change, strict=True):
        assert rel == pytest.approx(np.linalg.norm(full.delta(name)) / np.linalg.norm(base[name]), rel=1e-4)
    assert lowrank_pair.lowrank_av.stat().st_size < 0.3 * lowrank_pair.full_av.stat().st_size


@pytest.fixture(scope="module")
def energy_av(llama_pair, lowrank_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("energy") / "e.avec.gguf"
    convert(llama_pair.base_dir, lowrank_pair.aligned_dir, out, energy=0.95)
    return out


@pytest.mark.parametrize("form", ["rank", "energy"])
@pytest.mark.parametrize("lam", [-1.0, 0.6, 1.5])
def test_llama_cpp_loads_the_file_as_a_lora_with_scale_lambda(llama_pair, lowrank_pair, energy_av, tmp_path, form, lam):
    """llama.cpp's own LoRA path at scale λ == the merged expansion at λ (F32 base: both exact)."""
    if form == "rank":
        av = lowrank_pair.lowrank_av
    else:  # varying ranks per tensor: r / alpha folded into lora_b must still give scale λ
        av = energy_av
        ranks = {AlignmentVector(av).rank(n) for n in AlignmentVector(av).names}
        assert len(ranks) > 1 and AlignmentVector(av).alpha == 1.0
    merged = merge(llama_pair.base_gguf, {av: lam}, tmp_path / "m.gguf").path
    want = logits(merged)
    got = logits(llama_pair.base_gguf, av, lam)
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    base = logits(llama_pair.base_gguf)
    assert np.abs(want - base).max() > 20 * 1e-3 * np.abs(want).max()  # the knob moves far beyond the tolerance


def test_merge_of_a_lowrank_vector_is_exact_arithmetic(llama_pair, lowrank_pair, tmp_path):
    lam = -0.7
    merged = {
        t.name: np.asarray(t.data)
        for t in GGUFReader(
            merge(llama_pair.base_gguf, {lowrank_pair.lowrank_av: lam}, tmp_path / "m.gguf").path
        ).tensors
    }
    av = AlignmentVector(lowrank_pair.lowrank_av)
    for t in GGUFReader(llama_pair.base_gguf).tensors:
        w = np.asarray(t.data, dtype=np.float32)
        want = w + np.float32(lam) * av.delta(t.name) if t.name in av.names else w
        assert np.array_equal(merged[t.name], want), t.name


def test_cli_convert_rank_and_bad_options(llama_pair, lowrank_pair, tmp_path, capsys):
    out = tmp_path / "r4.avec.gguf"
    args = ["-q", "convert", str(llama_pair.base_dir), str(lowrank_pair.aligned_dir), "-o", str(out)]
    assert main([*args, "--rank", "4", "--dtype", "f16"]) == 0
    printed = capsys.readouterr().out
    assert "low-rank form (rank <= 4" in printed and "of the full form's size" in printed and "dropped" in printed
    assert AlignmentVector(out).storage_type("blk.0.attn_q.weight").name == "F16"
    for bad in (["--rank", "0"], ["--energy", "1.5"], ["--energy", "0"]):
        assert main([*args, *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("--rank" in err or "--energy" in err), err
    with pytest.raises(InputError):
        convert(llama_pair.base_dir, lowrank_pair.aligned_dir, tmp_path / "x.avec.gguf", rank=-3)


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "Qwen2ForCausalLM"])
def test_other_architectures_load_as_llama_cpp_loras(llama_src, tokenizer, tmp_path, arch):
    """Stacked MoE experts (3-D pairs through llama.cpp's mul_mat_id), and Qwen2's biases and tied embedding."""
    if not hasattr(tm, "arch_config"):
        pytest.skip("tinymodels has no arch_config")
    base = tm.make_model(tm.arch_config(arch), 11)
    aligned = tm.tie(base, tm.perturbed(base, 12, scale=0.1))
    base_dir = tm.save(base, None, tmp_path / "base", tokenizer)
    aligned_dir = tm.save(base, aligned, tmp_path / "aligned", tokenizer)
    base_gguf = tm.hf_to_gguf(llama_src, base_dir, tmp_path / "base.gguf")
    av_path = convert(base_dir, aligned_dir, tmp_path / "lr.avec.gguf", rank=512).path  # full rank: exact
    av = AlignmentVector(av_path)
    assert av.lora is not None
    base_names = {t.name for t in GGUFReader(base_gguf).tensors}
    if arch == "MixtralForCausalLM":
        assert av.shape("blk.0.ffn_gate_exps.weight") == (4, 512, 256) and av.rank("blk.0.ffn_gate_exps.weight") == 256
    else:
        assert "blk.0.attn_q.bias" in av.lora.dropped
        assert "output.weight" not in base_names and "token_embd.weight" in av.lora.dropped  # tied: see lowrank.py
    want = logits(merge(base_gguf, {av_path: 1.5}, tmp_path / "m.gguf").path)
    got = logits(base_gguf, av_path, 1.5)
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    assert np.abs(want - logits(base_gguf)).max() > 0.05 * np.abs(want).max()
