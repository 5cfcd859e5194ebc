"""The paper's cost and transfer claims (arXiv 2410.19206), measured on the preference-spectrum models.

Needs the build of ``examples/preference_spectrum/build.py`` (its ``--build-dir``, default
``build/preference_spectrum``: ``stats.json``, ``base.Q4_K_M.gguf``, ``stage2.Q4_K_M.gguf``) and the
domain AVs and held-out set it bundles into ``alignvec_gguf/demo_data``.

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

Usage: python benchmarks/paper_claims.py [--build-dir DIR] [--grid -1 -0.5 0 0.5 1] [--limit N]. The last line is JSON.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "preference_spectrum"))

import data as spectrum  # noqa: E402

from alignvec_gguf import merge  # noqa: E402
from alignvec_gguf.demo import demo_data  # noqa: E402
from alignvec_gguf.eval import by_domain, evaluate  # noqa: E402
from alignvec_gguf.search import DEFAULT_GRID, search  # noqa: E402

OPENERS = {"medical": "Clinically", "legal": "Legally", "financial": "Financially"}
MAX_TOKENS = 96


def answer_costs(model: Path, prompts: list[tuple[str, str]]) -> dict[str, float]:
    """Greedy answers until EOS: mean tokens processed, mean seconds per answer, share in expert style."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), n_ctx=0, verbose=False, seed=0, n_threads=1, n_threads_batch=1)
    tokens, seconds, expert = [], [], 0
    for domain, prompt in prompts:
        n_prompt = len(llm.tokenize(prompt.encode(), add_bos=True))
        llm.reset()  # no prompt cache across answers: each answer pays for its own prompt
        start = time.perf_counter()
        out = llm.create_completion(prompt, max_tokens=MAX_TOKENS, temperature=0.0, seed=0)
        seconds.append(time.perf_counter() - start)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build" / "preference_spectrum")
    parser.add_argument("--grid", type=float, nargs="+", default=list(DEFAULT_GRID), help="λ grid of the search")
    parser.add_argument("--limit", type=int, default=None, help="first N held-out questions per domain (quick runs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
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

        own = evaluate(bundled.base, bundled.vectors, items, [1.0])
        moved = evaluate(stage2, bundled.vectors, items, [0.0, 1.0])
    own_expert = statistics.mean(own.expert_share(d, 1.0) for d in own.curves)
    stage2_expert = statistics.mean(moved.expert_share(d, 1.0) for d in moved.curves)
    stage2_base = statistics.mean(moved.expert_share(d, 0.0) for d in moved.curves)
    print(
        f"transfer: expert share at λ=1 {stage2_expert:.2f} on stage 2 (λ=0: {stage2_base:.2f}), "
        f"{own_expert:.2f} on its own base"
    )
    result = {
        "prompt_vs_av_cost": round(cost["token_ratio"], 3),
        "prompt_vs_av_time": round(cost["time_ratio"], 3),
        "retrain_vs_av_speedup": round(speedup, 2),
        "transfer_accuracy": round(stage2_expert, 3),
        "transfer_own_base_accuracy": round(own_expert, 3),
        "transfer_stage2_lambda0_expert": round(stage2_base, 3),
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
