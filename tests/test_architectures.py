"""Every supported architecture against llama.cpp's own conversion and against transformers.

For each architecture a tiny real model (transformers, random weights, 2 layers, rows of 256/512 so
that K-quants apply) and a fine-tune stand-in are converted by llama.cpp's ``convert_hf_to_gguf.py``
(the layout oracle) and by ``converters.convert`` (the vector). The tests show that the vector is
``T(aligned) − T(base)`` tensor for tensor, that λ = 1 rebuilds llama.cpp's conversion of the aligned
model, that llama.cpp's logits at λ ∈ {−1, 0.5, 2} match transformers on θ_base + λΔ as closely as
llama.cpp matches transformers on the base itself, and that a Q4_K_M merge keeps every tensor type.
"""

from __future__ import annotations

import json
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader

from alignvec_gguf import AlignmentVector, CompatibilityError, merge
from alignvec_gguf.cli import main
from converters import ARCHITECTURES, convert
from converters.checkpoint import Checkpoint
from converters.layout import Layout
from tests.support import tinymodels as tm
from tests.support.oracle import field

TOKENS = [1, 5, 17, 42, 99, 200, 7, 3, 150, 33, 64, 250]
LAMBDAS = [-1.0, 0.5, 2.0]
ARCHS = [
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
]
GGUF_ARCH = {
    "MistralForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
}


@dataclass
class Case:
    arch: str
    root: Path
    base_model: torch.nn.Module
    aligned_state: dict
    base_dir: Path
    aligned_dir: Path
    base_gguf: Path  # F32, by llama.cpp's converter
    aligned_gguf: Path
    av: Path


@pytest.fixture(scope="session", params=ARCHS)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, llama_src: Path, tokenizer: Path):
    arch = request.param
    root = tmp_path_factory.mktemp(arch.replace("ForCausalLM", "").lower())
    base = tm.make_model(tm.arch_config(arch), 11)
    aligned = tm.tie(base, tm.perturbed(base, 12, scale=0.1))
    # directory names end up in general.name, which llama.cpp reads for per-model vocabulary quirks
    base_dir = tm.save(base, None, root / "base", tokenizer)
    aligned_dir = tm.save(base, aligned, root / "aligned", tokenizer)
    base_gguf, aligned_gguf = tm.hf_to_gguf_all(
        llama_src, [(base_dir, root / "base-f32.gguf"), (aligned_dir, root / "aligned-f32.gguf")]
    )
    av = convert(base_dir, aligned_dir, root / "aligned.avec.gguf").path
    return Case(arch, root, base, aligned, base_dir, aligned_dir, base_gguf, aligned_gguf, av)


@pytest.fixture(scope="session")
def base_gap(case: Case) -> float:
    """How closely llama.cpp matches transformers on the base itself (relative to max |logit|)."""
    ref = tm.hf_logits(case.base_model, TOKENS)
    return float(np.abs(tm.llama_logits(case.base_gguf, TOKENS) - ref).max() / np.abs(ref).max())


def test_delta_is_llama_cpp_layout(case: Case):
    tm.assert_layout_oracle(case.av, case.base_gguf, case.aligned_gguf)
    av = AlignmentVector(case.av)
    assert field(GGUFReader(case.av), "general.architecture") == GGUF_ARCH[case.arch]
    assert av.info.base_fingerprint.startswith("v2.") and len(av.info.base_fingerprint) == 64
    names = set(av.names)
    if case.arch == "Qwen2ForCausalLM":  # q/k/v biases, not permuted
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    if case.arch == "Qwen3ForCausalLM":
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names
    if case.arch == "Phi3ForCausalLM":  # fused qkv and gate_up stay fused
        assert av.shape("blk.0.attn_qkv.weight") == (512, 256) and av.shape("blk.0.ffn_up.weight") == (1024, 256)
    if case.arch == "MixtralForCausalLM":  # experts stacked, expert index outermost
        assert av.shape("blk.0.ffn_gate_exps.weight") == (4, 512, 256)
        assert av.shape("blk.1.ffn_down_exps.weight") == (4, 256, 512)
        assert "blk.0.ffn_gate_inp.weight" in names
    if case.arch.startswith("Gemma"):  # stored as 1 + w: the +1 cancels, Δ is the plain HF delta
        hf_delta = case.aligned_state["model.norm.weight"] - case.base_model.state_dict()["model.norm.weight"]
        np.testing.assert_allclose(AlignmentVector(case.av).delta("output_norm.weight"), hf_delta.numpy(), atol=1e-6)


