"""The real model's preference accuracy over λ on four base files, with ``alignvec eval``, and the plots.

    python examples/preference_spectrum/evaluate.py [--limit N] [--jobs 4] [--bases F32 Q4_K_M] [--reuse]

Needs ``build.py --model smollm2`` (``build/preference_spectrum_smollm2``). For each base, F32 (llama.cpp's
converter on the float checkpoint), Q8_0 and Q4_K_M (llama.cpp's quantizer on that F32 file) and Q4_1 (the
published file), it runs ``alignvec eval`` with the three domain AVs (full form, q8_0) over the λ grid
(each domain's AV merged alone at each λ with the default requant policy, scored on that domain's
held-out questions), as separate processes, ``--jobs`` at a time. Then it writes
``examples/preference_spectrum/results/smollm2/``: ``eval-<TYPE>/eval.json`` per base, ``eval.png`` (every
level on Q4_1, the expert share on the other bases dashed) and ``summary.json`` (the largest expert-share
gap of each base to F32).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "preference_spectrum_smollm2"
RESULTS = ROOT / "examples" / "preference_spectrum" / "results" / "smollm2"
BASES = ("F32", "Q8_0", "Q4_K_M", "Q4_1")
LAMBDAS = (-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
DOMAINS = ("medical", "legal", "financial")


def main(argv: list[str] | None = None) -> int:
    """Run the four evals (in parallel processes), then the summary and the plot."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build-dir", type=Path, default=BUILD)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--limit", type=int, default=None, help="first N held-out questions per domain")
    p.add_argument("--lambdas", type=float, nargs="+", default=list(LAMBDAS))
    p.add_argument("--jobs", type=int, default=4, help="evals run at once (one llama.cpp thread each)")
    p.add_argument("--bases", nargs="+", default=list(BASES), choices=BASES)
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep a base's eval.json already in --out when it has these λ (evaluate the missing bases only)",
    )
    args = p.parse_args(argv)
    if not (args.build_dir / "heldout.json").is_file():
        sys.exit(f"evaluate.py: no build in {args.build_dir}; run build.py --model smollm2 first")
    vectors = [str(args.build_dir / f"{d}.avec.gguf") for d in DOMAINS]
    pending = []
    for kind in args.bases:
        if args.reuse and _evaluated(args.out / f"eval-{kind}" / "eval.json", args.lambdas):
            print(f"{kind}: reusing {args.out / f'eval-{kind}' / 'eval.json'}", flush=True)
            continue
        cmd = [
            sys.executable,
            "-m",
            "alignvec_gguf.cli",
            "-q",
            "eval",
            "--base",
            str(args.build_dir / f"base.{kind}.gguf"),
        ]
        cmd += [x for v in vectors for x in ("-v", v)] + ["--data", str(args.build_dir / "heldout.json"), "--no-plot"]
        cmd += ["--lambdas", *map(str, args.lambdas), "-o", str(args.out / f"eval-{kind}")]
        cmd += ["--limit", str(args.limit)] if args.limit else []
        pending.append((kind, cmd))
    running: list[tuple[str, subprocess.Popen, float]] = []
    seconds: dict[str, float] = {}
    while pending or running:
        while pending and len(running) < args.jobs:
            kind, cmd = pending.pop(0)
            running.append((kind, subprocess.Popen(["nice", "-n", "5", *cmd], stdout=subprocess.DEVNULL), time.time()))
        for entry in list(running):
            kind, proc, started = entry
            if proc.poll() is not None:
                if proc.returncode != 0:
                    sys.exit(f"evaluate.py: alignvec eval on {kind} failed (status {proc.returncode})")
                seconds[kind] = time.time() - started
                print(f"{kind}: {seconds[kind]:.0f} s", flush=True)
                running.remove(entry)
        time.sleep(2)
    return summarize(args.out, args.bases, seconds)


def _evaluated(path: Path, lambdas: list[float]) -> bool:
    """Whether ``path`` is an eval.json over exactly these λ."""
    try:
        return [float(x) for x in json.loads(path.read_text(encoding="utf-8"))["eval"]["lambdas"]] == lambdas
    except (OSError, ValueError, KeyError, TypeError):
        return False


def summarize(out: Path, bases: list[str], seconds: dict[str, float] | None = None) -> int:
    """``summary.json`` and ``eval.png`` from the per-base ``eval.json`` files."""
    from alignvec_gguf.cli.report import eval_table, max_expert_gap, plot
    from alignvec_gguf.eval import result_from_json

    results = {k: result_from_json(json.loads((out / f"eval-{k}" / "eval.json").read_text())["eval"]) for k in bases}
    for kind, result in results.items():
        print(eval_table(result, title=f"SmolLM2 {kind} base, requant {result.requant}:"))
    summary = {
        "lambdas": results[bases[0]].lambdas,
        "n_items": results[bases[0]].n_items,
        "seconds": seconds or {},
        "max_expert_gap_to_F32": {k: max_expert_gap(r, results["F32"]) for k, r in results.items() if "F32" in results},
        "expert_share": {
            k: {d: [r.curves[d][lam]["expert"] for lam in r.lambdas] for d in r.curves} for k, r in results.items()
        },  # fmt: skip
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: summary[k] for k in ("max_expert_gap_to_F32",)}))
    order = [k for k in ("Q4_1", "F32", "Q8_0", "Q4_K_M") if k in results]
    plot(out / "eval.png", [(k, results[k]) for k in order[:1]],
         title="SmolLM2-135M: preference accuracy against λ (Q4_1 as published)")  # fmt: skip
    plot(out / "eval-bases.png", [(k, results[k]) for k in order], levels=("avoidance", "expert"),
         title="SmolLM2-135M: avoidance and expert shares against λ on four base files")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
