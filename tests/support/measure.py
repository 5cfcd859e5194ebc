"""Measurements the benchmarks share: best-of timings, decode speed, peak RSS, and a measurement run in a fresh
process (a benchmark script's ``--child TASK SPEC`` mode, whose last stdout line is JSON)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall time of ``fn`` over ``repeats`` calls, in milliseconds (on a shared machine the best is the
    cost of the work itself; slower runs measure the neighbours)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return min(times)


def tokens_per_s(llm: Any, prompt: list[int], n: int) -> tuple[float, float]:
    """Greedy decode speed of a ``llama_cpp.Llama`` over exactly ``n`` tokens (EOS does not stop it): per CPU
    second, per wall second."""
    llm.reset()
    gen = llm.generate(prompt, temp=0.0)
    next(gen)  # the prompt is evaluated before the first token: not decode speed
    cpu, wall = time.process_time(), time.perf_counter()
    for i, _tok in enumerate(gen):
        if i + 1 == n:
            break
    speed = n / (time.process_time() - cpu), n / (time.perf_counter() - wall)
    gen.close()
    return speed


def decode_speed(
    llm: Any, *, tokens: int = 32, repeats: int = 2, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Best tokens/s over ``repeats`` runs of ``tokens`` single-token evals after an 8-token prompt."""
    llm.eval([1, 300, 301, 302, 303, 304, 305, 306])
    best = 0.0
    for _ in range(repeats):
        t0 = clock()
        for i in range(tokens):
            llm.eval([400 + i])
        best = max(best, tokens / (clock() - t0))
        llm.n_tokens = 8
    return best


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: reset by exec, unlike ru_maxrss, which keeps the forking
    parent's high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_child(script: Path, task: str, spec: dict[str, Any]) -> dict[str, Any]:
    """``python SCRIPT --child TASK SPEC`` in a fresh process: its last stdout line (JSON) plus its wall time."""
    cmd = [sys.executable, str(script), "--child", task, json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{task} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["wall"] = wall
    return result


def run_timed(cmd: list[str]) -> tuple[float, int]:
    """Wall time and peak RSS (MB) of an external command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}"
        )
    return wall, usage.ru_maxrss // 1024
