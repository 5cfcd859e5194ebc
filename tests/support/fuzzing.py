"""Fuzzing the file readers with hostile GGUF models and alignment vectors: nothing but AlignVecError may escape.

Users open GGUF models and AV files from strangers. This generates mutants of small valid files
(byte flips, truncation, inserted and deleted bytes, duplicated chunks, header fields set to
interesting values: counts, lengths, value and tensor types, dims, offsets; NaN and infinity in
tensor data) and random bytes, and runs each through one of two targets:

- ``gguf``: a mutated base model (or AV, or noise) through :class:`GGUFModel` (the package's one GGUF
  reader: every value and tensor), ``alignvec inspect``'s :func:`describe`, and when it still opens as a
  model, a merge plan with a valid vector (every check of ``alignvec merge`` before writing) and then
  the merge itself;
- ``av``: a mutated vector (full F32, full Q8_0 or low-rank F16) through :class:`AlignmentVector`,
  the merge's compatibility checks against the tiny base, every delta (and the low-rank factors),
  and when it passes everything, a merge into a temporary directory.
  (``--merge-every N`` merges only every Nth input that passes.)

Each input runs in a worker subprocess: a segfault or abort counts as a crash (the worker is
restarted and the run goes on), an input past ``--timeout`` seconds as a hang, an allocation
past the worker's 4 GiB address-space limit as an escaped MemoryError. Outcomes: ``ok`` (the
file passed every check), ``rejected`` (an AlignVecError: the wanted failure), ``escaped`` (any
other exception: a bug), ``crash``, ``hang``.

The engine is three modules: the seed files (``tests/support/fuzzseeds.py``), the mutations
(``tests/support/mutations.py``, also driven by hypothesis in tests/test_fuzz.py) and this one: the two
targets, the worker subprocess, atheris and the command's :func:`main` (``benchmarks/fuzz.py``).

``--atheris RUNS`` adds coverage-guided fuzzing (atheris, i.e. libFuzzer; ``pip install atheris``):
libFuzzer mutates the seed files, keeps what reaches new code, and runs each input through both
targets in a child process until RUNS inputs or the first escape, crash or hang (kept under the work
directory's ``findings/``). Its counts are added to the totals and reported under ``"atheris"``.

Usage: python benchmarks/fuzz.py [--cases N] [--seed S] [--timeout SECONDS] [--workdir DIR] [--atheris RUNS]
Default 10,000 cases, each that passes every check also merged: about 25 s on this 2-core machine
(100,000 with --merge-every 3: about 4 minutes; --atheris 20000 adds about 3 minutes). The last line
is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from alignvec_gguf.errors import AlignVecError
from tests.support import REPO
from tests.support.fuzzseeds import make_seeds
from tests.support.mutations import make_case

TARGETS = ("gguf", "av")


class Runner:
    """Runs the targets in this process (the worker, and tests/test_fuzz.py)."""

    def __init__(self, root: Path):
        """``root`` holds the seeds written by :func:`make_seeds`."""
        self.root = root
        self.base = root / "base.gguf"
        self.good_av = root / "full.avec.gguf"
        self.merges = 0

    def gguf(self, path: Path, merge_too: bool) -> None:
        from alignvec_gguf.ggufread import GGUFModel
        from alignvec_gguf.inspect import describe
        from alignvec_gguf.plan import MergePlan

        model = GGUFModel(path)  # the one reader: every metadata value decoded, every tensor's bytes read
        for key in model.keys():
            model.field(key)
        for t in model.tensors:
            t.raw().tobytes()
        describe(path)
        if model.field("general.type") == "adapter":
            return
        MergePlan(path, {str(self.good_av): 0.5})
        if merge_too:
            self._merge(path, self.good_av)

    def av(self, path: Path, merge_too: bool) -> None:
        from alignvec_gguf.avfile import AlignmentVector
        from alignvec_gguf.ggufread import GGUFModel
        from alignvec_gguf.mix import check_compatible

        av = AlignmentVector(path)
        check_compatible(GGUFModel(self.base), self.base, [(av, 0.5)])
        for name in av.names:
            av.delta(name)
            if av.lora is not None:
                av.factors(name)
        av.check_finite()
        if merge_too:
            self._merge(self.base, path)

    def _merge(self, base: Path, av: Path) -> None:
        from alignvec_gguf.merge import merge

        out = self.root / "merged.gguf"
        self.merges += 1
        try:
            merge(base, {str(av): 0.5}, out, threads=1)
        finally:
            out.unlink(missing_ok=True)

    def run(self, target: str, path: Path, merge_too: bool = True) -> tuple[str, str]:
        """(outcome, detail): ok, rejected (an AlignVecError) or escaped (anything else, with its traceback)."""
        try:
            getattr(self, target)(path, merge_too)
        except AlignVecError as e:
            return "rejected", f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 (what we are looking for)
            tb = traceback.extract_tb(e.__traceback__)[-1]
            return "escaped", f"{type(e).__name__}: {str(e)[:200]} (at {Path(tb.filename).name}:{tb.lineno})"
        return "ok", ""


def _child_env() -> dict[str, str]:
    """This environment with the repository root first on ``PYTHONPATH``, and (Python 3.11+) no current directory
    before it: a child runs ``-m tests.support.fuzzing`` of this checkout from any directory."""
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONSAFEPATH": "1"}


def worker(root: Path) -> None:
    """Read ``TARGET<TAB>PATH<TAB>MERGE`` lines, run them, answer one JSON line each."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    runner = Runner(root)
    for line in sys.stdin:
        target, path, merge_too = line.rstrip("\n").split("\t")
        outcome, detail = runner.run(target, Path(path), merge_too == "1")
        print(json.dumps({"outcome": outcome, "detail": detail}), flush=True)


