"""How much of the knob each requantization policy keeps, against the from-scratch anchor.

Long module: one benchmark in three modes (the synthetic models, ``--types``, ``--model smollm2``) that
share the models' construction, the anchor and the measurement, reported in one table and one JSON line.

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

``--types``: every type llama.cpp's quantizer presets produce that people download (TYPE_PRESETS: Q2_K ...
IQ2_M), each base made by llama.cpp from the F32 one, with an importance matrix (llama-quantize's
--imatrix, from the model's own activations) for the presets that need one; per type the default
policy (and ``same``, round-to-nearest, for comparison) at λ = 1 and 0.3. With ``--model smollm2`` the
real model and its style vector instead of the synthetic one. The last line is JSON: ``types`` maps each
type to ``kept``, ``cos``, ``kl_vs_anchor``, ``size_ratio`` and ``warned`` (the merge's kept-share
warning) of the default policy at λ = 1, with ``goal`` checking IQ4_XS/IQ4_NL (kept ≥ 0.5, KL ≤ 1.2x anchor).
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
sys.path.insert(0, str(REPO))

from alignvec_gguf.blockcodec import GRID_TYPES  # noqa: E402
from alignvec_gguf.fidelity import fidelity, sequence_logprobs  # noqa: E402
from alignvec_gguf.policy import DEFAULT_POLICY  # noqa: E402
from converters import convert  # noqa: E402
from tests.support import realmodels as rm  # noqa: E402
from tests.support import tinymodels as tm  # noqa: E402

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


PREFERENCE_SUMMARY = REPO / "examples" / "preference_spectrum" / "results" / "smollm2" / "summary.json"


def preference_gap() -> dict[str, Any]:
    """``real_q4km_default_pref_acc_gap``: the largest expert-share gap of the Q4_K_M base to F32 over λ.

    It is measured with the preference-spectrum DPO vectors (``examples/preference_spectrum/evaluate.py
    --bases F32 Q4_K_M``, the default policy, each domain's held-out questions), whose summary this reads:
    scoring them here again would take about half an hour.
    """
    try:
        summary = json.loads(PREFERENCE_SUMMARY.read_text(encoding="utf-8"))
        gap = summary["max_expert_gap_to_F32"]["Q4_K_M"]
    except (OSError, ValueError, KeyError) as e:
        return {"real_q4km_default_pref_acc_gap": None, "real_q4km_default_pref_acc_gap_missing": str(e)}
    return {
        "real_q4km_default_pref_acc_gap": gap,
        "real_q4km_default_pref_acc_gap_source": str(PREFERENCE_SUMMARY.relative_to(REPO)),
        "real_q4km_default_pref_acc_gap_questions": summary.get("n_items"),
    }


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
        **preference_gap(),
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


# --- weight space, every ggml type (--grids) ------------------------------------------------------------


def _kept_cos(change: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    d, x = change.reshape(-1).astype(np.float64), want.reshape(-1).astype(np.float64)
    return float(d @ x / (x @ x)), float(d @ x / (np.linalg.norm(d) * np.linalg.norm(x) or 1.0))


def grids(args: argparse.Namespace) -> None:
    """Share of a random Δ that each type keeps in weight space: ggml's requantization (round to nearest after
    its scale search, what ``same`` does) and, where requant.py has a codec, the grid roundings on the base's
    own scales. Gaussian 64 x 1024 matrices, Δ = 2% and 10% of mean |w|; IQ types get a random imatrix."""
    from gguf import GGMLQuantizationType as QT

    from alignvec_gguf import ggml, requant

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 1024)).astype(np.float32)
    imat = rng.uniform(0.5, 2, 1024).astype(np.float32)
    qtypes = sorted(ggml.QUANTIZABLE - {QT.F32, QT.F16, QT.BF16}, key=lambda t: t.name)
    result: dict[str, dict[str, dict[str, float]]] = {}
    print(f"{'type':8} {'Δ':>4} {'ggml kept':>9} {'cos':>6} {'nearest':>8} {'dither':>7} {'calibr.':>8} {'d.noise':>8}")
    for scale in (0.02, 0.1):
        delta = (scale * math.sqrt(2 / math.pi) * rng.standard_normal(w.shape)).astype(np.float32)
        for qt in qtypes:
            im = imat if qt.name.startswith("IQ") else None
            raw = ggml.quantize(w, qt, im)
            base = ggml.dequantize(raw, qt, w.size)

            def kept(
                new: np.ndarray, qt: QT = qt, base: np.ndarray = base, delta: np.ndarray = delta
            ) -> tuple[float, float]:
                return _kept_cos(ggml.dequantize(new, qt, w.size) - base, delta)

            ggml_kept, ggml_cos = kept(ggml.quantize(base.reshape(w.shape) + delta, qt, im))
            row = {"ggml_kept": ggml_kept, "ggml_cos": ggml_cos}
            if qt in GRID_TYPES:
                for rounding in requant.ROUNDINGS:
                    row[rounding] = kept(requant.requantize_on_grid(raw, qt, delta.reshape(-1), rounding, seed=1)[0])[0]
                row["dither_noise"] = requant.dither_noise(raw, qt, delta.reshape(-1))
            result.setdefault(qt.name, {})[f"{scale:g}"] = {k: round(v, 4) for k, v in row.items()}
            grid = " ".join(f"{row[k]:7.3f}" if k in row else "      -" for k in (*requant.ROUNDINGS, "dither_noise"))
            print(f"{qt.name:8} {scale:4.0%} {row['ggml_kept']:9.3f} {row['ggml_cos']:6.3f} {grid}", flush=True)
    print(json.dumps({"weight_space_kept": result}))


# --- every downloaded type (--types) ------------------------------------------------------------------

TYPE_PRESETS = ["Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "IQ4_XS", "IQ4_NL", "IQ3_M"]
TYPE_PRESETS += ["IQ3_XXS", "IQ2_M"]
NEEDS_IMATRIX = {"IQ3_XXS", "IQ2_M"}  # llama-quantize refuses these without one
TYPE_POLICIES = [DEFAULT_POLICY, "calibrated", "dither", "same"]  # calibrated and dither: the base's size
_LINEAR_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def make_imatrix(hf_dir: Path, tokens: list[int], out: Path) -> Path:
    """llama-imatrix's legacy .dat from the model's own activations: per linear layer, the mean squared input
    of every column over ``tokens`` (transformers; GGUF tensor names as llama.cpp's converter gives them)."""
    import struct

    import torch

    model = rm.load_hf(hf_dir)
    sums: dict[str, Any] = {}
    hooks = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name == "lm_head":
            gguf = "output.weight"
        else:
            parts = name.split(".")  # model.layers.{i}.self_attn.q_proj
            short = _LINEAR_NAMES.get(".".join(parts[-2:]))
            if parts[:2] != ["model", "layers"] or short is None:
                continue
            gguf = f"blk.{parts[2]}.{short}.weight"

        def hook(_m: Any, inputs: tuple[Any, ...], _out: Any, key: str = gguf) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            s, n = sums.get(key, (0.0, 0))
            sums[key] = (s + (x * x).sum(0), n + x.shape[0])

        hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for i in range(0, len(tokens), 256):
            model(torch.tensor([tokens[i : i + 256]]))
    for h in hooks:
        h.remove()
    with open(out, "wb") as f:
        f.write(struct.pack("<i", len(sums)))
        for key, (s, n) in sums.items():
            values = (s / n).float().numpy()
            f.write(struct.pack("<i", len(key)) + key.encode() + struct.pack("<ii", 1, values.size))
            f.write(values.astype("<f4").tobytes())
        f.write(struct.pack("<ii", 1, len("alignvec-benchmark")) + b"alignvec-benchmark")
    return out


def quantize_preset(f32: Path, out: Path, preset: str, imatrix: Path | None) -> Path:
    """llama.cpp's quantizer: the library's llama_model_quantize, or llama-quantize --imatrix where one is needed."""
    if out.is_file():
        return out
    tmp = out.with_name(f".{out.name}.part")
    if imatrix is None:
        tm.quantize_gguf(f32, tmp, f"MOSTLY_{preset}")
    else:
        import subprocess

        from tests.support import llamatools

        tool = llamatools.ensure(("llama-quantize",)) / "llama-quantize"
        cmd = [str(tool), "--imatrix", str(imatrix), str(f32), str(tmp), preset, "2"]
        subprocess.run(cmd, check=True, capture_output=True)
    tmp.rename(out)
    return out


def lowrank(args: argparse.Namespace) -> None:
    """The low-rank form of the real style vector against its full form: size, Frobenius error, KL, style.

    Each form (``--ranks``, and ``--energy``) is converted from the same fine-tune (cached beside the full
    vector), merged at λ = 1 into the F32 base exactly (``--requant f32``) and, with the default policy, into
    the Q4_K_M base; KL is against the full form's exact merge on the same tokens, the style margin and
    accuracy on the held-out questions.
    """
    from transformers import AutoTokenizer

    from alignvec_gguf import AlignmentVector, merge
    from alignvec_gguf.fidelity import kl_divergence, model_logits

    args.variants = ["Q4_K_M"]
    base, full = style_vector(args)
    score, tokens = style_scorer(AutoTokenizer.from_pretrained(base.hf), args.threads)
    aligned = full.parent / "aligned"
    forms: list[tuple[str, Path, dict[str, Any]]] = [("full", full, {})]
    for rank in [int(r) for r in args.ranks.split(",") if r]:
        forms.append((f"rank {rank}", full.parent / f"style.r{rank}.avec.gguf", {"rank": rank}))
    if args.energy:
        forms.append(
            (f"energy {args.energy:g}", full.parent / f"style.e{args.energy:g}.avec.gguf", {"energy": args.energy})
        )
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="alignvec-lowrank-") as tmp:
        ref = None
        for label, path, how in forms:
            if how and not path.is_file():
                convert(base.hf, aligned, path, name="pirate-style", domain="style", dtype="f16", **how)
            av = AlignmentVector(path)
            exact = merge(base.ggufs["F32"], {path: 1.0}, Path(tmp) / "exact.gguf", requant="f32").path
            logits = model_logits(exact, tokens, args.threads)
            ref = logits if ref is None else ref
            row = {
                "size_mb": round(path.stat().st_size / 2**20, 2),
                "frobenius_rel_error": 0.0 if av.lora is None else round(av.lora.rel_error, 4),
                "kl_vs_full_f32": round(kl_divergence(ref, logits), 6),
                **{k: round(v, 4) for k, v in score(exact).items()},
            }
            q4 = merge(base.ggufs["Q4_K_M"], {path: 1.0}, Path(tmp) / "q4.gguf").path
            row["kl_vs_full_f32_q4km_default"] = round(kl_divergence(ref, model_logits(q4, tokens, args.threads)), 6)
            row |= {f"q4km_default_{k}": round(v, 4) for k, v in score(q4).items()}
            rows[label] = row
            log.info("%s: %s", label, row)
    full_size = rows["full"]["size_mb"]
    print(f"{'form':12} {'size':>9} {'Frob err':>9} {'KL F32':>9} {'margin':>7} {'acc':>5} {'KL Q4_K_M':>10} margin")
    for label, r in rows.items():
        print(
            f"{label:12} {r['size_mb'] / full_size:8.1%} {r['frobenius_rel_error']:9.3f} {r['kl_vs_full_f32']:9.2e} "
            f"{r['margin']:7.2f} {r['style_acc']:5.2f} {r['kl_vs_full_f32_q4km_default']:10.2e} "
            f"{r['q4km_default_margin']:7.2f}"
        )
    print(json.dumps({"model": "SmolLM2-135M-Instruct, style SFT vector, λ = 1", "forms": rows}))


