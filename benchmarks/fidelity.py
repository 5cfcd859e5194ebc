"""How much of the knob each requantization policy keeps, against the from-scratch anchor.

Builds tiny Llamas (transformers, random weights, hidden 256, as in the issue) whose aligned twin is the
base plus a random full-rank Δ of --scale × mean |w| per tensor (default 2%), converts the base with
llama.cpp's converter and quantizes it with llama.cpp's quantizer to Q4_K_M and Q8_0. For every policy,
and for the anchor (the exact merged F32 model quantized from scratch at the base's types), at λ in
{0.3, 1}, ``alignvec_gguf.fidelity`` reports over a fixed token set:

  kept    share of the F32 λ-shift of the logits that survives (projection; 1 = all of it)
  cosine  cosine between the surviving shift and the F32 one
  KL      KL(merged_q ‖ merged_F32), nats per token; "xanchor" is the ratio to the anchor's
  size    merged file / base file

Averaged over --seeds models. The last line is JSON: ``default_policy`` (the package default),
``q4km_default_kl_vs_anchor`` (the default's KL over the anchor's on Q4_K_M, worst λ),
``q4km_hifi_shift_kept`` / ``q4km_hifi_shift_cos`` (hifi at λ = 1, where the issue measured),
``q4km_hifi_size_ratio`` and ``q4km_q8_size_ratio``, ``q4km_f32_touched_shift_cos`` (touched tensors in
float32: the cosine no requantization of them can beat, since the base's own quantization error changes
how Δ acts), then every figure by base, λ and policy.

Usage: python benchmarks/fidelity.py [--seeds 3] [--scale 0.02] [--hidden 256] [--layers 2]
[--policies a,b,...]; about 35 s per seed here. Needs the test extras (pip install -e '.[convert,dev]').
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import realmodels as rm  # noqa: E402
import tinymodels as tm  # noqa: E402

from alignvec_gguf.fidelity import fidelity, sequence_logprobs  # noqa: E402
from alignvec_gguf.merge import DEFAULT_POLICY  # noqa: E402
from converters import convert  # noqa: E402

log = logging.getLogger("fidelity")

POLICIES = ["same", "grid", "dither", "calibrated", "calibrated:inf", "q5_k", "q6_k", "hifi", "q8_0", "f32"]
LAMBDAS = [0.3, 1.0]
VARIANTS = ["Q4_K_M", "Q8_0"]


def build(root: Path, seed: int, scale: float, src: Path, tok: Path, hidden: int, layers: int) -> dict[str, Path]:
    base = tm.make_model(tm.llama_config(hidden=hidden, num_hidden_layers=layers), seed)
    # tm.perturbed moves each tensor by scale·std(w)·noise; mean |w| = std·√(2/π) for these Gaussian weights
    aligned = tm.perturbed(base, seed + 1000, scale=scale * math.sqrt(2 / math.pi))
    base_dir = tm.save(base, None, root / "base", tok)
    aligned_dir = tm.save(base, aligned, root / "aligned", tok)
    paths = {"av": convert(base_dir, aligned_dir, root / "v.avec.gguf").path}
    paths["F32"] = tm.hf_to_gguf(src, base_dir, root / "base-f32.gguf")
    for v in VARIANTS:
        paths[v] = tm.quantize_gguf(paths["F32"], root / f"base-{v}.gguf", f"MOSTLY_{v}")
    return paths


def synthetic(args: argparse.Namespace) -> None:
    policies = args.policies.split(",")
    tmp = tempfile.TemporaryDirectory(prefix="alignvec-fidelity-")
    root = Path(tmp.name)
    src = tm.llama_cpp_source(REPO / ".cache")
    tok = tm.train_tokenizer(root / "tok")
    sums: dict[tuple[str, float, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for seed in range(args.seeds):
        paths = build(root / f"s{seed}", seed, args.scale, src, tok, args.hidden, args.layers)
        for variant in VARIANTS:
            for lam in LAMBDAS:
                r = fidelity(paths[variant], {paths["av"]: lam}, policies=policies, full_base=paths["F32"], threads=2)
                assert r.anchor is not None
                for m in [*r.rows, r.anchor]:
                    d = sums[(variant, lam, m.label)]
                    d["kept"].append(m.shift_kept)
                    d["cos"].append(m.shift_cos)
                    d["kl"].append(m.kl)
                    d["size"].append(m.size_ratio)
                    d["kl_vs_anchor"].append(m.kl / r.anchor.kl)
    mean = {k: {f: float(np.mean(v)) for f, v in d.items()} for k, d in sums.items()}

    print(
        f"tiny Llama (hidden {args.hidden}, {args.layers} layers), Δ = {args.scale:.0%} of mean |w|, "
        f"{args.seeds} seeds; default policy {DEFAULT_POLICY}"
    )
    print(f"{'base':7} {'λ':>4} {'policy':14} {'kept':>6} {'cosine':>7} {'KL':>9} {'xanchor':>8} {'size':>6}")
    for variant in VARIANTS:
        for lam in LAMBDAS:
            for label in [*policies, "anchor"]:
                m = mean[(variant, lam, label)]
                mark = " *" if label == DEFAULT_POLICY else ""
                print(
                    f"{variant:7} {lam:4.1f} {label:14} {m['kept']:6.3f} {m['cos']:7.3f} {m['kl']:9.2e} "
                    f"{m['kl_vs_anchor']:8.2f} {m['size']:5.2f}x{mark}"
                )
    q4 = "Q4_K_M"

    def fig(lam: float, policy: str, key: str) -> float | None:  # None for a policy left out by --policies
        m = mean.get((q4, lam, policy))
        return None if m is None else round(m[key], 3)

    def worst(policy: str, key: str) -> float | None:
        values = [fig(lam, policy, key) for lam in LAMBDAS]
        return None if None in values else max(v for v in values if v is not None)

    result = {
        "default_policy": DEFAULT_POLICY,
        "q4km_default_kl_vs_anchor": worst(DEFAULT_POLICY, "kl_vs_anchor"),
        "q4km_hifi_shift_kept": fig(1.0, "hifi", "kept"),
        "q4km_hifi_shift_cos": fig(1.0, "hifi", "cos"),
        "q4km_hifi_size_ratio": fig(1.0, "hifi", "size"),
        "q4km_q8_size_ratio": fig(1.0, "q8_0", "size"),
        "q4km_default_shift_kept": {str(lam): fig(lam, DEFAULT_POLICY, "kept") for lam in LAMBDAS},
        "q4km_anchor_shift_kept": {str(lam): fig(lam, "anchor", "kept") for lam in LAMBDAS},
        "q4km_same_kl_vs_anchor": worst("same", "kl_vs_anchor"),
        "q4km_f32_touched_shift_cos": fig(1.0, "f32", "cos"),
        "seeds": args.seeds,
        "hidden": args.hidden,
        "layers": args.layers,
        "scale": args.scale,
        "figures": {f"{v}/{lam}/{p}": {k: round(x, 4) for k, x in mean[(v, lam, p)].items()} for v, lam, p in mean},
    }
    tmp.cleanup()
    print(json.dumps(result))


# --- the real model ---------------------------------------------------------------------------------

REAL_POLICIES = ["same", "calibrated", "calibrated:inf", "dither", "unbiased", "hifi", "q6_k", "f32"]
REAL_LAMBDAS = [1.0, 0.5, 0.3]
REAL_VARIANTS = ["Q4_K_M", "Q8_0"]


def style_vector(args: argparse.Namespace) -> tuple[rm.RealBase, Path]:
    """SmolLM2, its base GGUFs, and the style fine-tune's alignment vector (all cached)."""
    base = rm.real_base(("F32", *(v for v in args.variants if v != "Q4_1")))
    tag = f"style-s{args.steps}-b{args.batch}-lr{args.lr:g}-seed{args.seed}"
    work = base.q4_1.parent / tag
    t0 = time.perf_counter()
    aligned = rm.finetune(base.hf, work / "aligned", steps=args.steps, lr=args.lr, batch=args.batch, seed=args.seed)
    av = work / "style.avec.gguf"
    if not av.is_file() or av.stat().st_mtime < (aligned / "alignvec-finetune.json").stat().st_mtime:
        convert(base.hf, aligned, av, name="pirate-style", domain="style", description=f"SFT {tag}")
    log.info("style vector ready in %.0f s: %s", time.perf_counter() - t0, av)
    return base, av


