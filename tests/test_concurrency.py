"""Processes sharing one merge cache: loads of one mix merge once, different mixes do not collide,
cleanup never takes a live writer's or reader's file, and lock files may be removed safely.

tests/test_cache.py covers four ``cached_merge`` calls of one mix (one merge) and eviction sparing an
entry in use within one process; these tests go through ``runtime.load`` and across processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from alignvec_gguf.atomic import file_lock
from alignvec_gguf.cache import MergeCache
from alignvec_gguf.merge import merge
from tests.support import REPO
from tests.support.childcode import SLOW_WRITES
from tests.support.files import sha256

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock semantics; Windows locks differ")

TIMEOUT = 180.0
TOKENS = [1, 5, 9, 42, 7, 100]

# A child: wait for a start signal (so that all children race), then load or merge a mix through the cache.
CHILD = (
    r"""
import hashlib, json, os, sys, time
spec = json.loads(sys.argv[1])
from alignvec_gguf import cache, runtime
merge = cache.merge
def counted(*args, **kwargs):
    with open(spec["log"], "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(spec.get("merge_delay", 0.0))
    return merge(*args, **kwargs)
cache.merge = counted
"""
    + SLOW_WRITES
    + r"""
if spec.get("hold"):  # stop inside the cache's 'using' lock, between lookup and open, until told to go on
    import llama_cpp
    init = llama_cpp.Llama.__init__
    def held(self, *args, **kwargs):
        open(spec["hold"] + ".reached", "w").close()
        while not os.path.exists(spec["hold"] + ".go"):
            time.sleep(0.01)
        init(self, *args, **kwargs)
    llama_cpp.Llama.__init__ = held
while not os.path.exists(spec["start"]):
    time.sleep(0.005)
vectors = {path: lam for path, lam in spec["vectors"]}
if spec["load"]:
    llm = runtime.load(spec["base"], vectors, cache_dir=spec["cache"], n_ctx=32, n_threads=1, logits_all=True)
    def logits():
        llm.reset()
        llm.eval(spec["tokens"])
        return hashlib.sha256(llm.scores[: len(spec["tokens"])].tobytes()).hexdigest()
    first = logits()
    if spec.get("after"):  # the entry may be removed meanwhile: the loaded model must not notice
        open(spec["after"] + ".reached", "w").close()
        while not os.path.exists(spec["after"] + ".go"):
            time.sleep(0.01)
    print(json.dumps({"path": llm.model_path, "logits": first, "again": logits()}))
else:
    print(json.dumps({"path": str(cache.cached_merge(spec["base"], vectors, cache_dir=spec["cache"]))}))
"""
)


def start_children(specs: list[dict], tmp_path: Path) -> list[subprocess.Popen[str]]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    go = tmp_path / "start"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps({"start": str(go), "tokens": TOKENS, **spec})],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for spec in specs
    ]
    go.touch()
    return procs


def results(procs: list[subprocess.Popen[str]]) -> list[dict]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, stderr
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.01)


@pytest.fixture
def shared(llama_pair, quantized_bases, tmp_path: Path) -> dict:
    base = tmp_path / "base.gguf"
    shutil.copy(quantized_bases["Q4_K_M"], base)
    return {"base": str(base), "cache": str(tmp_path / "cache"), "log": str(tmp_path / "merges.log")}


def merges(shared: dict) -> int:
    log = Path(shared["log"])
    return len(log.read_text().split()) if log.exists() else 0


def test_four_loads_of_one_mix_merge_once_and_agree(shared, llama_pair, tmp_path):
    spec = {**shared, "vectors": [[str(llama_pair.av), 0.75]], "load": True, "merge_delay": 0.5}
    got = results(start_children([spec] * 4, tmp_path))
    assert merges(shared) == 1
    assert len({g["path"] for g in got}) == 1 and len({g["logits"] for g in got}) == 1
    entry = Path(got[0]["path"])
    assert entry.read_bytes() == merge(shared["base"], {llama_pair.av: 0.75}, tmp_path / "ref.gguf").path.read_bytes()
    assert not list(entry.parent.glob(".*.tmp"))


def test_different_mixes_in_parallel_do_not_collide(shared, llama_pair, second_av, tmp_path):
    av, av2 = str(llama_pair.av), str(second_av[0])
    mixes = [[[av, 0.3]], [[av, 0.3]], [[av, 0.6]], [[av, 0.3], [av2, 0.5]], [[av2, -1.0]]]
    got = results(start_children([{**shared, "vectors": mix, "load": False} for mix in mixes], tmp_path))
    paths = [Path(g["path"]) for g in got]
    assert merges(shared) == 4 and paths[0] == paths[1] and len(set(paths)) == 4
    for i, (mix, path) in enumerate(zip(mixes, paths, strict=True)):
        # the cache merges a mix in the order of its files' digests (float32 sums depend on the order), so
        # the reference is the plain merge of that order; which order it is depends on the vectors' bytes
        ordered = sorted(mix, key=lambda pair: sha256(Path(pair[0])))
        reference = merge(shared["base"], dict(ordered), tmp_path / f"ref{i}.gguf").path
        assert path.read_bytes() == reference.read_bytes(), mix
    cache = MergeCache(shared["cache"])
    assert {e.path for e in cache.entries()} == set(paths)
    assert all(e.meta.get("lambdas") for e in cache.entries())  # every entry's description is complete
    assert not list(Path(shared["cache"]).glob(".*.tmp"))


def test_eviction_and_clear_spare_a_process_that_is_loading_or_using_an_entry(shared, llama_pair, tmp_path):
    hold, after = tmp_path / "hold", tmp_path / "after"
    spec = {**shared, "vectors": [[str(llama_pair.av), 0.5]], "load": True, "hold": str(hold), "after": str(after)}
    (reader,) = start_children([spec], tmp_path)
    wait_for(Path(f"{hold}.reached"), reader)  # between the cache lookup and llama.cpp opening the file
    cache = MergeCache(shared["cache"], max_bytes=0)
    (entry,) = (e.path for e in cache.entries())
    assert cache.evict() == [] and cache.clear() == (0, 0)
    assert entry.exists(), "an entry being opened was removed"
    Path(f"{hold}.go").touch()
    wait_for(Path(f"{after}.reached"), reader)  # loaded (memory-mapped), lock released
    assert [e.path for e in cache.evict()] == [entry] and not entry.exists()
    assert not list(Path(shared["cache"]).glob(".*.gguf.lock"))  # the entry's lock went with it
    Path(f"{after}.go").touch()
    (got,) = results([reader])
    assert got["logits"] == got["again"], "the loaded model changed when its file was evicted"


def test_clear_leaves_a_live_writers_temporary_alone(shared, llama_pair, tmp_path):
    spec = {**shared, "vectors": [[str(llama_pair.av), 0.5]], "load": False, "slow": 0.05}
    (writer,) = start_children([spec], tmp_path)
    cache_dir = Path(shared["cache"])
    deadline = time.monotonic() + TIMEOUT
    while not list(cache_dir.glob(".*.gguf.*.tmp")):
        assert writer.poll() is None and time.monotonic() < deadline, writer.communicate()
        time.sleep(0.002)
    (temporary,) = cache_dir.glob(".*.gguf.*.tmp")
    assert MergeCache(cache_dir).clear() == (0, 0) and temporary.exists()
    (got,) = results([writer])
    reference = merge(shared["base"], {llama_pair.av: 0.5}, tmp_path / "ref.gguf").path
    assert Path(got["path"]).read_bytes() == reference.read_bytes()


def test_a_lock_file_removed_by_its_holder_is_not_shared_by_two_processes(tmp_path):
    """flock locks a file, not a name: a waiter on a removed lock file must lock the new one instead."""
    lock = tmp_path / ".entry.gguf.lock"
    waiter_has_it = threading.Event()
    release = threading.Event()

    def waiter() -> None:
        with file_lock(lock):
            waiter_has_it.set()
            release.wait(TIMEOUT)

    with file_lock(lock) as taken:
        assert taken
        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.2)  # the waiter is blocked on this file
        lock.unlink()  # allowed while holding it
    assert waiter_has_it.wait(TIMEOUT)
    try:
        with file_lock(lock, blocking=False) as taken:
            assert not taken, "the waiter locked the removed file, so a third process got the lock too"
    finally:
        release.set()
        thread.join(TIMEOUT)