def types(args: argparse.Namespace) -> None:
    policies = args.policies.split(",") if args.policies else TYPE_POLICIES
    lambdas = [float(x) for x in args.type_lambdas.split(",")]
    presets = args.types.split(",") if args.types != "all" else TYPE_PRESETS
    tmp = tempfile.TemporaryDirectory(prefix="alignvec-fidelity-types-")
    root = Path(tmp.name)
    runs: list[tuple[Path, Path, Path, Path, list[int] | None]] = []  # (F32, hf dir, av, work dir, tokens)
    if args.model == "smollm2":
        base, av = style_vector(args)
        from transformers import AutoTokenizer

        _, toks = style_scorer(AutoTokenizer.from_pretrained(base.hf), args.threads)
        runs.append((base.ggufs["F32"], base.hf, av, base.q4_1.parent / "types", toks))
        model = "SmolLM2-135M-Instruct, style SFT vector"
    else:
        src = tm.llama_cpp_source(REPO / ".cache")
        tok = tm.train_tokenizer(root / "tok")
        for seed in range(args.seeds):
            work = root / f"s{seed}"
            b = tm.make_model(tm.llama_config(hidden=args.hidden, num_hidden_layers=args.layers), seed)
            aligned = tm.perturbed(b, seed + 1000, scale=args.scale * math.sqrt(2 / math.pi))
            base_dir, aligned_dir = tm.save(b, None, work / "base", tok), tm.save(b, aligned, work / "aligned", tok)
            av = convert(base_dir, aligned_dir, work / "v.avec.gguf").path
            runs.append((tm.hf_to_gguf(src, base_dir, work / "base-f32.gguf"), base_dir, av, work, None))
        model = f"tiny Llama (hidden {args.hidden}, {args.layers} layers), Δ = {args.scale:.0%} of mean |w|"
    sums: dict[tuple[str, float, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for f32, hf_dir, av, work, toks in runs:
        work.mkdir(parents=True, exist_ok=True)
        imat_tokens = toks if toks is not None else list(np.random.default_rng(0).integers(3, tm.VOCAB, 1024))
        imatrix = make_imatrix(hf_dir, [int(t) for t in imat_tokens], work / "imatrix.dat")
        for preset in presets:
            imat = imatrix if preset in NEEDS_IMATRIX else None
            t0 = time.perf_counter()
            path = quantize_preset(f32, work / f"base-{preset}.gguf", preset, imat)
            for lam in lambdas:
                r = fidelity(path, {av: lam}, policies=policies, full_base=f32, tokens=toks, imatrix=imat,
                             threads=args.threads)  # fmt: skip
                assert r.anchor is not None
                for m in [*r.rows, r.anchor]:
                    d = sums[(preset, lam, m.label)]
                    d["kept"].append(m.shift_kept)
                    d["cos"].append(m.shift_cos)
                    d["kl_vs_anchor"].append(m.kl / r.anchor.kl)
                    d["size_ratio"].append(m.size_ratio)
                    d["weight_kept"].append(m.weight_kept)
                    d["weight_kept_min"].append(m.weight_kept_min)
                    d["warned"].append(float(any("of the requested change" in w for w in m.warnings)))
            log.info("%s: %.0f s", preset, time.perf_counter() - t0)
    mean = {k: {f: float(np.mean(v)) for f, v in d.items()} for k, d in sums.items()}
    print(f"{model}; {len(runs)} model(s); default policy {DEFAULT_POLICY}")
    print(
        f"{'base':8} {'λ':>4} {'policy':10} {'kept':>6} {'cosine':>7} {'xanchor':>8} {'size':>6} "
        f"{'w.kept':>7} {'w.min':>6} warned"
    )
    for preset in presets:
        for lam in lambdas:
            for label in [*policies, "anchor"]:
                m = mean[(preset, lam, label)]
                print(
                    f"{preset:8} {lam:4.1f} {label:10} {m['kept']:6.3f} {m['cos']:7.3f} {m['kl_vs_anchor']:8.2f} "
                    f"{m['size_ratio']:5.2f}x {m['weight_kept']:7.3f} {m['weight_kept_min']:6.3f} "
                    f"{'yes' if m['warned'] else 'no'}"
                )

    def row(preset: str, lam: float = 1.0, label: str = DEFAULT_POLICY) -> dict[str, Any]:
        m = mean[(preset, lam, label)]
        out: dict[str, Any] = {k: round(m[k], 4) for k in ("kept", "cos", "kl_vs_anchor", "size_ratio")}
        out["warned"] = bool(m["warned"])
        return out

    table = {p: row(p) for p in presets}
    goal = {p: table[p]["kept"] >= 0.5 and table[p]["kl_vs_anchor"] <= 1.2 for p in ("IQ4_XS", "IQ4_NL") if p in table}
    result = {
        "model": model,
        "default_policy": DEFAULT_POLICY,
        "lambda": 1.0,
        "types": table,
        "goal_iq4_kept_0.5_kl_1.2x": goal,
        "same_size_l1": {
            pol: {p: row(p, 1.0, pol) for p in presets if (p, 1.0, pol) in mean} for pol in ("calibrated", "dither")
        },
        "same_l1": {p: row(p, 1.0, "same") for p in presets if (p, 1.0, "same") in mean},
        "figures": {
            f"{p}/{lam}/{lab}": {k: round(x, 4) for k, x in mean[(p, lam, lab)].items()} for p, lam, lab in mean
        },
    }
    tmp.cleanup()
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["synthetic", "smollm2"], default="synthetic")
    parser.add_argument("--policies", default=None, help="comma-separated; the JSON needs the default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--types", nargs="?", const="all", default=None, help="every downloaded type (or a comma-separated few)"
    )
    parser.add_argument("--type-lambdas", default="1,0.3", help="--types: comma-separated λ (the JSON needs 1)")
    parser.add_argument("--grids", action="store_true", help="weight-space kept share of every ggml type (fast)")
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
    smol.add_argument(
        "--lowrank", action="store_true", help="the low-rank forms of the style vector against its full form"
    )
    smol.add_argument("--ranks", default="8,32,128", help="--lowrank: ranks to measure")
    smol.add_argument(
        "--energy", type=float, default=0.9, help="--lowrank: also the form keeping this energy (0: none)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.lowrank:
        lowrank(args)
    elif args.grids:
        grids(args)
    elif args.types:
        args.variants = ["F32"]
        types(args)
    elif args.model == "synthetic":
        args.policies = args.policies or ",".join(POLICIES)
        synthetic(args)
    else:
        args.variants = args.variants.split(",")
        args.lambdas = [float(x) for x in args.lambdas.split(",")]
        real(args)


if __name__ == "__main__":
    main()
