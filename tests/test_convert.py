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
