"""The merged-model cache: content keys, hashing the base once, one merge across processes, LRU eviction, CLI."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from alignvec_gguf import AlignmentVector
from alignvec_gguf import cache as cache_mod
from alignvec_gguf.atomic import file_lock
from alignvec_gguf.cache import MergeCache, cached_merge, parse_size
from alignvec_gguf.cli import main
from tests.support import tinymodels as tm
from tests.support.oracle import tensor_bytes


@pytest.fixture
def base(quantized_bases, tmp_path) -> Path:
    path = tmp_path / "base.Q4_K_M.gguf"
    shutil.copy(quantized_bases["Q4_K_M"], path)
    return path


def test_second_get_is_a_plain_lookup_and_the_base_is_hashed_once(llama_pair, base, tmp_path, monkeypatch):
    hashed: list[str] = []
    merges: list[Path] = []
    real_hash, real_merge, real_av_hash = cache_mod._sha256_file, cache_mod.merge, AlignmentVector.hash_file
    monkeypatch.setattr(cache_mod, "_sha256_file", lambda p: hashed.append(p.name) or real_hash(p))
    # a vector is hashed by reading it once, its content digest checked on the way
    monkeypatch.setattr(AlignmentVector, "hash_file", lambda av: hashed.append(av.path.name) or real_av_hash(av))
    monkeypatch.setattr(cache_mod, "merge", lambda *a, **k: merges.append(a[2]) or real_merge(*a, **k))
    c = MergeCache(tmp_path / "cache")
    first = c.get(base, {llama_pair.av: 0.5})
    assert sorted(hashed) == sorted([base.name, llama_pair.av.name]) and len(merges) == 1
    again = MergeCache(tmp_path / "cache").get(base, {llama_pair.av: 0.5})  # a new process would do the same
    assert again == first and len(merges) == 1 and len(hashed) == 2  # nothing hashed, nothing merged
    # the key is the content: another λ, policy or base content is another entry
    assert c.get(base, {llama_pair.av: 0.25}) != first
    assert c.get(base, {llama_pair.av: 0.5}, requant="hifi") != first
    meta = json.loads(first.with_suffix(".json").read_text())
    assert meta["lambdas"] == [0.5] and meta["base"] == str(base.resolve())
    with open(base, "r+b") as f:  # same size, new content and mtime: hashed again, merged again
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    os.utime(base, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert c.get(base, {llama_pair.av: 0.5}) != first
    assert hashed.count(base.name) == 2


def _merge_in_child(base: str, av: str, cache_dir: str, log: str) -> str:
    from alignvec_gguf import cache as cm

    real = cm.merge

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # widen the window in which the others arrive
        return real(*args, **kwargs)

    cm.merge = counted
    return str(cm.cached_merge(base, {av: 0.75}, cache_dir=cache_dir))


def test_concurrent_processes_merge_once_and_all_get_a_valid_file(llama_pair, base, tmp_path):
    log = tmp_path / "merges.log"
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        args = [(str(base), str(llama_pair.av), str(tmp_path / "cache"), str(log))] * 4
        paths = pool.starmap(_merge_in_child, args)
    assert len(set(paths)) == 1
    assert len(log.read_text().split()) == 1, "more than one process merged"
    reference = cached_merge(base, {llama_pair.av: 0.75}, cache_dir=tmp_path / "ref")
    got, want = GGUFReader(paths[0]), GGUFReader(reference)
    for a, b in zip(got.tensors, want.tensors, strict=True):
        assert np.array_equal(tensor_bytes(got, a), tensor_bytes(want, b))
    assert not list((tmp_path / "cache").glob(".*.tmp"))


def test_lru_eviction_keeps_the_bound_and_spares_entries_in_use(llama_pair, base, tmp_path):
    c = MergeCache(tmp_path / "cache", max_bytes=10**12)
    # requant "same": every entry has the base's types, so all four have one size and the bound counts entries
    paths = [c.get(base, {llama_pair.av: lam}, requant="same") for lam in (0.1, 0.2, 0.3)]
    size = paths[0].stat().st_size
    for i, p in enumerate(paths):  # distinct, ordered recencies
        os.utime(p, (1_000_000 + i, 1_000_000 + i))
    c.get(base, {llama_pair.av: 0.1}, requant="same")  # a hit makes the oldest the most recent
    c.max_bytes = 3 * size
    fourth = c.get(base, {llama_pair.av: 0.4}, requant="same")
    assert not paths[1].exists() and paths[0].exists() and paths[2].exists() and fourth.exists()
    assert c.total_bytes() <= c.max_bytes
    c.max_bytes = size  # only room for one: the entry in use and the newest stay
    with c.using(paths[2]):
        removed = c.evict(keep=fourth)
    assert paths[2].exists() and fourth.exists() and not paths[0].exists()
    assert {e.path for e in removed} == {paths[0]}
    with file_lock(c._lock_path(fourth), blocking=False) as taken:
        assert taken  # nothing is left locked


def test_cache_cli_and_environment(llama_pair, base, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALIGNVEC_CACHE_DIR", str(tmp_path / "envcache"))
    monkeypatch.setenv("ALIGNVEC_CACHE_MAX", "1G")
    path = cached_merge(base, {llama_pair.av: 0.5})
    assert path.parent == tmp_path / "envcache"
    (tmp_path / "envcache" / f".{path.name}.abcd1234.tmp").write_bytes(b"half a merge")  # a killed merge
    assert main(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert "1 merged models" in out and path.name in out and f"{llama_pair.av.name}=0.5" in out
    assert main(["cache", "clear"]) == 0
    assert "removed 1 merged models" in capsys.readouterr().out
    assert not list((tmp_path / "envcache").glob("*.gguf")) and not list((tmp_path / "envcache").glob(".*.tmp"))
    assert parse_size("512M") == 512 << 20 and parse_size("1.5G") == int(1.5 * (1 << 30))
    rc = main(["cache", "ls", "--dir", str(base)])  # a file where a directory belongs: one line, exit 2
    assert rc == 2 and "cache directory" in capsys.readouterr().err


def test_one_key_one_file_whatever_the_order_or_zero_entries(llama_pair, second_av, tmp_path):
    """The key ignores order and λ = 0 entries, so the merge must too: each key stands for one file, byte for byte."""
    a, b = llama_pair.av, second_av[0]
    base = llama_pair.base_gguf  # F32: the float32 sum itself is written, so its order would show
    mixes = [{a: 0.5, b: 0.3}, {b: 0.3, a: 0.5}, {a: 0.5, b: 0.3}]
    files = [MergeCache(tmp_path / f"c{i}").get(base, mix) for i, mix in enumerate(mixes)]
    assert files[0].name == files[1].name  # one key
    assert files[0].read_bytes() == files[1].read_bytes() == files[2].read_bytes()
    only_a = MergeCache(tmp_path / "c3").get(base, {a: 0.5})
    with_zero = MergeCache(tmp_path / "c4").get(base, {b: 0.0, a: 0.5})
    assert only_a.name == with_zero.name and only_a.read_bytes() == with_zero.read_bytes()
    meta = GGUFReader(with_zero)
    assert list(meta.fields["alignvec.merged.lambdas"].contents()) == [0.5]
    # all λ = 0 is the base itself: nothing merged, nothing written
    assert MergeCache(tmp_path / "c5").get(base, {a: 0.0, b: 0.0}) == base
    assert not any((tmp_path / "c5").glob("*.gguf"))


def test_a_vector_edited_after_writing_is_refused_not_recorded(llama_pair, tmp_path):
    """Its recorded content digest no longer matches its tensors: a merged model would carry a false provenance."""
    from alignvec_gguf.errors import FormatError

    edited = tm.edited_copy(llama_pair.av, tmp_path / "edited.avec.gguf")
    cache = MergeCache(tmp_path / "cache")
    with pytest.raises(FormatError, match="tensors changed after it was written") as e:
        cache.get(llama_pair.base_gguf, {edited: 0.5})
    assert "\n" not in str(e.value) and not list((tmp_path / "cache").glob("*.gguf"))
    # the untouched original still merges, and its merged file records what was read
    merged = cache.get(llama_pair.base_gguf, {llama_pair.av: 0.5})
    recorded = GGUFReader(merged).fields["alignvec.merged.vector_sha256"].contents()
    assert recorded == [AlignmentVector(llama_pair.av).content_sha256]
