"""Hub ids (``org/name[@revision]``) against a local Hugging Face cache, offline; pickle checkpoints.

The cache is filled the way ``huggingface_hub`` fills it (blobs, snapshots/<commit>, refs) with a
sharded bf16 base and aligned pair, and the CLI runs in a fresh process with ``HF_HUB_OFFLINE=1``: the
vector must equal llama.cpp's conversion of the two snapshots and record the resolved commits.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from alignvec_gguf import AlignmentVector, FormatError, InputError
from alignvec_gguf.cli import main
from converters import convert
from converters.hub import parse_hub_id, resolve
from tests.support import REPO
from tests.support import tinymodels as tm
from tests.support.oracle import field


def save_bf16_sharded(llama_pair, state: dict, path: Path) -> Path:
    model = copy.deepcopy(llama_pair.base_model)
    model.load_state_dict(state)
    tok = llama_pair.base_dir / "tokenizer.model"
    return tm.save(model.to(torch.bfloat16), None, path, tok, max_shard_size="300KB")


def save_pickle(llama_pair, state: dict, path: Path) -> Path:
    """A sharded pytorch_model*.bin checkpoint (transformers 5 no longer writes these itself)."""
    path.mkdir(parents=True)
    llama_pair.base_model.config.save_pretrained(path)
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, keys in shards.items():
        torch.save({k: state[k].contiguous() for k in keys}, path / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture(scope="session")
def hub(llama_pair, llama_src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A Hugging Face cache with acme/tiny-base (main) and acme/tiny-dpo (main, tag v1), sharded bf16."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    base_dir = save_bf16_sharded(llama_pair, llama_pair.base_model.state_dict(), root / "src-base")
    aligned_dir = save_bf16_sharded(llama_pair, llama_pair.aligned_state, root / "src-dpo")
    assert (base_dir / "model.safetensors.index.json").is_file() and len(list(base_dir.glob("*.safetensors"))) > 2
    commits = {
        "acme/tiny-base": tm.fill_hf_cache(cache, "acme/tiny-base", base_dir),
        "acme/tiny-dpo": tm.fill_hf_cache(cache, "acme/tiny-dpo", aligned_dir, refs=("main", "v1")),
    }
    oracle = tm.hf_to_gguf_all(llama_src, [(base_dir, root / "base.gguf"), (aligned_dir, root / "dpo.gguf")])
    return {"root": root, "cache": cache, "commits": commits, "base_gguf": oracle[0], "aligned_gguf": oracle[1]}


@pytest.fixture
def offline(hub, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process, offline, with the filled cache as its Hugging Face cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub["cache"]


def test_cli_converts_hub_ids_offline_and_records_the_commits(hub, tmp_path: Path):
    out = tmp_path / "dpo.avec.gguf"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(hub["cache"]),
        HF_HOME=str(tmp_path / "hf-home"),
        PYTHONPATH=str(REPO),
    )
    result = subprocess.run(
        [sys.executable, "-m", "alignvec_gguf.cli", "-q", "convert", "acme/tiny-base", "acme/tiny-dpo@v1", "-o", out],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    reader = GGUFReader(out)
    assert field(reader, "alignvec.base.source") == f"acme/tiny-base@{hub['commits']['acme/tiny-base']}"
    assert field(reader, "alignvec.aligned.source") == f"acme/tiny-dpo@{hub['commits']['acme/tiny-dpo']}"
    assert field(reader, "alignvec.name") == "tiny-dpo"
    # the sharded bf16 snapshots land exactly on llama.cpp's conversion of the same files
    base, aligned = (
        {t.name: np.asarray(t.data, dtype=np.float32) for t in GGUFReader(p).tensors}
        for p in (hub["base_gguf"], hub["aligned_gguf"])
    )
    av = AlignmentVector(out)
    for name in base:
        expected = aligned[name] - base[name]
        got = av.delta(name) if name in av.names else np.zeros_like(expected)
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_revisions_resolve_to_commits_in_the_cache(hub, offline: Path):
    commit = hub["commits"]["acme/tiny-dpo"]
    for spec in ("acme/tiny-dpo", "acme/tiny-dpo@main", "acme/tiny-dpo@v1", f"acme/tiny-dpo@{commit}"):
        ref = resolve(spec, "aligned")
        assert ref.source == f"acme/tiny-dpo@{commit}" and ref.path.name == commit and ref.name == "tiny-dpo"
    assert parse_hub_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    assert parse_hub_id("not a hub id") is None and parse_hub_id("a/b/c") is None


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("acme/missing", "HF_HUB_OFFLINE is set"),
        ("acme/tiny-dpo@v2", "HF_HUB_OFFLINE is set"),
        ("./no/such/dir/at/all", "does not exist"),
    ],
)
def test_unresolvable_sources_are_one_line_errors(llama_pair, offline: Path, tmp_path: Path, capsys, spec, needle):
    with pytest.raises(InputError, match=needle):
        resolve(spec, "aligned")
    capsys.readouterr()
    assert main(["convert", str(llama_pair.base_dir), spec, "-o", str(tmp_path / "v.avec.gguf")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and needle in err[0], err


def test_only_what_the_converter_reads_is_downloaded(hub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import huggingface_hub

    calls: list[tuple[str | None, list[str]]] = []
    snapshot = Path(hub["cache"]) / "models--acme--tiny-base" / "snapshots" / hub["commits"]["acme/tiny-base"]
    pickle_only = tmp_path / "snapshots" / ("ab" * 20)
    pickle_only.mkdir(parents=True)
    (pickle_only / "config.json").write_text("{}")

    def fake(repo_id: str, *, revision=None, allow_patterns=None, cache_dir=None):  # noqa: ANN001
        calls.append((revision, list(allow_patterns)))
        return str(snapshot if repo_id == "acme/tiny-base" else pickle_only)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    resolve("acme/tiny-base@main", "base")
    (revision, patterns) = calls[-1]
    assert revision == "main"
    assert {"config.json", "model*.safetensors", "model.safetensors.index.json", "tokenizer.model"} <= set(patterns)
    assert not any(p.endswith(".bin") or p == "*" or p.startswith("*.") for p in patterns), patterns
    with pytest.raises(InputError, match="--allow-pickle"):
        resolve("acme/old", "base")
    calls.clear()
    resolve("acme/old", "base", allow_pickle=True)
    assert calls[-1] == ("ab" * 20, ["pytorch_model*.bin", "pytorch_model.bin.index.json"])  # pinned to the commit


def test_pickle_checkpoints_need_allow_pickle(llama_pair, tmp_path: Path, capsys):
    base = save_pickle(llama_pair, llama_pair.base_model.state_dict(), tmp_path / "base-bin")
    aligned = save_pickle(llama_pair, llama_pair.aligned_state, tmp_path / "aligned-bin")
    out = tmp_path / "v.avec.gguf"
    capsys.readouterr()
    assert main(["convert", str(base), str(aligned), "-o", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--allow-pickle" in err[0] and not out.exists()
    assert main(["-q", "convert", str(base), str(aligned), "-o", str(out), "--allow-pickle"]) == 0
    # the same weights as the safetensors pair: the same vector
    ours, ref = AlignmentVector(out), AlignmentVector(llama_pair.av)
    assert sorted(ours.names) == sorted(ref.names)
    for name in ref.names:
        np.testing.assert_array_equal(ours.delta(name), ref.delta(name), err_msg=name)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def test_pickle_payloads_are_not_executed(llama_pair, tmp_path: Path):
    """--allow-pickle loads with weights_only=True: a pickle that would run code is refused."""
    model_dir = tmp_path / "evil"
    model_dir.mkdir()
    llama_pair.base_model.config.save_pretrained(model_dir)
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, model_dir / "pytorch_model.bin")
    with pytest.raises(FormatError, match="not a readable pickle file"):
        convert(model_dir, model_dir, tmp_path / "v.avec.gguf", allow_pickle=True)
    assert not marker.exists()