def test_lambda_one_reproduces_llama_cpp_conversion_of_aligned(case: Case, tmp_path: Path):
    merged = tm.gguf_tensors(merge(case.base_gguf, {case.av: 1.0}, tmp_path / "m.gguf").path)
    aligned = tm.gguf_tensors(case.aligned_gguf)
    assert merged.keys() == aligned.keys()
    for name, want in aligned.items():
        # b + (a − b) in float32 is a to within one rounding
        np.testing.assert_allclose(merged[name], want, rtol=0, atol=2 * np.spacing(np.abs(want).max()), err_msg=name)


@pytest.mark.parametrize("lam", LAMBDAS)
def test_logits_match_transformers_on_interpolated_weights(case: Case, base_gap: float, tmp_path: Path, lam: float):
    merged = merge(case.base_gguf, {case.av: lam}, tmp_path / "m.gguf").path
    ref = tm.hf_logits(tm.interpolated(case.base_model, case.aligned_state, lam), TOKENS)
    gap = float(np.abs(tm.llama_logits(merged, TOKENS) - ref).max() / np.abs(ref).max())
    # as closely as llama.cpp matches transformers on the base (its own kernels' floor), with slack
    # for extrapolated weights; the floor keeps exact-ish architectures from failing on noise
    assert gap <= max(3 * base_gap, 2e-4), (gap, base_gap)
    base = tm.hf_logits(case.base_model, TOKENS)
    shift = float(np.abs(ref - base).max() / np.abs(ref).max())
    assert shift > 10 * max(gap, base_gap), "the knob must move the logits far beyond the tolerance"


def test_q4_k_m_merge_keeps_every_tensor_type(case: Case, tmp_path: Path):
    q4 = tm.quantize_gguf(case.base_gguf, tmp_path / "base-q4km.gguf", "MOSTLY_Q4_K_M")
    # calibrated: the same-size policy that was the default when this was written (the default, unbiased, may
    # move coarse touched tensors to Q8_0)
    out = merge(q4, {case.av: 0.5}, tmp_path / "m.gguf", requant="calibrated")
    base, merged = GGUFReader(q4), GGUFReader(out.path)
    assert [(t.name, t.tensor_type) for t in merged.tensors] == [(t.name, t.tensor_type) for t in base.tensors]
    touched = {b for b, _ in out.touched.values()}
    assert QT.Q4_K in touched, touched
    assert len(out.touched) == len(AlignmentVector(case.av).names)
    # a working model, as close to the F32 merge as the Q4_K_M base is to the F32 base (on these random
    # tiny models Q4_K_M alone moves the logits by about 25%; requantizing the merge adds to that)
    f32_base = tm.llama_logits(case.base_gguf, TOKENS)
    f32_merged = tm.llama_logits(merge(case.base_gguf, {case.av: 0.5}, tmp_path / "f.gguf").path, TOKENS)
    q4_base, q4_merged = tm.llama_logits(q4, TOKENS), tm.llama_logits(out.path, TOKENS)

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    assert np.isfinite(q4_merged).all()
    assert rel(q4_merged, f32_merged) <= 2 * rel(q4_base, f32_base), (
        rel(q4_merged, f32_merged),
        rel(q4_base, f32_base),
    )


def test_tied_embeddings_stay_tied(case: Case, tmp_path: Path):
    if not tm.ARCH_TIED[case.arch]:
        assert "output.weight" in tm.gguf_tensors(case.base_gguf)
        return
    av = AlignmentVector(case.av)
    assert "output.weight" not in tm.gguf_tensors(case.base_gguf)
    assert "token_embd.weight" in av.names and "output.weight" not in av.names
    merged = merge(case.base_gguf, {case.av: 0.5}, tmp_path / "m.gguf").path
    names = [t.name for t in GGUFReader(merged).tensors]
    assert "output.weight" not in names and names.count("token_embd.weight") == 1