class WorkerProcess:
    def __init__(self, root: Path):
        self.root = root
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> subprocess.Popen[str]:
        if self.proc is None or self.proc.poll() is not None:
            env = {**_child_env(), "OMP_NUM_THREADS": "1"}
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.fuzzing", "--worker", str(self.root)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=env,
            )
        return self.proc

    def run(self, target: str, path: Path, merge_too: bool, timeout: float) -> tuple[str, str]:
        proc = self.start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(f"{target}\t{path}\t{int(merge_too)}\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            self.stop()
            return "hang", f"no answer in {timeout:g} s"
        line = proc.stdout.readline()
        if not line:
            code = proc.wait()
            self.proc = None
            return "crash", f"worker exited with {code}" + (f" (signal {-code})" if code < 0 else "")
        answer = json.loads(line)
        return answer["outcome"], answer["detail"]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def atheris_worker(root: Path, libfuzzer_args: list[str]) -> None:
    """Coverage-guided fuzzing with atheris (libFuzzer): each input, a mutation of the seed files that
    libFuzzer chooses by the coverage it gains, runs through both targets; an escape is raised so that
    libFuzzer reports it and keeps the input. Never returns (libFuzzer exits the process)."""
    import atheris

    atheris.instrument_all()  # alignvec_gguf is already imported; this instruments what is loaded
    runner = Runner(root)
    paths = {t: root / f"atheris-{t}.gguf" for t in TARGETS}

    def one(data: bytes) -> None:
        for target in TARGETS:
            paths[target].write_bytes(data)
            outcome, detail = runner.run(target, paths[target], merge_too=False)
            if outcome == "escaped":
                raise RuntimeError(f"escaped from the {target} target: {detail}")

    atheris.Setup([sys.argv[0], *libfuzzer_args], one)
    atheris.Fuzz()


def run_atheris(runs: int, root: Path, timeout: float) -> dict[str, Any]:
    """libFuzzer through atheris in a child process, seeded with the seed files; stops at the first finding."""
    import re

    seeds = root / "seeds"
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for f in seeds.glob("*.gguf"):
        shutil.copy(f, corpus / f.name)
    findings = root / "findings"
    findings.mkdir(exist_ok=True)
    max_len = 2 * max(f.stat().st_size for f in seeds.glob("*.gguf"))
    cmd = [sys.executable, "-m", "tests.support.fuzzing", "--atheris-worker", str(seeds)]
    cmd += [f"-runs={runs}", f"-max_len={max_len}"]
    cmd += [f"-timeout={int(timeout)}", "-rss_limit_mb=4096", f"-artifact_prefix={findings}/", str(corpus)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
    log = proc.stdout + proc.stderr
    done = re.search(r"Done (\d+) runs in (\d+) second", log)
    escaped = "Uncaught Python exception" in log
    crashed = "deadly signal" in log or "ERROR: libFuzzer: out-of-memory" in log
    hung = "ERROR: libFuzzer: timeout" in log
    if not done and not (escaped or crashed or hung):
        raise RuntimeError(f"atheris did not run (exit {proc.returncode}):\n{log[-2000:]}")
    executed = re.findall(r"#(\d+)\s", log)
    cov = re.findall(r"cov: (\d+)", log)
    return {
        "cases": int(done.group(1)) if done else int(executed[-1]) if executed else 0,
        "escaped_errors": int(escaped),
        "crashes": int(crashed),
        "hangs": int(hung),
        "coverage_edges": int(cov[-1]) if cov else None,
        "findings": sorted(f.name for f in findings.iterdir()),
        "log_tail": log[-1500:] if (escaped or crashed or hung) else "",
    }


def main(argv: list[str] | None = None) -> int:
    import random

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--atheris-worker"]:
        atheris_worker(Path(argv[1]), argv[2:])
        return 0

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=20.0, help="seconds one input may take")
    p.add_argument("--merge-every", type=int, default=1, help="merge every Nth input that passes every check")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--atheris", type=int, metavar="RUNS", help="also RUNS inputs of coverage-guided fuzzing (atheris)")
    args = p.parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return 0

    start = time.perf_counter()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="alignvec-fuzz-"))
    seeds = make_seeds(root / "seeds")
    r = random.Random(args.seed)
    proc = WorkerProcess(root / "seeds")
    counts: dict[str, Counter[str]] = {t: Counter() for t in TARGETS}
    examples: list[str] = []
    passed = Counter[str]()
    merges = 0
    try:
        for i in range(args.cases):
            target = TARGETS[i % len(TARGETS)]
            data = make_case(target, seeds, root, r)
            path = root / ("case.gguf" if target == "gguf" else "case.avec.gguf")
            path.write_bytes(data)
            merge_too = False
            outcome, detail = proc.run(target, path, merge_too, args.timeout)
            if outcome == "ok":
                passed[target] += 1
                if (passed[target] - 1) % args.merge_every == 0:
                    merges += 1
                    outcome, detail = proc.run(target, path, True, args.timeout)
            counts[target][outcome] += 1
            if outcome in ("escaped", "crash", "hang"):
                kept = root / "findings" / f"{i:05d}-{target}-{outcome}.gguf"
                kept.parent.mkdir(exist_ok=True)
                shutil.copy(path, kept)
                if len(examples) < 8:
                    examples.append(f"  #{i} {target} {outcome}: {detail} [{kept}]")
    finally:
        proc.stop()
    elapsed = time.perf_counter() - start

    total = sum(counts.values(), Counter[str]())
    print(f"{'target':8} {'cases':>7} {'ok':>7} {'rejected':>9} {'escaped':>8} {'crash':>6} {'hang':>5}")
    for t in TARGETS:
        c = counts[t]
        cells = "".join(
            f"{c[k]:>{w}}" for k, w in (("ok", 8), ("rejected", 10), ("escaped", 9), ("crash", 7), ("hang", 6))
        )
        print(f"{t:8} {sum(c.values()):>7}{cells}")
    kept = args.workdir is not None or bool(examples)
    print(
        f"{args.cases} cases ({merges} with a merge) in {elapsed:.0f} s ({args.cases / elapsed:.0f}/s); "
        f"seed {args.seed}" + (f"; work dir {root}" if kept else "")
    )
    if examples:
        print("first findings:")
        print("\n".join(examples))
    guided: dict[str, Any] | None = None
    if args.atheris:
        t0 = time.perf_counter()
        guided = run_atheris(args.atheris, root, args.timeout)
        guided["seconds"] = round(time.perf_counter() - t0, 1)
        print(
            f"atheris (coverage-guided): {guided['cases']} inputs through both targets in {guided['seconds']:.0f} s, "
            f"{guided['coverage_edges']} edges; escaped {guided['escaped_errors']}, crashes {guided['crashes']}, "
            f"hangs {guided['hangs']}"
        )
        if guided["log_tail"]:
            print(guided["log_tail"])
            kept = True
        guided.pop("log_tail")
    if not kept:
        shutil.rmtree(root, ignore_errors=True)
    g = guided or {"cases": 0, "escaped_errors": 0, "crashes": 0, "hangs": 0}
    result = {
        "cases": args.cases + g["cases"],
        "escaped_errors": total["escaped"] + g["escaped_errors"],
        "crashes": total["crash"] + g["crashes"],
        "hangs": total["hang"] + g["hangs"],
        "per_target": {t: dict(counts[t]) for t in TARGETS},
        "merges": merges,
        "seconds": round(elapsed, 1),
        "seed": args.seed,
        **({"atheris": guided} if guided is not None else {}),
    }
    print(json.dumps(result))
    return 0 if not (result["escaped_errors"] or result["crashes"] or result["hangs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
