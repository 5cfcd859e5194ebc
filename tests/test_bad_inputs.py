"""Bad inputs, one row each: exit status 2, exactly one stderr line, no traceback, nothing written.

Rows already covered elsewhere are not repeated: tests/test_errors.py (broken vector files, -v without
'=', λ 'abc' / 'nan', missing base / vector / output directory, output over the base, an unknown
--requant, an unknown subcommand, a missing or unsupported HF directory, hidden_size mismatch, a
truncated single-file safetensors), tests/test_hub.py (pickle-only checkpoints refused without
--allow-pickle, pickle payloads not run, unresolvable hub ids, downloads limited to the converter's
files) and tests/test_cli.py (write failures: ENOSPC and EACCES from the writer).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from alignvec_gguf.cli import main
from alignvec_gguf.cli.app import one_line
from tests.support import tinymodels as tm
from tests.support.commands import assert_one_line_error, run_main
from tests.support.files import sha256


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (hidden ones too) with its size and mtime."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Callable[..., str]:
    """Run the CLI in this process; assert status 2, one stderr line, no traceback, no file written."""

    def run(*argv: object, needles: tuple[str, ...] = ()) -> str:
        before = snapshot(tmp_path)
        line = assert_one_line_error(*run_main(capsys, "-q", *argv), *needles)
        assert snapshot(tmp_path) == before, "something was written"
        return line

    return run


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(model_dir: Path, **changes: object) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def sharded(llama_pair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The aligned checkpoint saved in several safetensors shards with an index."""
    root = tmp_path_factory.mktemp("sharded")
    model = type(llama_pair.base_model)(llama_pair.base_model.config).eval()
    model.load_state_dict(llama_pair.aligned_state)
    path = tm.save(model, None, root / "aligned", llama_pair.base_dir / "tokenizer.model", max_shard_size="300KB")
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 2
    return path


# --- Hugging Face directories -------------------------------------------------------------------


def convert_fails(cli, llama_pair, aligned: Path, tmp_path: Path, *needles: str, base: Path | None = None) -> str:
    return cli("convert", base or llama_pair.base_dir, aligned, "-o", tmp_path / "v.avec.gguf", needles=needles)


def test_index_names_a_missing_shard(cli, llama_pair, sharded, tmp_path):
    aligned = copy_dir(sharded, tmp_path / "aligned")
    victim = sorted(aligned.glob("model-*.safetensors"))[1]
    victim.unlink()
    convert_fails(cli, llama_pair, aligned, tmp_path, "missing shard", victim.name)


@pytest.mark.parametrize("keep", [0, 8, 200, "half"], ids=["empty", "length-only", "cut-header", "cut-data"])
def test_truncated_shard(cli, llama_pair, sharded, tmp_path, keep):
    aligned = copy_dir(sharded, tmp_path / "aligned")
    shard = sorted(aligned.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 if keep == "half" else keep])
    convert_fails(cli, llama_pair, aligned, tmp_path, shard.name)


def test_truncated_base(cli, llama_pair, tmp_path):
    base = copy_dir(llama_pair.base_dir, tmp_path / "base")
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    convert_fails(cli, llama_pair, llama_pair.aligned_dir, tmp_path, "base", base=base)


def test_different_architecture(cli, llama_pair, tmp_path):
    aligned = copy_dir(llama_pair.aligned_dir, tmp_path / "aligned")
    edit_config(aligned, architectures=["MistralForCausalLM"], model_type="mistral")
    convert_fails(cli, llama_pair, aligned, tmp_path, "LlamaForCausalLM", "MistralForCausalLM")


def test_different_vocab_in_config(cli, llama_pair, tmp_path):
    aligned = copy_dir(llama_pair.aligned_dir, tmp_path / "aligned")
    edit_config(aligned, vocab_size=tm.VOCAB + 64)
    convert_fails(cli, llama_pair, aligned, tmp_path, "vocab_size")


