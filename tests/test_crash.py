"""Crashes and full disks: a merge killed at any point, or one that runs out of room, loses nothing.

The merge runs in a child process (``alignvec merge``, or ``cache.cached_merge``) whose tensor writes
are slowed down a little (``slow``) so that kills land inside the write, at seeded random points. Hooks
stop a child right after the temporary's fsync (before the rename) or right after the rename (before
the cache entry's description is written), where it is killed too. After every kill: the destination
is absent or byte-identical to a reference merge, the base is unchanged, no cache entry is incomplete;
the next run succeeds with the reference bytes and removes what the killed runs left behind.

A full disk is a per-process file size limit (RLIMIT_FSIZE, so write() fails with EFBIG) and, where
this machine lets an unprivileged mount namespace mount one, a small tmpfs (ENOSPC).
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from alignvec_gguf.cache import MergeCache
from alignvec_gguf.merge import merge
from tests.support import REPO
from tests.support.childcode import SLOW_WRITES
from tests.support.files import sha256

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL, RLIMIT_FSIZE and /proc are Linux's")

ENV = dict(os.environ, PYTHONPATH=str(REPO))
SLOW = 0.02  # seconds per tensor write in a slowed child: 21 tensors, so a write phase of at least 0.4 s
TIMEOUT = 120.0
TEMPORARY = r"\.gguf\.\w{8}\.tmp$"  # a merged model's temporary, not the cache's digests.json's

CHILD = (
    r"""
import json, os, re, sys, time
spec = json.loads(sys.argv[1])
"""
    + SLOW_WRITES
    + r"""
if spec.get("pause_after"):  # "fsync" (the temporary's, before the rename) or "replace" (the rename)
    call = getattr(os, spec["pause_after"])
    def paused(*args, **kwargs):
        result = call(*args, **kwargs)
        subject = os.readlink(f"/proc/self/fd/{args[0]}") if spec["pause_after"] == "fsync" else str(args[1])
        if re.search(spec["pause_on"], subject):
            open(spec["marker"], "w").close()
            time.sleep(600)
        return result
    setattr(os, spec["pause_after"], paused)
if "argv" in spec:
    from alignvec_gguf.cli import main
    sys.exit(main(spec["argv"]))
