"""Bad input: exit status 2, one line that says what to do, and the user's files untouched."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from alignvec_gguf.avfile import AlignmentVector, AVInfo, write_av
from tests.support import oracle
from tests.support import tinymodels as tm
from tests.support.commands import assert_one_line_error
from tests.support.files import sha256


def _bad_av(llama_pair, tmp_path, name: str, **changes) -> str:
    """A copy of the test vector with different metadata or tensors."""
    av = AlignmentVector(llama_pair.av)
    info = {**av.info.__dict__, **changes.pop("info", {})}
    arch = info["architecture"]
    deltas = changes.pop("deltas", None) or [(n, av.delta(n)) for n in av.names]
    out = tmp_path / name
    write_av(out, arch, deltas, AVInfo(**info))
    return str(out)


@pytest.fixture
def base_copy(llama_pair, quantized_bases, tmp_path):
    path = tmp_path / "base.gguf"
    shutil.copy(quantized_bases["Q4_K_M"], path)
    return path


def check_merge_error(run_cli, base, av, tmp_path, *needles, spec=None) -> None:
    before = sha256(base)
    out = tmp_path / "merged.gguf"
    rc, err = run_cli("merge", base, "-v", spec or f"{av}=0.5", "-o", out)
    assert_one_line_error(rc, err, *needles)
    assert sha256(base) == before
    assert not out.exists()
    assert not list(tmp_path.glob(".merged.gguf.*")), "a temporary file was left behind"


def test_wrong_architecture(run_cli, llama_pair, base_copy, tmp_path):
    av = _bad_av(llama_pair, tmp_path, "qwen.avec.gguf", info={"architecture": "qwen2"})
    check_merge_error(run_cli, base_copy, av, tmp_path, "architecture 'qwen2'", "convert")


def test_wrong_shapes(run_cli, llama_pair, base_copy, tmp_path):
    wide = [("blk.0.attn_q.weight", np.ones((256, 512), dtype=np.float32))]
    av = _bad_av(llama_pair, tmp_path, "wide.avec.gguf", deltas=wide)
    check_merge_error(run_cli, base_copy, av, tmp_path, "blk.0.attn_q.weight", "shape")


def test_unknown_tensor(run_cli, llama_pair, base_copy, tmp_path):
    extra = [("blk.9.attn_q.weight", np.ones((256, 256), dtype=np.float32))]
    av = _bad_av(llama_pair, tmp_path, "extra.avec.gguf", deltas=extra)
    check_merge_error(run_cli, base_copy, av, tmp_path, "blk.9.attn_q.weight")


def test_signature_of_another_model(run_cli, llama_pair, base_copy, tmp_path):
    av = _bad_av(llama_pair, tmp_path, "sig.avec.gguf", info={"base_signature": "0" * 64})
    check_merge_error(run_cli, base_copy, av, tmp_path, "different tensor layout")


def test_truncated_vector(run_cli, llama_pair, base_copy, tmp_path):
    av = tmp_path / "trunc.avec.gguf"
    data = llama_pair.av.read_bytes()
    av.write_bytes(data[: len(data) // 2])
    check_merge_error(run_cli, base_copy, av, tmp_path, "truncated")


def test_truncated_header(run_cli, llama_pair, base_copy, tmp_path):
    av = tmp_path / "head.avec.gguf"
    av.write_bytes(llama_pair.av.read_bytes()[:300])
    check_merge_error(run_cli, base_copy, av, tmp_path, "head.avec.gguf")


def test_corrupt_vector(run_cli, base_copy, tmp_path):
    av = tmp_path / "noise.avec.gguf"
    av.write_bytes(np.random.default_rng(0).bytes(4096))
    check_merge_error(run_cli, base_copy, av, tmp_path, "not a valid GGUF")


def test_model_given_as_vector(run_cli, base_copy, llama_pair, tmp_path):
    check_merge_error(run_cli, base_copy, llama_pair.base_gguf, tmp_path, "not an alignment vector")


def test_nan_in_vector(run_cli, llama_pair, base_copy, tmp_path):
    av = AlignmentVector(llama_pair.av)
    name = av.names[0]
    out = tmp_path / "nan.avec.gguf"
    shutil.copy(llama_pair.av, out)
    t = next(t for t in oracle.open_gguf(out).tensors if t.name == name)
    with open(out, "r+b") as f:  # poke a NaN into the first float of the first tensor
        f.seek(t.data_offset)
        f.write(np.array([np.nan], dtype=np.float32).tobytes())
    check_merge_error(run_cli, base_copy, out, tmp_path, "NaN")


@pytest.mark.parametrize(
    "spec,needle",
    [("{av}", "PATH=LAMBDA"), ("{av}=abc", "not a number"), ("{av}=nan", "finite"), ("=1", "PATH=LAMBDA")],
)
def test_bad_vector_syntax(run_cli, llama_pair, base_copy, tmp_path, spec, needle):
    check_merge_error(run_cli, base_copy, None, tmp_path, needle, spec=spec.format(av=llama_pair.av))


def test_missing_paths(run_cli, llama_pair, base_copy, tmp_path):
    check_merge_error(run_cli, base_copy, tmp_path / "nope.avec.gguf", tmp_path, "does not exist")
    rc, err = run_cli("merge", tmp_path / "nope.gguf", "-v", f"{llama_pair.av}=1", "-o", tmp_path / "o.gguf")
    assert_one_line_error(rc, err, "nope.gguf", "does not exist")
    rc, err = run_cli("merge", base_copy, "-v", f"{llama_pair.av}=1", "-o", tmp_path / "no" / "dir" / "o.gguf")
    assert_one_line_error(rc, err, "does not exist")


def test_output_over_base_is_refused(run_cli, llama_pair, base_copy):
    before = sha256(base_copy)
    rc, err = run_cli("merge", base_copy, "-v", f"{llama_pair.av}=1", "-o", base_copy)
    assert_one_line_error(rc, err, "base")
    assert sha256(base_copy) == before


def test_bad_requant_and_usage(run_cli, llama_pair, base_copy, tmp_path):
    rc, err = run_cli("merge", base_copy, "-v", f"{llama_pair.av}=1", "-o", tmp_path / "o.gguf", "--requant", "q9")
    assert_one_line_error(rc, err, "unknown requant policy 'q9'")
    for bad in ("calibrated:x", "calibrated:-1", "calibrated:nan"):
        rc, err = run_cli("merge", base_copy, "-v", f"{llama_pair.av}=1", "-o", tmp_path / "o.gguf", "--requant", bad)
        assert_one_line_error(rc, err, "noise budget")
    rc, err = run_cli("merge", base_copy)
    assert_one_line_error(rc, err, "required")
    rc, err = run_cli("frobnicate")
    assert_one_line_error(rc, err, "invalid choice")


def test_convert_errors(run_cli, llama_pair, tmp_path, tokenizer):
    out = tmp_path / "v.avec.gguf"
    rc, err = run_cli("convert", tmp_path / "missing", llama_pair.aligned_dir, "-o", out)
    assert_one_line_error(rc, err, "does not exist")
    # unsupported architecture
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(llama_pair.base_dir, gpt2)
    config = json.loads((gpt2 / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (gpt2 / "config.json").write_text(json.dumps(config))
    rc, err = run_cli("convert", gpt2, gpt2, "-o", out)
    assert_one_line_error(rc, err, "GPT2LMHeadModel", "LlamaForCausalLM")
    # mismatched configs and shapes
    other = tm.save(tm.make_model(tm.llama_config(hidden=512), 5), None, tmp_path / "wide", tokenizer)
    rc, err = run_cli("convert", llama_pair.base_dir, other, "-o", out)
    assert_one_line_error(rc, err, "hidden_size")
    # a checkpoint with a truncated safetensors file
    broken = tmp_path / "broken"
    shutil.copytree(llama_pair.aligned_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    rc, err = run_cli("convert", llama_pair.base_dir, broken, "-o", out)
    assert_one_line_error(rc, err, "broken")
    assert not out.exists()


def test_load_with_a_list_of_vectors_is_one_input_error(llama_pair):
    from alignvec_gguf import load
    from alignvec_gguf.errors import InputError

    with pytest.raises(InputError, match="vectors must map AV paths") as e:
        load(llama_pair.base_gguf, [llama_pair.av])  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


def test_merge_without_vectors_is_one_input_error(llama_pair, tmp_path):
    from alignvec_gguf import merge
    from alignvec_gguf.errors import InputError

    with pytest.raises(InputError, match="merge needs at least one alignment vector") as e:
        merge(llama_pair.base_gguf, {}, tmp_path / "out.gguf")
    assert "\n" not in str(e.value) and not (tmp_path / "out.gguf").exists()
