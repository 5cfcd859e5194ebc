"""The paper's cost and transfer claims (arXiv 2410.19206), measured on the preference-spectrum models.

Long module: the paper's claims share their models, prompts and timers, and report in one JSON line.

``--model tiny`` (default) needs the build of ``examples/preference_spectrum/build.py`` (its
``--build-dir``, default ``build/preference_spectrum``: ``stats.json``, ``base.Q4_K_M.gguf``,
``stage2.Q4_K_M.gguf``) and the domain AVs and held-out set bundled in ``alignvec_gguf/demo_data``.
``--model smollm2`` needs ``build.py --model smollm2`` (``build/preference_spectrum_smollm2``) and runs on
the published Q4_1 file, with the model's chat template for every prompt; it adds DeRa (arXiv
2402.02992: the base's and the aligned model's logits mixed per token, two forward passes) as a second
anchor: its cost per answer against the merged model's.

- ``prompt_vs_av_cost``: expert answers to the held-out questions, (a) prompt engineering: the Q4_K_M
  base with the expert level instruction before the question, (b) the base with the domain AV merged at
  λ = 1 and the plain question. Tokens processed (prompt + generated) and wall time per answer, greedy,
  until EOS; the figure is the ratio of tokens (a)/(b); the paper claims about 2x (inference cost halved).
  The merge itself is a one-off cost per mix, reported apart.
- ``retrain_vs_av_speedup``: training a joint model per multidomain mix (the build times one joint DPO
  run; a mix of 3 domains x 3 levels has 27 combinations) against training the three AVs once and
  searching λ for all 27 (``alignvec_gguf.search``, timed here). The paper claims 12x.
- ``transfer_accuracy``: the AVs made on the base, merged at λ = 1 into the second-stage checkpoint
  (the base fine-tuned further on general text): mean expert share over the domains, next to the same
  figure on the base the AVs were made from.

Usage: python benchmarks/paper_claims.py [--model tiny|smollm2] [--build-dir DIR] [--grid -1 -0.5 0 0.5 1]
[--limit N] [--search-limit N] [--parts costs search transfer dera]. The last line is JSON. Answers are timed
in CPU seconds of the process (one llama.cpp thread), merges and the search by the wall clock.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "preference_spectrum"))

import data as spectrum  # noqa: E402

from alignvec_gguf import merge  # noqa: E402
from alignvec_gguf.demodata import demo_data  # noqa: E402
from alignvec_gguf.eval import evaluate  # noqa: E402
from alignvec_gguf.evalset import by_domain  # noqa: E402
from alignvec_gguf.search import DEFAULT_GRID, search  # noqa: E402

OPENERS = {"medical": "Clinically", "legal": "Legally", "financial": "Financially"}
MAX_TOKENS = 96
# Answers are timed in CPU seconds of this process (llama.cpp runs one thread here), so other jobs on the
# machine do not distort the ratios; merges and searches are timed by the wall clock (what a user waits).
CLOCK = time.process_time


def answer_costs(model: Path, prompts: list[tuple[str, str]]) -> dict[str, float]:
    """Greedy answers until EOS: mean tokens processed, mean seconds per answer, share in expert style."""
    from alignvec_gguf.cpu import new_llama

    llm = new_llama(model, n_ctx=0, verbose=False, seed=0, n_threads=1, n_threads_batch=1)
    tokens, seconds, expert = [], [], 0
    for domain, prompt in prompts:
        n_prompt = len(llm.tokenize(prompt.encode(), add_bos=True))
        llm.reset()  # no prompt cache across answers: each answer pays for its own prompt
        start = CLOCK()
        out = llm.create_completion(prompt, max_tokens=MAX_TOKENS, temperature=0.0, seed=0)
        seconds.append(CLOCK() - start)
        tokens.append(n_prompt + int(out["usage"]["completion_tokens"]))  # type: ignore[index]
        expert += str(out["choices"][0]["text"]).strip().startswith(OPENERS[domain])  # type: ignore[index]
    llm.close()
    return {
        "tokens_per_answer": statistics.mean(tokens),
        "seconds_per_answer": statistics.mean(seconds),
        "expert_style_share": expert / len(prompts),
    }


def prompt_vs_av(base: Path, vectors: dict[str, Path], items: list, work: Path) -> dict:
    """(a) instruction in the prompt of the base, (b) the domain AV at λ = 1 with the plain prompt."""
    instruction = spectrum.INSTRUCTIONS["expert"]
    prompted = [(it.domain, f"Instruction: {instruction} {it.prompt}") for it in items]
    a = answer_costs(base, prompted)
    b_parts, merge_seconds = [], []
    for domain, vector in vectors.items():
        merged = work / f"{domain}.gguf"
        start = time.perf_counter()
        merge(base, {vector: 1.0}, merged)
        merge_seconds.append(time.perf_counter() - start)
        mine = [(it.domain, it.prompt) for it in items if it.domain == domain]
        b_parts.append((len(mine), answer_costs(merged, mine)))
    n = sum(k for k, _ in b_parts)
    b = {key: sum(k * part[key] for k, part in b_parts) / n for key in a}
    return {
        "prompt_engineering": a,
        "alignment_vector": b,
        "merge_seconds_per_domain": statistics.mean(merge_seconds),
        "token_ratio": a["tokens_per_answer"] / b["tokens_per_answer"],
        "time_ratio": a["seconds_per_answer"] / b["seconds_per_answer"],
    }


def transfer(own_base: Path, stage2: Path, vectors: dict[str, Path], items: list) -> dict[str, float]:
    """The AVs at λ = 1 on the later fine-tuning stage against their own base: mean expert shares."""
    own = evaluate(own_base, vectors, items, [1.0])
    moved = evaluate(stage2, vectors, items, [0.0, 1.0])
    own_expert = statistics.mean(own.expert_share(d, 1.0) for d in own.curves)
    stage2_expert = statistics.mean(moved.expert_share(d, 1.0) for d in moved.curves)
    stage2_base = statistics.mean(moved.expert_share(d, 0.0) for d in moved.curves)
    print(
        f"transfer: expert share at λ=1 {stage2_expert:.2f} on {stage2.name} (λ=0: {stage2_base:.2f}), "
        f"{own_expert:.2f} on its own base {own_base.name}"
    )
    return {
        "transfer_accuracy": round(stage2_expert, 3),
        "transfer_own_base_accuracy": round(own_expert, 3),
        "transfer_stage2_lambda0_expert": round(stage2_base, 3),
    }


# --- the real model (--model smollm2) ---

SMOLLM2_GRID = (-1.0, 0.0, 1.0)  # 27 merges: the search's cost on 2 cores; the paper searched a finer grid
DERA_LAMBDA = 0.5  # a point between the ends of the dial, where DeRa really needs both models


def _chat(llm, messages: list[dict[str, str]]) -> tuple[int, int, float, str]:  # noqa: ANN001
    """(prompt tokens, generated tokens, seconds, text) of one greedy chat answer, no prompt cache."""
    llm.reset()
    start = CLOCK()
    out = llm.create_chat_completion(messages, max_tokens=MAX_TOKENS, temperature=0.0, seed=0)
    seconds = CLOCK() - start
    usage = out["usage"]
    return (
        int(usage["prompt_tokens"]),
        int(usage["completion_tokens"]),
        seconds,
        out["choices"][0]["message"]["content"],
    )


def _has_figure(text: str) -> bool:
    """The expert level's mark that survives paraphrase: a specific figure (a dose, a deadline, an amount)."""
    return any(ch.isdigit() for ch in text)


