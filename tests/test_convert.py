"""The converter: Δ in GGUF layout equals llama.cpp's conversion T(aligned) − T(base), and the file format."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader

from alignvec_gguf.avfile import AlignmentVector
from converters import convert
from tests.support import tinymodels as tm
from tests.support.oracle import field, gguf_signature


def test_delta_equals_llama_cpp_layout(llama_pair):
    tm.assert_layout_oracle(llama_pair.av, llama_pair.base_gguf, llama_pair.aligned_gguf)
    av = AlignmentVector(llama_pair.av)
    # untouched tensors are left out; q/k were permuted (the oracle would fail otherwise)
    assert "token_embd.weight" not in av.names and "blk.0.ffn_up.weight" not in av.names
    assert "blk.0.attn_q.weight" in av.names and "blk.1.attn_k.weight" in av.names


def test_metadata_is_complete(llama_pair):
    reader = GGUFReader(llama_pair.av)
    assert field(reader, "general.type") == "adapter"
    assert field(reader, "adapter.type") == "alignment_vector"
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "alignvec.format_version") == 1
    assert field(reader, "alignvec.form") == "full"
    assert field(reader, "alignvec.domain") == "medical"
    assert field(reader, "alignvec.name") == "aligned"
    assert field(reader, "alignvec.producer").startswith("alignvec-gguf ")
    assert field(reader, "alignvec.base.source") == str(llama_pair.base_dir.resolve())
    assert field(reader, "alignvec.aligned.source") == str(llama_pair.aligned_dir.resolve())
    assert field(reader, "alignvec.base.signature") == gguf_signature(GGUFReader(llama_pair.base_gguf))
    assert len(field(reader, "alignvec.base.fingerprint")) == 64


@pytest.mark.parametrize("dtype,qtype,tol", [("f16", QT.F16, 1e-3), ("bf16", QT.BF16, 8e-3), ("q8_0", QT.Q8_0, 8e-3)])
def test_storage_types(llama_pair, tmp_path, dtype, qtype, tol):
    out = convert(llama_pair.base_dir, llama_pair.aligned_dir, tmp_path / f"v-{dtype}.avec.gguf", dtype=dtype)
    ref, av = AlignmentVector(llama_pair.av), AlignmentVector(out.path)
    assert av.names == ref.names
    for name in av.names:
        expected = ref.delta(name)
        assert av.storage_type(name) == (QT.F32 if expected.ndim == 1 else qtype)
        err = np.abs(av.delta(name) - expected).max()
        assert err <= tol * np.abs(expected).max(), (name, err)


def test_sharded_bf16_checkpoints(llama_pair, llama_src, tmp_path):
    """Sharded bf16 checkpoints stream and land on llama.cpp's layout of the same bf16 weights."""
    tok = llama_pair.base_dir / "tokenizer.model"

    def save_bf16(state, path):
        model = copy.deepcopy(llama_pair.base_model)
        model.load_state_dict(state)
        return tm.save(model.to(torch.bfloat16), None, path, tok, max_shard_size="300KB")

    base_dir = save_bf16(llama_pair.base_model.state_dict(), tmp_path / "base-bf16")
    aligned_dir = save_bf16(llama_pair.aligned_state, tmp_path / "aligned-bf16")
    assert (base_dir / "model.safetensors.index.json").is_file() and len(list(base_dir.glob("*.safetensors"))) > 2
    out = convert(base_dir, aligned_dir, tmp_path / "bf16.avec.gguf")
    b = tm.hf_to_gguf(llama_src, base_dir, tmp_path / "b.gguf")
    a = tm.hf_to_gguf(llama_src, aligned_dir, tmp_path / "a.gguf")
    tm.assert_layout_oracle(out.path, b, a)


def test_mistral_layout(llama_src, tokenizer, tmp_path):
    base = tm.make_model(tm.llama_config("MistralForCausalLM"), 3)
    aligned = tm.perturbed(base, 4)
    base_dir = tm.save(base, None, tmp_path / "base", tokenizer)
    aligned_dir = tm.save(base, aligned, tmp_path / "aligned", tokenizer)
    out = convert(base_dir, aligned_dir, tmp_path / "m.avec.gguf")
    b = tm.hf_to_gguf(llama_src, base_dir, tmp_path / "b.gguf")
    a = tm.hf_to_gguf(llama_src, aligned_dir, tmp_path / "a.gguf")
    tm.assert_layout_oracle(out.path, b, a)
    assert field(GGUFReader(out.path), "general.architecture") == "llama"


def test_identical_checkpoints_give_an_empty_vector(llama_pair, tmp_path):
    out = convert(llama_pair.base_dir, llama_pair.base_dir, tmp_path / "zero.avec.gguf")
    assert out.tensors_written == 0 and AlignmentVector(out.path).names == []


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_a_planned_vector_is_written_once_with_the_spooled_files_bytes(llama_pair, tmp_path, dtype):
    """write_av(planned=...) writes the header first and each tensor once: the same file as the spooled path,
    with a zero delta (left out by writing the file again) and without one (placeholders patched in place)."""
    from alignvec_gguf.avfile import write_av

    av = AlignmentVector(llama_pair.av)
    deltas = [(n, av.delta(n)) for n in av.names]
    with_zero = deltas[:2] + [(deltas[2][0], np.zeros_like(deltas[2][1]))] + deltas[3:]
    for case, items in (("dense", deltas), ("zero", with_zero)):
        spooled, planned = tmp_path / f"{case}-spooled.avec.gguf", tmp_path / f"{case}-planned.avec.gguf"
        n_spooled = write_av(spooled, av.info.architecture, iter(items), lambda: av.info, dtype=dtype)
        plan = [(n, d.shape) for n, d in items]
        n_planned = write_av(planned, av.info.architecture, iter(items), lambda: av.info, dtype=dtype, planned=plan)
        assert n_planned == n_spooled == len(items) - (case == "zero")
        assert planned.read_bytes() == spooled.read_bytes(), case
        assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name or p.name.endswith(".final")]


def test_a_planned_vector_that_is_not_what_was_planned_leaves_no_file(llama_pair, tmp_path):
    from alignvec_gguf.avfile import write_av
    from alignvec_gguf.errors import FormatError

    av = AlignmentVector(llama_pair.av)
    deltas = [(n, av.delta(n)) for n in av.names]
    plan = [(n, d.shape) for n, d in deltas]
    out = tmp_path / "v.avec.gguf"
    with pytest.raises(ValueError, match="tensor 1 should be"):
        write_av(out, av.info.architecture, iter([deltas[0], deltas[2]]), av.info, planned=plan)
    with pytest.raises(ValueError, match="planned, 1 given"):
        write_av(out, av.info.architecture, iter(deltas[:1]), av.info, planned=plan)
    bad = deltas[1][1].copy()
    bad.flat[3] = np.nan
    with pytest.raises(FormatError, match="NaN"):
        write_av(out, av.info.architecture, iter([deltas[0], (deltas[1][0], bad)]), av.info, planned=plan[:2])
    assert list(tmp_path.iterdir()) == []