# --- Gemma 3's vocabulary, float16 arithmetic, unsupported architectures, streaming ---


def test_gemma3_token_embd_is_cut_to_the_tokenizer_vocabulary(llama_src: Path, tokenizer: Path, tmp_path: Path):
    """An embedding padded past the vocabulary (384 rows, 320 tokens) is cut as llama.cpp cuts it."""
    base = tm.make_model(tm.arch_config("Gemma3ForCausalLM", vocab_size=384), 21)
    aligned = tm.tie(base, tm.perturbed(base, 22))
    dirs = [tm.save(base, None, tmp_path / "base", tokenizer), tm.save(base, aligned, tmp_path / "aligned", tokenizer)]
    for d in dirs:
        config = json.loads((d / "config.json").read_text())
        config["vocab_size"] = tm.VOCAB
        (d / "config.json").write_text(json.dumps(config))
    ggufs = tm.hf_to_gguf_all(llama_src, [(d, tmp_path / f"{d.name}.gguf") for d in dirs])
    av = convert(dirs[0], dirs[1], tmp_path / "v.avec.gguf").path
    assert AlignmentVector(av).shape("token_embd.weight") == (tm.VOCAB, 256)
    tm.assert_layout_oracle(av, ggufs[0], ggufs[1])


def test_gemma3_vocabulary_from_tokenizer_json(tmp_path: Path):
    """Without tokenizer.model, llama.cpp counts tokenizer.json's vocabulary and added tokens."""
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"model": {"vocab": {f"t{i}": i for i in range(300)}}, "added_tokens": [{"id": 300}, {"id": 301}]})
    )
    layout = Layout("Gemma3ForCausalLM", {"num_hidden_layers": 2, "vocab_size": 384}, tmp_path)
    embed = torch.randn(384, 8)
    assert layout.transform("model.embed_tokens.weight", embed).shape == (302, 8)
    assert layout.gguf_shape(layout.plan(["model.embed_tokens.weight"])[0], (384, 8)) == (302, 8)


def test_float16_checkpoint_rounds_like_llama_cpp(llama_src: Path, tokenizer: Path, tmp_path: Path):
    """llama.cpp adds Gemma's +1 in float16 for float16 checkpoints; the vector rounds the same way."""
    base = tm.make_model(tm.arch_config("Gemma2ForCausalLM"), 31)
    aligned = tm.tie(base, tm.perturbed(base, 32))
    base_dir = tm.save(base.half(), None, tmp_path / "base", tokenizer)
    aligned_model = type(base)(base.config).eval()
    aligned_model.load_state_dict(aligned)
    aligned_dir = tm.save(aligned_model.half(), None, tmp_path / "aligned", tokenizer)
    b, a = tm.hf_to_gguf_all(llama_src, [(d, tmp_path / f"{d.name}.gguf") for d in (base_dir, aligned_dir)])
    av = convert(base_dir, aligned_dir, tmp_path / "v.avec.gguf").path
    tm.assert_layout_oracle(av, b, a)


def test_unsupported_architecture_is_refused_with_the_supported_list(llama_pair, tmp_path: Path, capsys):
    model_dir = tmp_path / "falcon"
    shutil.copytree(llama_pair.base_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompatibilityError, match="FalconForCausalLM"):
        convert(model_dir, model_dir, tmp_path / "v.avec.gguf")
    assert main(["convert", str(model_dir), str(model_dir), "-o", str(tmp_path / "v.avec.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(arch in err[0] for arch in ARCHITECTURES), err
    assert not (tmp_path / "v.avec.gguf").exists()


def test_streams_one_tensor_at_a_time(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """At most one source tensor per checkpoint is alive at a time (experts too), and shards are released."""
    live: set[int] = set()
    peak = 0
    tensor = Checkpoint.tensor

    def tracked(self: Checkpoint, name: str) -> torch.Tensor:
        nonlocal peak
        t = tensor(self, name)
        key = id(t)
        live.add(key)
        weakref.finalize(t, live.discard, key)
        peak = max(peak, len(live))
        return t

    monkeypatch.setattr(Checkpoint, "tensor", tracked)
    convert(case.base_dir, case.aligned_dir, tmp_path / "v.avec.gguf")
    assert peak <= 2, peak
