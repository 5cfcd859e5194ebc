"""What the AMX guard costs: decode speed of llama.cpp's default buffer selection against the guarded loads.

On a CPU whose llama.cpp build offers the ``AMX`` weight buffer (Intel Sapphire Rapids and later), the
default selection segfaults on the first Q4_K decode (llama.cpp #20824); alignvec avoids it
(``alignvec_gguf/cpu.py``). The two ways to avoid it, measured here against the default, each in a fresh
process on the same model:

- ``guard``: what alignvec does: ``use_extra_bufts = false`` and every weight the CPU repack buffer takes
  pinned to ``CPU_REPACK`` through ``tensor_buft_overrides`` (repacked layouts kept, AMX never used).
- ``no_extra_bufts``: ``use_extra_bufts = false`` alone (llama-server's ``--no-repack``): no AMX, no repacking.

The model: a Llama with TinyLlama's shape (``--size 1b``: hidden 2048, 22 layers, ~1.1B parameters, random
weights) or a ~90M one (default, ``--size quick``), quantized by llama.cpp to Q4_K_M and Q4_0, cached
under ~/.cache/alignvec/bench (``--workdir``). Decode is ``DECODE_TOKENS`` single-token evals after an
8-token prompt, best of three, on one thread, timed in CPU seconds of the process (``time.process_time``):
on a shared machine wall time swings with the neighbours' load, CPU time much less. A child that dies (the
default on an AMX CPU) is reported as such, with its signal.

Prompt processing is a ``PROMPT_TOKENS``-token batch, where repacked layouts matter most (batched GEMM).

Usage: python benchmarks/cpu.py [--size quick|1b] [--workdir DIR]. The last line is JSON, per type and for
decode and prompt: ``guard_vs_default`` and ``no_extra_bufts_vs_default`` (tokens/s ratios; null where
the default crashed) and ``guard_vs_no_extra_bufts``, plus the buffer types this build offers and the
guard's decision on this machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DECODE_TOKENS = 48
PROMPT_TOKENS = 128
SIZES = {"quick": "90m", "1b": "1b"}  # tests/support/synthetic.py's shapes, the same random Llama as merge.py's
CONFIGS = ("default", "guard", "no_extra_bufts")
TYPES = ("Q4_K_M", "Q4_0")


def build(root: Path, size: str) -> dict[str, Path]:
    """The F32 model's quantizations (cached: built once per size)."""
    from tests.support.synthetic import SHAPES, drawn_quantized_bases

    return drawn_quantized_bases(root, size, SHAPES[SIZES[size]], TYPES)


def child(config: str, path: str) -> dict[str, Any]:
    from alignvec_gguf import cpu
    from tests.support.measure import decode_speed

    if config == "default":
        buffers = cpu.plan(path, allow_amx=True)
    elif config == "guard":
        buffers = cpu.plan(path, allow_amx=False)
    else:
        buffers = cpu.BufferPlan(True, "use_extra_bufts = false alone")
    t0 = time.perf_counter()
    llm = cpu.new_llama(path, buffers=buffers, n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)
    load = time.perf_counter() - t0
    best = decode_speed(llm, tokens=DECODE_TOKENS, repeats=3, clock=time.process_time)
    prompt = 0.0
    for _ in range(3):
        llm.n_tokens = 0
        t0 = time.process_time()
        llm.eval([1] + [300 + i for i in range(PROMPT_TOKENS - 1)])
        prompt = max(prompt, PROMPT_TOKENS / (time.process_time() - t0))
    return {"tokens_per_s": best, "prompt_tokens_per_s": prompt, "load_s": load, "pinned": buffers.pinned_tensors}


def run(config: str, path: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", config, str(path)], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        sig = -proc.returncode if proc.returncode < 0 else None
        return {"crashed": f"signal {sig}" if sig else f"exit {proc.returncode}", "stderr": proc.stderr[-300:]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="quick")
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "alignvec" / "bench"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    from alignvec_gguf import cpu

    t0 = time.perf_counter()
    models = build(Path(args.workdir), args.size)
    print(f"models ready in {time.perf_counter() - t0:.0f}s: {', '.join(str(p) for p in models.values())}")
    report = cpu.system_report()
    out: dict[str, Any] = {
        "size": args.size,
        "cpu_extra_buffer_types": report["cpu_extra_buffer_types"],
        "guard_here": report["guard"],
        "amx_int8": report["cpu_flags"]["amx_int8"],
    }
    for qtype, path in models.items():
        # alternate the configurations twice: other load on the machine hits them alike
        results: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
        for _ in range(2):
            for config in CONFIGS:
                results[config].append(run(config, path))
        best: dict[str, dict[str, Any]] = {}
        for config, rs in results.items():
            ok = [r for r in rs if "tokens_per_s" in r]
            best[config] = max(ok, key=lambda r: r["tokens_per_s"]) if ok else rs[0]
        for config in CONFIGS:
            r = best[config]
            what = r.get("crashed") or (
                f"decode {r['tokens_per_s']:.1f} tok/s, prompt {r['prompt_tokens_per_s']:.1f} tok/s, "
                f"load {r['load_s']:.2f}s, {r['pinned']} weights pinned"
            )
            print(f"{qtype:7s} {config:15s} {what}")
        key = qtype.lower().replace("_", "")

        out[f"{key}_default_crashed"] = best["default"].get("crashed")
        for metric, label in (("tokens_per_s", "decode"), ("prompt_tokens_per_s", "prompt")):
            default, guard, plain = (best[c].get(metric) for c in CONFIGS)
            out[f"{key}_{label}_default_tokens_per_s"] = round(default, 1) if default else None
            out[f"{key}_{label}_guard_vs_default"] = round(guard / default, 3) if guard and default else None
            out[f"{key}_{label}_no_extra_bufts_vs_default"] = round(plain / default, 3) if plain and default else None
            out[f"{key}_{label}_guard_vs_no_extra_bufts"] = round(guard / plain, 3) if guard and plain else None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