def chat_costs(model: Path, conversations: list[list[dict[str, str]]]) -> dict[str, float]:
    """Mean tokens processed (prompt + generated), seconds per answer and share of answers with a figure."""
    from alignvec_gguf.cpu import new_llama

    llm = new_llama(model, n_ctx=1024, verbose=False, seed=0, n_threads=1, n_threads_batch=1)
    rows = [_chat(llm, messages) for messages in conversations]
    llm.close()
    return {
        "prompt_tokens": statistics.mean(r[0] for r in rows),
        "tokens_per_answer": statistics.mean(r[0] + r[1] for r in rows),
        "seconds_per_answer": statistics.mean(r[2] for r in rows),
        "figure_share": statistics.mean(_has_figure(r[3]) for r in rows),
    }


def _last_logits(llm):  # noqa: ANN001, ANN202
    """The logits after the last evaluated token (llama-cpp-python keeps none itself without logits_all)."""
    import numpy as np

    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).astype(np.float32)


def dera_costs(base: Path, aligned: Path, merged: Path, prompts: list[str], lam: float) -> dict[str, float]:
    """Seconds per greedy answer: DeRa (two models, logits mixed per token) against the merged model at λ."""
    from alignvec_gguf.cpu import new_llama

    kwargs: dict[str, Any] = dict(n_ctx=1024, verbose=False, seed=0, n_threads=1, n_threads_batch=1)
    m0, m1, mm = new_llama(base, **kwargs), new_llama(aligned, **kwargs), new_llama(merged, **kwargs)
    eos = m0.token_eos()
    dera, single, agree = [], [], 0
    for text in prompts:
        prompt = m0.tokenize(text.encode(), add_bos=True, special=True)
        start = CLOCK()
        for m in (m0, m1):
            m.reset()
            m.eval(prompt)
        tokens: list[int] = []
        for _ in range(MAX_TOKENS):
            z = (1 - lam) * _last_logits(m0) + lam * _last_logits(m1)
            tok = int(z.argmax())
            if tok == eos:
                break
            tokens.append(tok)
            m0.eval([tok])
            m1.eval([tok])
        dera.append((CLOCK() - start, len(tokens)))
        mm.reset()
        start = CLOCK()
        mm.eval(prompt)
        own: list[int] = []
        for _ in range(MAX_TOKENS):
            tok = int(_last_logits(mm).argmax())
            if tok == eos:
                break
            own.append(tok)
            mm.eval([tok])
        single.append((CLOCK() - start, len(own)))
        agree += tokens[:16] == own[:16]
    for m in (m0, m1, mm):
        m.close()
    per_token = statistics.mean(t / max(1, n) for t, n in dera) / statistics.mean(t / max(1, n) for t, n in single)
    return {
        "dera_seconds_per_answer": statistics.mean(t for t, _ in dera),
        "merged_seconds_per_answer": statistics.mean(t for t, _ in single),
        "dera_vs_merged_time_per_token": per_token,
        "first_16_tokens_agree": agree / len(prompts),
    }