from alignvec_gguf.cache import cached_merge
print(cached_merge(spec["base"], {spec["av"]: spec["lam"]}, cache_dir=spec["cache"]))
"""
)


def child(spec: dict) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(spec)],
        env=ENV,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert proc.poll() is None, f"the child ended first: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)


@pytest.fixture
def setup(llama_pair, quantized_bases, tmp_path: Path) -> dict:
    base = tmp_path / "base.gguf"
    shutil.copy(quantized_bases["Q4_K_M"], base)
    reference = merge(base, {llama_pair.av: 0.5}, tmp_path / "reference.gguf").path
    return {"base": base, "av": llama_pair.av, "reference": reference.read_bytes(), "base_sha": sha256(base)}


def _kill_schedule(
    run: Callable[[dict], subprocess.Popen[str]],
    temporaries: Callable[[], list[Path]],
    reset: Callable[[], object],
    seed: int,
) -> Iterator[str]:
    """Kill seven slowed runs, yielding after each: three at random times from the start (measured on a run
    that is not killed), four at random times inside the write."""
    rng = random.Random(seed)
    start = time.monotonic()
    proc = run({"slow": SLOW})
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0
    duration = time.monotonic() - start
    assert duration > 21 * SLOW, "the writes were not slowed: has the merge's writer changed?"
    reset()
    for _ in range(3):  # anywhere: start-up, reading, writing, done
        proc = run({"slow": SLOW})
        time.sleep(rng.uniform(0, duration))
        kill(proc)
        yield "anywhere"
    for _ in range(4):  # inside the write: the temporary exists, and the slowed writes take at least 0.42 s
        proc = run({"slow": SLOW})
        wait_for(lambda: bool(temporaries()), proc)
        time.sleep(rng.uniform(0, 0.2))
        kill(proc)
        yield "writing"


def test_killed_cli_merges_leave_nothing_behind(setup, tmp_path):
    out = tmp_path / "out" / "merged.gguf"
    out.parent.mkdir()
    argv = ["-q", "merge", str(setup["base"]), "-v", f"{setup['av']}=0.5", "-o", str(out)]

    def temporaries() -> list[Path]:
        return list(out.parent.glob(".merged.gguf.*.tmp"))

    def check(when: str) -> str:
        assert sha256(setup["base"]) == setup["base_sha"]
        assert sorted(p.name for p in out.parent.iterdir() if p != out) == sorted(p.name for p in temporaries())
        if out.exists():
            assert out.read_bytes() == setup["reference"], f"a different file after a kill ({when})"
            return "complete"
        return "temporary" if temporaries() else "nothing"

    states: Counter[str] = Counter()
    run = lambda extra: child({"argv": argv, **extra})  # noqa: E731
    for when in _kill_schedule(run, temporaries, lambda: out.unlink(missing_ok=True), seed=7):
        states[check(when)] += 1
        out.unlink(missing_ok=True)  # the next kill starts from an absent destination
    marker = tmp_path / "paused"
    proc = child({"argv": argv, "pause_after": "fsync", "pause_on": TEMPORARY, "marker": str(marker)})
    wait_for(marker.exists, proc)
    kill(proc)
    assert not out.exists() and any(p.stat().st_size == len(setup["reference"]) for p in temporaries())
    states[check("after fsync")] += 1
    assert states["temporary"] >= 2, states  # the kill after the fsync, and kills inside the write

    proc = child({"argv": argv})  # the next run succeeds and sweeps its killed predecessors' temporaries
    assert proc.wait(timeout=TIMEOUT) == 0, proc.communicate()
    assert out.read_bytes() == setup["reference"] and not temporaries()
    print(f"\nkilled `alignvec merge` 8 times; states after the kills: {dict(states)}")


def test_killed_cached_merges_leave_no_entry_that_looks_complete(setup, tmp_path):
    cache = tmp_path / "cache"
    spec = {"base": str(setup["base"]), "av": str(setup["av"]), "lam": 0.5, "cache": str(cache)}

    def temporaries() -> list[Path]:
        return list(cache.glob(".*.gguf.*.tmp"))

    def entries() -> list[Path]:
        return [p for p in cache.glob("*.gguf") if not p.name.startswith(".")]

    def check(when: str) -> str:
        assert sha256(setup["base"]) == setup["base_sha"]
        for entry in entries():  # whatever a later get would take as complete is complete
            assert entry.read_bytes() == setup["reference"], f"an incomplete entry after a kill ({when})"
        return "complete" if entries() else "temporary" if temporaries() else "nothing"

    states: Counter[str] = Counter()
    run = lambda extra: child({**spec, **extra})  # noqa: E731
    for when in _kill_schedule(run, temporaries, MergeCache(cache).clear, seed=11):
        states[check(when)] += 1
        MergeCache(cache).clear()  # the next kill starts from an empty cache
        assert not temporaries(), "clear removes a dead writer's temporary"
    for point, ending in (("fsync", TEMPORARY), ("replace", r"\.gguf$")):
        marker = tmp_path / f"paused-{point}"
        proc = child({**spec, "pause_after": point, "pause_on": ending, "marker": str(marker)})
        wait_for(marker.exists, proc)
        kill(proc)
        states[check(f"after {point}")] += 1
    # killed before the rename: nothing looks complete; killed after it: a complete entry without its sidecar
    assert len(entries()) == 1 and not entries()[0].with_suffix(".json").exists()
    assert states["temporary"] >= 2, states

    proc = child(spec)  # the next run takes the complete entry, and its eviction sweeps the temporary
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert Path(out.strip()).read_bytes() == setup["reference"]
    entries()[0].unlink()  # force a merge: its eviction pass sweeps what the killed runs left
    proc = child(spec)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert Path(out.strip()).read_bytes() == setup["reference"] and not temporaries()
    MergeCache(cache).clear()
    assert sorted(p.name for p in cache.iterdir()) == [".lock", "digests.json"]  # no locks of gone entries
    print(f"\nkilled cached merges 9 times; states after the kills: {dict(states)}")


def test_sigterm_removes_the_temporary(setup, tmp_path):
    out = tmp_path / "merged.gguf"
    proc = child(
        {"argv": ["-q", "merge", str(setup["base"]), "-v", f"{setup['av']}=0.5", "-o", str(out)], "slow": 0.05}
    )
    wait_for(lambda: bool(list(tmp_path.glob(".merged.gguf.*.tmp"))), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 128 + signal.SIGTERM and err.strip() == "alignvec: terminated", err
    assert not out.exists() and not list(tmp_path.glob(".merged.gguf.*"))


# --- full disks -----------------------------------------------------------------------------------


def limited(max_bytes: int) -> Callable[[], None]:
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return preexec


def cli_in_child(argv: list[str], max_bytes: int, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alignvec_gguf.cli", "-q", *argv],
        env={**ENV, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        preexec_fn=limited(max_bytes),
    )


def assert_out_of_room(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    for needle in ("nothing was written", *needles):
        assert needle in lines[0], lines[0]


def test_file_size_limit_during_merge_convert_and_cache(setup, llama_pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    merged = out / "merged.gguf"
    result = cli_in_child(["merge", str(setup["base"]), "-v", f"{setup['av']}=0.5", "-o", str(merged)], 300_000)
    assert_out_of_room(result, "file too large", str(merged))
    assert list(out.iterdir()) == [] and sha256(setup["base"]) == setup["base_sha"]

    av = out / "v.avec.gguf"
    result = cli_in_child(["convert", str(llama_pair.base_dir), str(llama_pair.aligned_dir), "-o", str(av)], 1 << 20)
    assert_out_of_room(result, "file too large", str(av))  # written straight into its temporary beside it
    assert list(out.iterdir()) == []

    cache = tmp_path / "cache"
    run = ["run", str(setup["base"]), "-v", f"{setup['av']}=0.5", "-p", "the patient", "-n", "2"]
    result = cli_in_child(run, 300_000, ALIGNVEC_CACHE_DIR=str(cache))
    assert_out_of_room(result, "file too large", "merge cache")
    assert sorted(p.name for p in cache.iterdir()) == [".lock", "digests.json"]  # no entry, temporary or lock
    assert sha256(setup["base"]) == setup["base_sha"]

    # a cached entry still loads when nothing at all can be written (the hash memo is only a memo)
    assert cli_in_child(run, 1 << 30, ALIGNVEC_CACHE_DIR=str(cache)).returncode == 0
    (cache / "digests.json").unlink()
    result = cli_in_child(run, 0, ALIGNVEC_CACHE_DIR=str(cache))
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    assert "cannot remember the hash" in result.stderr


def _tmpfs_works(folder: Path) -> bool:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{folder}'"], capture_output=True
    )
    return probe.returncode == 0


def test_small_tmpfs_during_merge_convert_and_cache(setup, llama_pair, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if not _tmpfs_works(small):
        pytest.skip("cannot mount a tmpfs here (needs unprivileged user namespaces or root); RLIMIT_FSIZE covers it")
    python = f"'{sys.executable}' -m alignvec_gguf.cli -q"
    av = f"{setup['av']}=0.5"
    script = f"""
        mount -t tmpfs -o size=256k tmpfs '{small}' || exit 99
        mkdir '{small}/out' '{small}/cache'
        {python} merge '{setup["base"]}' -v '{av}' -o '{small}/out/merged.gguf'; echo "merge=$?"
        {python} convert '{llama_pair.base_dir}' '{llama_pair.aligned_dir}' -o '{small}/out/v.avec.gguf'
        echo "convert=$?"
        ALIGNVEC_CACHE_DIR='{small}/cache' {python} run '{setup["base"]}' -v '{av}' -p x -n 2; echo "run=$?"
        echo "out=$(ls -A '{small}/out' | tr '\\n' ' ')"
        echo "cache=$(ls -A '{small}/cache' | tr '\\n' ' ')"
    """
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT
    )
    report = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert report == {"merge": "2", "convert": "2", "run": "2", "out": "", "cache": ".lock digests.json "}, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 3 and all("no space left on device" in line for line in lines), result.stderr
    assert all("nothing was written" in line for line in lines) and "merge cache" in lines[2]
    assert sha256(setup["base"]) == setup["base_sha"]