def test_different_vocab_in_weights(cli, llama_pair, tokenizer, tmp_path):
    """The config says the same vocabulary, the embedding does not: the shapes are compared too."""
    wide = tm.make_model(tm.llama_config(vocab_size=tm.VOCAB + 64), 3)
    aligned = tm.save(wide, None, tmp_path / "aligned", tokenizer)
    shutil.copy(llama_pair.base_dir / "config.json", aligned / "config.json")
    convert_fails(cli, llama_pair, aligned, tmp_path, "shape", f"({tm.VOCAB + 64}, 256) in aligned")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8], ids=["float64", "int8"])
def test_unsupported_dtype(cli, llama_pair, tmp_path, dtype):
    aligned = copy_dir(llama_pair.aligned_dir, tmp_path / "aligned")
    weights = aligned / "model.safetensors"
    state = load_file(weights)
    name = "model.layers.1.self_attn.q_proj.weight"
    state[name] = state[name].to(dtype)
    save_file(state, weights, metadata={"format": "pt"})
    line = convert_fails(cli, llama_pair, aligned, tmp_path, name)
    assert {torch.float64: "F64", torch.int8: "I8"}[dtype] in line and "F32, F16 and BF16" in line


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda d: (d / "config.json").unlink(), "has no config.json"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "model.safetensors").unlink(), "no model*.safetensors"),
        (lambda d: (d / "model.safetensors.index.json").write_text("[]"), "model.safetensors.index.json"),
        (lambda d: shutil.rmtree(d) or d.write_text("a file"), "not a directory"),
    ],
    ids=["no-config", "bad-config", "no-weights", "bad-index", "file-not-dir"],
)
def test_broken_model_directory(cli, llama_pair, tmp_path, damage, needle):
    aligned = copy_dir(llama_pair.aligned_dir, tmp_path / "aligned")
    damage(aligned)
    convert_fails(cli, llama_pair, aligned, tmp_path, needle)


# --- command line -------------------------------------------------------------------------------


@pytest.fixture
def base(quantized_bases, tmp_path: Path) -> Path:
    path = tmp_path / "base.gguf"
    shutil.copy(quantized_bases["Q8_0"], path)
    return path


@pytest.mark.parametrize(
    "value, needle",
    [("", "not a number"), ("1,5", "not a number"), ("inf", "finite"), ("-inf", "finite"), ("1e999", "finite")],
)
def test_lambda_values(cli, llama_pair, base, tmp_path, value, needle):
    cli("merge", base, "-v", f"{llama_pair.av}={value}", "-o", tmp_path / "m.gguf", needles=(needle,))


def test_vector_given_twice(cli, llama_pair, base, tmp_path):
    av = llama_pair.av
    cli("merge", base, "-v", f"{av}=1", "-v", f"{av}=2", "-o", tmp_path / "m.gguf", needles=("given twice",))


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["run", "{missing}", "-v", "{av}=1", "-p", "x"], ("missing.gguf", "does not exist")),
        (["inspect", "{missing}"], ("missing.gguf", "does not exist")),
        (["merge", "{base}", "-v", "{av}=1", "-o", "{out}", "--imatrix", "{missing}"], ("missing.gguf",)),
        (["merge", "{base}", "-v", "{av}=1", "-o", "{out}", "--full-base", "{missing}"], ("missing.gguf",)),
        (["convert", "{hf}", "{tmp}/nope", "-o", "{out}"], ("nope", "does not exist")),
    ],
    ids=["run-base", "inspect", "imatrix", "full-base", "convert-aligned"],
)
def test_missing_paths(cli, llama_pair, base, tmp_path, argv, needles):
    values = {
        "missing": tmp_path / "missing.gguf",
        "av": llama_pair.av,
        "base": base,
        "out": tmp_path / "m.gguf",
        "hf": llama_pair.base_dir,
        "tmp": tmp_path,
    }
    cli(*(a.format(**values) for a in argv), needles=needles)


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["merge", "{dir}", "-v", "{av}=1", "-o", "{out}"], ("is not a file",)),
        (["run", "{dir}", "-v", "{av}=1", "-p", "x"], ("is not a file",)),
        (["run", "{dir}", "-v", "{av}=0", "-p", "x"], ("is not a file",)),
        (["merge", "{base}", "-v", "{dir}=1", "-o", "{out}"], ("is a directory",)),
        (["merge", "{base}", "-v", "{av}=1", "-o", "{dir}"], ("is a directory",)),
        (["convert", "{hf}", "{hf}", "-o", "{dir}"], ("is a directory",)),
        (["inspect", "{dir}"], ("is not a file",)),
    ],
    ids=["merge-base", "run-base", "run-base-lambda-0", "vector", "merge-output", "convert-output", "inspect"],
)
def test_directory_where_a_file_belongs(cli, llama_pair, base, tmp_path, argv, needles):
    folder = tmp_path / "folder"
    folder.mkdir()
    values = {"dir": folder, "av": llama_pair.av, "base": base, "out": tmp_path / "m.gguf", "hf": llama_pair.base_dir}
    cli(*(a.format(**values) for a in argv), needles=needles)


