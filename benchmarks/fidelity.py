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
import math
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import tinymodels as tm  # noqa: E402

from alignvec_gguf.fidelity import fidelity  # noqa: E402
from alignvec_gguf.merge import DEFAULT_POLICY  # noqa: E402
from converters import convert  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="models to average over")
    parser.add_argument("--scale", type=float, default=0.02, help="Δ as a fraction of each tensor's mean |w|")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny Llama (the issue's: 256)")
    parser.add_argument("--layers", type=int, default=2, help="its layers")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated; the JSON needs the default")
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