PARTS = ("costs", "search", "transfer", "dera")


def smollm2_claims(args: argparse.Namespace) -> None:
    """The claims on SmolLM2-135M (build.py --model smollm2), on the published Q4_1 file.

    ``args.parts`` picks what to measure; the figures of the other parts are kept from an earlier run's
    ``results/smollm2/paper_claims.json``, so one part can be measured again alone.
    """
    from alignvec_gguf.eval import evaluate_dera
    from alignvec_gguf.evalset import load_eval_set

    build = args.build_dir or ROOT / "build" / "preference_spectrum_smollm2"
    stats_file = build / "stats.json"
    if not stats_file.is_file():
        sys.exit(f"paper_claims.py: {stats_file} not found; run examples/preference_spectrum/build.py --model smollm2")
    stats = json.loads(stats_file.read_text(encoding="utf-8"))
    base = build / "base.Q4_1.gguf"  # the published file (the build links it)
    vectors = {d: build / f"{d}.avec.gguf" for d in spectrum.DOMAINS}
    records = json.loads((build / "heldout.json").read_text(encoding="utf-8"))
    items = load_eval_set(build / "heldout.json")
    if args.limit:
        keep = {id(it) for group in by_domain(items).values() for it in group[: args.limit]}
        pairs = [(r, it) for r, it in zip(records, items, strict=True) if id(it) in keep]
        records, items = [r for r, _ in pairs], [it for _, it in pairs]
    out = ROOT / "examples" / "preference_spectrum" / "results" / "smollm2"
    out_file = out / "paper_claims.json"
    result: dict = json.loads(out_file.read_text(encoding="utf-8")) if out_file.is_file() else {}
    result |= {"model": "SmolLM2-135M-Instruct (Q4_1 as published)", "clock": "answers: process CPU seconds"}
    parts = set(args.parts or PARTS)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        merged = {}
        for domain, vector in vectors.items():
            merged[domain] = work / f"{domain}.gguf"
            start = time.perf_counter()
            merge(base, {vector: 1.0}, merged[domain])
            result.setdefault("merge_seconds", {})[domain] = round(time.perf_counter() - start, 2)
        if "costs" in parts:
            instruction = stats["instructions"]["expert"]
            prompted = [[{"role": "system", "content": instruction}, {"role": "user", "content": r["question"]}]
                        for r in records]  # fmt: skip
            a = chat_costs(base, prompted)
            costs = []
            for domain in vectors:
                mine = [[{"role": "user", "content": r["question"]}] for r in records if r["domain"] == domain]
                costs.append((len(mine), chat_costs(merged[domain], mine)))
            n = sum(k for k, _ in costs)
            b = {key: sum(k * part[key] for k, part in costs) / n for key in a}
            print(
                f"prompt engineering: {a['tokens_per_answer']:.1f} tokens ({a['prompt_tokens']:.0f} prompt), "
                f"{a['seconds_per_answer']:.2f} CPU s per answer, {a['figure_share']:.2f} with a figure; AV at "
                f"λ=1: {b['tokens_per_answer']:.1f} tokens ({b['prompt_tokens']:.0f} prompt), "
                f"{b['seconds_per_answer']:.2f} CPU s, {b['figure_share']:.2f} with a figure "
                f"(+ {statistics.mean(result['merge_seconds'].values()):.2f} s merge once per mix)"
            )
            result |= {
                "prompt_vs_av_cost": round(a["tokens_per_answer"] / b["tokens_per_answer"], 3),
                "prompt_vs_av_time": round(a["seconds_per_answer"] / b["seconds_per_answer"], 3),
                "prompt_engineering": a,
                "alignment_vector": b,
                "questions_per_domain": len(records) // len(vectors),
            }
        if "dera" in parts:
            half = work / "medical-half.gguf"
            merge(base, {vectors["medical"]: DERA_LAMBDA}, half)
            prompts = [r["prompt"] for r in records if r["domain"] == "medical"][:6]  # the chat template, rendered
            dera = dera_costs(base, merged["medical"], half, prompts, DERA_LAMBDA)
            print(
                f"DeRa at λ={DERA_LAMBDA}: {dera['dera_seconds_per_answer']:.2f} CPU s per answer against "
                f"{dera['merged_seconds_per_answer']:.2f} for the merged model "
                f"({dera['dera_vs_merged_time_per_token']:.2f}x per token)"
            )
            curve = evaluate_dera(base, vectors, items, [-1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 1.5])
            result |= {
                "dera": dera | {"lambda": DERA_LAMBDA, "questions": len(prompts)},
                "dera_vs_merged_time_per_token": round(dera["dera_vs_merged_time_per_token"], 3),
                "dera_curve": curve.to_json(),
            }

    if "search" in parts:
        search_items = items
        if args.search_limit:
            search_items = [it for group in by_domain(items).values() for it in group[: args.search_limit]]
        found = search(base, vectors, search_items, args.grid or SMOLLM2_GRID)
        av_train = sum(stats["seconds"]["dpo"].values())
        joint = stats["seconds"]["joint"]
        n_mixes = len(found.combinations)
        speedup = n_mixes * joint / (av_train + found.seconds)
        print(
            f"retrain: {joint:.0f} s per mix x {n_mixes} mixes; AVs: {av_train:.0f} s training (3 DPO runs) + "
            f"{found.seconds:.0f} s search ({len(found.points)} merges, {found.reached}/{n_mixes} reached)"
        )
        result |= {
            "retrain_vs_av_speedup": round(speedup, 2),
            "search_reached": found.reached,
            "search_combinations": n_mixes,
            "search_grid": found.grid,
            "search_questions_per_domain": len(search_items) // len(vectors),
            "search_seconds": round(found.seconds, 1),
            "joint_retrain_seconds": round(joint, 1),
            "av_training_seconds": round(av_train, 1),
            "joint_mix_accuracy": stats.get("joint_accuracy"),
            "joint_retrain_note": stats.get("joint_estimated", "measured"),
            "search": found.to_json(),
        }

    if "transfer" in parts:
        result |= transfer(build / "base.Q4_K_M.gguf", build / "stage2.Q4_K_M.gguf", vectors, items)

    out.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", "utf-8")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--build-dir", type=Path, default=None)
    parser.add_argument("--grid", type=float, nargs="+", default=None, help="λ grid of the search")
    parser.add_argument("--limit", type=int, default=None, help="first N held-out questions per domain (quick runs)")
    parser.add_argument("--search-limit", type=int, default=None, help="questions per domain in the search (smollm2)")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=None,
        help="smollm2: measure only these parts",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.model == "smollm2":
        smollm2_claims(args)
        return
    args.build_dir = args.build_dir or ROOT / "build" / "preference_spectrum"
    args.grid = args.grid or list(DEFAULT_GRID)
    stats_file = args.build_dir / "stats.json"
    if not stats_file.is_file():
        sys.exit(f"paper_claims.py: {stats_file} not found; run examples/preference_spectrum/build.py first")
    stats = json.loads(stats_file.read_text(encoding="utf-8"))
    stage2 = args.build_dir / "stage2.Q4_K_M.gguf"

    with demo_data() as bundled, tempfile.TemporaryDirectory() as tmp:
        items = bundled.items()
        if args.limit:
            items = [it for group in by_domain(items).values() for it in group[: args.limit]]
        cost = prompt_vs_av(bundled.base, bundled.vectors, items, Path(tmp))
        print(
            f"prompt engineering: {cost['prompt_engineering']['tokens_per_answer']:.1f} tokens, "
            f"{1000 * cost['prompt_engineering']['seconds_per_answer']:.1f} ms per answer; AV: "
            f"{cost['alignment_vector']['tokens_per_answer']:.1f} tokens, "
            f"{1000 * cost['alignment_vector']['seconds_per_answer']:.1f} ms "
            f"(+ {cost['merge_seconds_per_domain']:.2f} s once per mix)"
        )

        found = search(bundled.base, bundled.vectors, items, args.grid)
        av_train = sum(stats["dpo_seconds"].values())
        joint = stats["joint_seconds"]
        n_mixes = len(found.combinations)
        speedup = n_mixes * joint / (av_train + found.seconds)
        print(
            f"retrain: {joint:.1f} s per mix x {n_mixes} mixes; AVs: {av_train:.1f} s training (3 DPO runs) + "
            f"{found.seconds:.1f} s search ({len(found.points)} merges, {found.reached}/{n_mixes} reached)"
        )

        transferred = transfer(bundled.base, stage2, bundled.vectors, items)
    result = {
        "prompt_vs_av_cost": round(cost["token_ratio"], 3),
        "prompt_vs_av_time": round(cost["time_ratio"], 3),
        "retrain_vs_av_speedup": round(speedup, 2),
        **transferred,
        "joint_retrain_seconds": round(joint, 2),
        "av_training_seconds": round(av_train, 2),
        "search_seconds": round(found.seconds, 2),
        "search_reached": found.reached,
        "search_combinations": n_mixes,
        "prompt_engineering": cost["prompt_engineering"],
        "alignment_vector": cost["alignment_vector"],
        "joint_mix_accuracy": stats["accuracy"].get("joint"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