def test_file_where_the_output_directory_belongs(cli, llama_pair, base, tmp_path):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "m.gguf"
    cli("merge", base, "-v", f"{llama_pair.av}=1", "-o", out, needles=("afile", "not a directory"))
    cli("convert", llama_pair.base_dir, llama_pair.aligned_dir, "-o", out, needles=("not a directory",))


def unwritable_directory(tmp_path: Path) -> Path:
    """A directory this process cannot create files in: chmod, or for root (whom chmod does not stop) /proc."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        (folder / "probe").touch()
    except PermissionError:
        return folder
    (folder / "probe").unlink()
    folder.chmod(0o700)
    folder.rmdir()
    return Path("/proc")


def test_unwritable_output_directory(cli, llama_pair, base, tmp_path):
    folder = unwritable_directory(tmp_path)
    try:
        line = cli("merge", base, "-v", f"{llama_pair.av}=1", "-o", folder / "m.gguf", needles=(str(folder),))
        assert "cannot create a file" in line and ".tmp" not in line  # the temporary's name is noise
        cli("convert", llama_pair.base_dir, llama_pair.aligned_dir, "-o", folder / "v.avec.gguf")
    finally:
        if folder.is_relative_to(tmp_path):
            folder.chmod(0o700)
    assert not list(folder.glob(".*.tmp"))


@pytest.mark.parametrize("kind", ["hardlink", "symlink", "vector"])
def test_output_that_is_an_input(cli, llama_pair, base, tmp_path, kind):
    av = tmp_path / "v.avec.gguf"
    shutil.copy(llama_pair.av, av)
    before = {p: sha256(p) for p in (base, av)}
    out = tmp_path / "out.gguf"
    if kind == "hardlink":
        os.link(base, out)
    elif kind == "symlink":
        out.symlink_to(base)
    else:
        out = av
    line = cli("merge", base, "-v", f"{av}=1", "-o", out)
    assert ("alignment vector" if kind == "vector" else "base") in line
    assert {p: sha256(p) for p in (base, av)} == before


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["merge", "{base}", "-v", "{av}=1", "-o", "{out}", "--frob"], ("unrecognized arguments: --frob",)),
        (["run", "{base}", "-p", "x", "-n", "many"], ("-n", "invalid int value")),
        (["convert", "{hf}", "{hf}", "-o", "{out}", "--dtype", "q4_0"], ("--dtype", "invalid choice")),
        (["convert", "{hf}", "{hf}", "-o", "{out}", "--rank", "0"], ("--rank",)),
        (["convert", "{hf}", "{hf}", "-o", "{out}", "--energy", "nan"], ("--energy",)),
        (["cache", "frob"], ("invalid choice",)),
    ],
    ids=["unknown-option", "bad-int", "bad-dtype", "rank-0", "energy-nan", "cache-action"],
)
def test_bad_options(cli, llama_pair, base, tmp_path, argv, needles):
    values = {"av": llama_pair.av, "base": base, "out": tmp_path / "m.gguf", "hf": llama_pair.base_dir}
    cli(*(a.format(**values) for a in argv), needles=needles)


def test_metadata_cannot_break_the_one_line(cli, llama_pair, base, tmp_path):
    """A vector's metadata ends up in messages: newlines and terminal escapes are shown escaped."""
    from alignvec_gguf.avfile import AlignmentVector, AVInfo, write_av

    av = AlignmentVector(llama_pair.av)
    info = AVInfo(**{**av.info.__dict__, "architecture": "qwen2\n\x1b[2J\x00evil"})
    bad = tmp_path / "evil.avec.gguf"
    write_av(bad, info.architecture, [(n, av.delta(n)) for n in av.names], info)
    line = cli("merge", base, "-v", f"{bad}=1", "-o", tmp_path / "m.gguf")
    assert "\x1b" not in line and "\x00" not in line and "qwen2" in line
    assert one_line("a\nb\x1b[0m\u2028c" + "x" * 5000).count("\n") == 0
    assert len(one_line("x" * 50_000)) < 2100