def style_scorer(tokenizer: Any, threads: int) -> tuple[Any, list[int]]:
    """(a function of a GGUF path -> style margin and accuracy on the held-out questions, the fixed tokens)."""
    pairs = rm.style_pairs(tokenizer)
    flat = [seq for pair in pairs for seq in pair]

    def score(path: Path) -> dict[str, float]:
        lp = sequence_logprobs(path, flat, threads)
        margins = [lp[2 * i] - lp[2 * i + 1] for i in range(len(pairs))]
        return {"margin": float(np.mean(margins)), "style_acc": float(np.mean([m > 0 for m in margins]))}

    # the fixed text: four held-out exchanges with their plain answers, where the style would show
    tokens = [t for _, (plain, _) in pairs[:4] for t in plain]
    return score, tokens


def real(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    policies = args.policies.split(",") if args.policies else REAL_POLICIES
    base, av = style_vector(args)
    vectors = [av, *map(Path, args.vector)]
    tokenizer = AutoTokenizer.from_pretrained(base.hf)
    score, tokens = style_scorer(tokenizer, args.threads)
    base_scores = {v: score(base.ggufs[v]) for v in ["F32", *args.variants]}
    rows: dict[tuple[str, str, float, str], dict[str, float]] = {}
    for vec in vectors:
        for variant in args.variants:
            for lam in args.lambdas:
                t0 = time.perf_counter()
                r = fidelity(
                    base.ggufs[variant],
                    {vec: lam},
                    policies=policies,
                    full_base=base.ggufs["F32"],
                    tokens=tokens,
                    threads=args.threads,
                    extra=score if vec == av else None,
                )
                assert r.anchor is not None
                for m in [*r.rows, r.anchor]:
                    rows[(vec.name, variant, lam, m.label)] = {
                        "kept": m.shift_kept,
                        "cos": m.shift_cos,
                        "kl": m.kl,
                        "kl_vs_anchor": m.kl / r.anchor.kl,
                        "size": m.size_ratio,
                        **m.extra,
                    }
                rows[(vec.name, variant, lam, "exact")] = {"kl": 0.0, **r.ref_extra}
                log.info("%s on %s at λ = %g: %.0f s\n%s", vec.name, variant, lam, time.perf_counter() - t0, r.table())
                if r.ref_extra:
                    log.info("exact F32 merge: %s; %s", r.ref_extra, {m.label: m.extra for m in [*r.rows, r.anchor]})
    report_real(args, policies, av, vectors, rows, base_scores)


def _monotone(values: list[float]) -> bool:
    return all(b > a for a, b in zip(values, values[1:], strict=False))


def report_real(
    args: argparse.Namespace,
    policies: list[str],
    av: Path,
    vectors: list[Path],
    rows: dict[tuple[str, str, float, str], dict[str, float]],
    base_scores: dict[str, dict[str, float]],
) -> None:
    print(
        f"SmolLM2-135M-Instruct; style SFT of the transformer blocks ({args.steps} steps, batch {args.batch}, "
        f"lr {args.lr:g}, seed {args.seed}); default policy {DEFAULT_POLICY}"
    )
    print("style margin of the bases (λ = 0): " + ", ".join(f"{v} {s['margin']:.2f}" for v, s in base_scores.items()))
    head = f"{'base':7} {'λ':>4} {'policy':14} {'kept':>6} {'cosine':>7} {'KL':>9} {'xanchor':>8} {'size':>6}"
    for vec in vectors:
        print(f"\nvector {vec.name}")
        print(head + ("  margin (exact)  style acc" if vec == av else ""))
        for variant in args.variants:
            for lam in args.lambdas:
                exact = rows[(vec.name, variant, lam, "exact")]
                for label in [*policies, "anchor"]:
                    m = rows[(vec.name, variant, lam, label)]
                    mark = " *" if label == DEFAULT_POLICY else "  "
                    line = (
                        f"{variant:7} {lam:4.1f} {label:14} {m['kept']:6.3f} {m['cos']:7.3f} {m['kl']:9.2e} "
                        f"{m['kl_vs_anchor']:8.2f} {m['size']:5.2f}x{mark}"
                    )
                    if "margin" in m:
                        line += f" {m['margin']:6.2f} ({exact['margin']:5.2f})"
                        line += f" {m['style_acc']:6.2f} ({exact['style_acc']:.2f})"
                    print(line)
    name = av.name
    q4 = "Q4_K_M"

    def fig(lam: float, policy: str, key: str, variant: str = q4) -> float | None:
        m = rows.get((name, variant, lam, policy))
        return None if m is None or key not in m else float(f"{float(m[key]):.4g}")

    def worst(policy: str, key: str) -> float | None:
        values = [fig(lam, policy, key) for lam in args.lambdas]
        return None if None in values else max(v for v in values if v is not None)

    def monotone(policy: str, variant: str) -> bool | None:
        ordered = sorted(args.lambdas)
        margins = [base_scores[variant]["margin"], *(fig(lam, policy, "margin", variant) for lam in ordered)]
        return None if None in margins else _monotone([m for m in margins if m is not None])

    def acc_gap(policy: str) -> float | None:
        gaps = [
            abs(rows[(name, q4, lam, policy)]["style_acc"] - rows[(name, q4, lam, "exact")]["style_acc"])
            for lam in args.lambdas
            if (name, q4, lam, policy) in rows
        ]
        return round(max(gaps), 4) if gaps else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else round(a / b, 3)

    hifi_kl = fig(1.0, "hifi", "kl")
    default_kl = fig(1.0, DEFAULT_POLICY, "kl")
    result: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct",
        "default_policy": DEFAULT_POLICY,
        "real_q4km_default_kl_vs_anchor": worst(DEFAULT_POLICY, "kl_vs_anchor"),
        "real_q4km_hifi_shift_kept": fig(1.0, "hifi", "kept"),
        "real_q4km_hifi_shift_cos": fig(1.0, "hifi", "cos"),
        "real_q4km_hifi_size_ratio": fig(1.0, "hifi", "size"),
        "real_q4km_default_pref_acc_gap": None,
        "real_q4km_default_pref_acc_gap_missing": "needs the preference-spectrum DPO vectors and their eval data "
        "(examples/real_model); the style task's share is real_q4km_default_style_acc_gap",
        "real_q4km_default_style_acc_gap": acc_gap(DEFAULT_POLICY),
        "real_q4km_default_shift_kept_l05": fig(0.5, DEFAULT_POLICY, "kept"),
        "real_q4km_default_shift_kept_l1": fig(1.0, DEFAULT_POLICY, "kept"),
        "real_q4km_default_kl_vs_hifi_l1": None
        if not hifi_kl or default_kl is None
        else round(default_kl / hifi_kl, 3),
        "real_q4km_default_size_ratio": fig(1.0, DEFAULT_POLICY, "size"),
        "real_default_monotone": {v: monotone(DEFAULT_POLICY, v) for v in args.variants},
        "steps": args.steps,
        "lr": args.lr,
        "batch": args.batch,
        "seed": args.seed,
        "figures": {"/".join(map(str, k)): {f: float(f"{x:.4g}") for f, x in v.items()} for k, v in rows.items()},
        "base_style": base_scores,
    }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["synthetic", "smollm2"], default="synthetic")
    parser.add_argument("--policies", default=None, help="comma-separated; the JSON needs the default")
    parser.add_argument("--threads", type=int, default=2)
    synth = parser.add_argument_group("synthetic (tiny random Llamas)")
    synth.add_argument("--seeds", type=int, default=3, help="models to average over")
    synth.add_argument("--scale", type=float, default=0.02, help="Δ as a fraction of each tensor's mean |w|")
    synth.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny Llama (the issue's: 256)")
    synth.add_argument("--layers", type=int, default=2, help="its layers")
    smol = parser.add_argument_group("smollm2 (the real model)")
    smol.add_argument("--steps", type=int, default=16, help="style fine-tune: AdamW steps")
    smol.add_argument("--batch", type=int, default=4, help="style fine-tune: sequences per step")
    smol.add_argument("--lr", type=float, default=1e-4, help="style fine-tune: learning rate")
    smol.add_argument("--seed", type=int, default=0, help="style fine-tune: seed")
    smol.add_argument("--variants", default="Q4_K_M,Q8_0", help="base GGUFs: Q4_K_M, Q8_0, Q4_1 (the published file)")
    smol.add_argument("--lambdas", default="1,0.5,0.3", help="comma-separated λ")
    smol.add_argument("--vector", action="append", default=[], help="another AV of this model to measure (repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.model == "synthetic":
        args.policies = args.policies or ",".join(POLICIES)
        synthetic(args)
    else:
        args.variants = args.variants.split(",")
        args.lambdas = [float(x) for x in args.lambdas.split(",")]
        real(args)


if __name__ == "__main__":
    main()