# --- supply chain: what a downloaded vector says about itself never reaches a path ---------------

HOSTILE = {
    "name": "../../x",
    "description": "/etc/passwd",
    "domain": "a\x00b/../../y",
    "base_source": "../../../../tmp/evil",
    "aligned_source": "z" * 100_000,
}
ENTRY = r"[A-Za-z0-9._-]{1,64}\.[0-9a-f]{20}\.(gguf|json)"


def test_vector_metadata_never_reaches_a_path(llama_pair, quantized_bases, tmp_path, monkeypatch):
    from alignvec_gguf.avfile import AlignmentVector, AVInfo, write_av
    from alignvec_gguf.cache import cached_merge

    av = AlignmentVector(llama_pair.av)
    hostile = tmp_path / "hostile.avec.gguf"
    write_av(
        hostile, av.info.architecture, [(n, av.delta(n)) for n in av.names], AVInfo(**{**av.info.__dict__, **HOSTILE})
    )
    assert AlignmentVector(hostile).info.name == "../../x"
    # a base whose own file name is long and odd: the entry takes a shortened, sanitized copy of it
    base = tmp_path / ("b a$(x)é" * 26 + ".gguf")  # 239 bytes: too long for the old entry temporaries
    shutil.copy(quantized_bases["Q8_0"], base)
    workdir = tmp_path / "w" / "o" / "r" / "k"  # where relative paths in the metadata would land
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    before = snapshot(tmp_path)

    entry = cached_merge(base, {hostile: 0.5}, cache_dir=tmp_path / "cache")
    assert main(["-q", "merge", str(base), "-v", f"{hostile}=0.5", "-o", str(tmp_path / "out.gguf")]) == 0

    new = set(snapshot(tmp_path)) - set(before)
    assert new - {"out.gguf"} == {f"cache/{p.name}" for p in (tmp_path / "cache").iterdir()}
    cache_files = {p.name for p in (tmp_path / "cache").iterdir()}
    made = {name for name in cache_files if re.fullmatch(ENTRY, name)}
    assert {entry.name, entry.with_suffix(".json").name} == made
    assert cache_files - made <= {".lock", "digests.json", f".{entry.name}.lock"}
    assert entry.name.startswith("b_a_x_") and len(entry.name) <= 64 + 26


def test_hub_and_pickle_safety_are_covered_in_test_hub():
    """Hub downloads are limited to what the converter reads and pickle needs --allow-pickle (weights_only):
    tests/test_hub.py::test_only_what_the_converter_reads_is_downloaded and the two pickle tests."""
    from tests import test_hub

    assert callable(test_hub.test_only_what_the_converter_reads_is_downloaded)
    assert callable(test_hub.test_pickle_checkpoints_need_allow_pickle)
    assert callable(test_hub.test_pickle_payloads_are_not_executed)
