"""``alignvec demo``: the preference spectrum as a dial, three domains, one knob each, on a real model.

SmolLM2-135M-Instruct by default: one held-out question per domain answered at each λ with that domain's AV
merged into its Q4_1 file, then a short preference-accuracy table. When the model cannot be fetched (no package
index reachable), or with ``--tiny``, the bundled tiny models instead, said in one line. Nothing but the answers
goes to stdout between them. The data, the merges and the answers come from :mod:`alignvec_gguf.demodata`;
this module chooses what to show and prints it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import textwrap
from collections.abc import Sequence

from .. import demodata  # called through the module: what tests (and users) patch there applies here
from ..demodata import BASE_FILE, DEMO_DOMAIN, DOMAINS, REAL_REPEAT_PENALTY, DemoData, check_lambdas, quiet_merges
from ..errors import InputError
from ..eval import evaluate
from ..evalset import EvalItem
from ..policy import DEFAULT_POLICY
from .report import eval_table

DEFAULT_LAMBDAS = (-1.0, 0.0, 0.5, 1.0)
TINY_TOKENS = 48
REAL_TOKENS = 72
REAL_TABLE_LAMBDAS = (-1.0, 0.0, 0.5, 1.0)
REAL_TABLE_LIMIT = 6  # questions per domain in the demo's table (alignvec eval --model smollm2 runs them all)


def cmd_demo(args: argparse.Namespace) -> int:
    """``alignvec demo``: :func:`run_demo` with the command line's arguments."""
    return run_demo(lambdas=args.lambdas, n_tokens=args.n, quiet=args.quiet, table=not args.no_table, tiny=args.tiny)


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip() or "(nothing)"


def lambda_label(lam: float) -> str:
    """``λ=-1``, ``λ=0.5``... with a note on the two ends of the dial."""
    note = {0.0: " base", 1.0: " expert AV"}.get(lam, "")
    return f"λ={lam:g}{note}"


def format_answers(prompt: str, answers: dict[float, str], width: int) -> str:
    """The prompt, then one wrapped answer per λ under a right-aligned λ label."""
    labels = {lam: lambda_label(lam) for lam in answers}
    label_width = max(len(label) for label in labels.values())
    indent = " " * (label_width + 4)
    lines = [textwrap.fill(prompt, width=width, subsequent_indent="  ")]
    for lam, text in answers.items():
        head = f"  {labels[lam]:>{label_width}}  "
        lines.append(textwrap.fill(_one_line(text), width=width, initial_indent=head, subsequent_indent=indent))
    return "\n".join(lines)


def header(n_tokens: int) -> str:
    """What the demo shows, in a few lines."""
    return "\n".join(
        [
            "alignvec demo: the preference spectrum as a dial, θ(λ) = θ_base + Σ λ_d·AV_d",
            f"  base: a tiny Llama ({BASE_FILE}) that answers medical, legal and financial questions at the",
            "        generic level; levels: avoidance (declines), generic (plain advice), expert (specialist).",
            "  AVs:  θ_DPO − θ_base per domain (medical, legal, financial), DPO toward expert ≻ generic ≻ avoidance.",
            "  Each λ is merged into the Q4_K_M base (touched tensors requantized to their own types);",
            f"  answers are greedy ({n_tokens} tokens). The tiny models: demo_data/PROVENANCE.md.",
        ]
    )


def table_intro() -> str:
    """The lines before the accuracy table."""
    return (
        "Preference accuracy (arXiv 2410.19206): share of held-out questions whose most likely response\n"
        "(length-normalised log-likelihood, llama.cpp) is each level, one domain's AV merged at a time."
    )


def real_header(n_tokens: int) -> str:
    """What the real-model demo shows, in a few lines."""
    return "\n".join(
        [
            "alignvec demo: the preference spectrum as a dial, θ(λ) = θ_base + Σ λ_d·AV_d",
            "  base: SmolLM2-135M-Instruct as published (Q4_1 GGUF); levels: avoidance (declines),",
            "        generic (plain advice), expert (specialist: assessment, specific action, referral).",
            "  AVs:  θ_DPO − θ_base per domain (medical, legal, financial), DPO toward expert ≻ generic ≻ avoidance",
            "        (demo_data/smollm2/PROVENANCE.md). Each λ is merged into the Q4_1 file; answers are greedy",
            f"        (repeat penalty {REAL_REPEAT_PENALTY:g}, {n_tokens} tokens at most), in its chat template.",
        ]
    )


def run_real_demo(data: DemoData, lambdas: Sequence[float], n_tokens: int, quiet: bool, table: bool) -> int:
    """Answer one held-out question per domain at each λ with SmolLM2, then a short accuracy table."""
    answers = demodata.real_answers(data, lambdas, n_tokens, progress=not quiet)
    width = max(60, min(120, shutil.get_terminal_size((100, 24)).columns))
    print(real_header(n_tokens))
    for domain in DOMAINS:
        print()
        print(f"A held-out {domain} question, the {domain} AV at each λ:")
        print(format_answers(data.questions[domain], answers[domain], width))
    sys.stdout.flush()
    if table:
        by_domain: dict[str, list[EvalItem]] = {}
        for it in data.items():
            if len(by_domain.setdefault(it.domain, [])) < REAL_TABLE_LIMIT:
                by_domain[it.domain].append(it)
        items = [it for group in by_domain.values() for it in group]
        with quiet_merges():
            result = evaluate(data.base, data.vectors, items, REAL_TABLE_LAMBDAS, progress=not quiet,
                              desc="preference accuracy")  # fmt: skip
        print()
        print(table_intro())
        print(f"({REAL_TABLE_LIMIT} held-out questions per domain here; the full set: examples/preference_spectrum/)")
        print(eval_table(result, title=f"SmolLM2 Q4_1 base, requant {DEFAULT_POLICY}:"))
    return 0


def run_demo(
    lambdas: Sequence[float] | None = None,
    n_tokens: int | None = None,
    quiet: bool = False,
    table: bool = True,
    tiny: bool = False,
) -> int:
    """The real-model demo (:func:`run_real_demo`), or the tiny one when asked or when SmolLM2 cannot be fetched."""
    grid = check_lambdas(lambdas or DEFAULT_LAMBDAS)
    n = n_tokens if n_tokens is not None else (TINY_TOKENS if tiny else REAL_TOKENS)
    if n < 1:
        raise InputError(f"-n must be at least 1, got {n}")
    if not tiny:
        try:
            base = demodata.fetch_real_model(progress=not quiet)
        except InputError as e:
            print(f"SmolLM2 could not be fetched ({e}); showing the bundled tiny models instead.")
        else:
            with demodata.real_demo_data(base) as data:
                return run_real_demo(data, grid, n, quiet, table)
    return run_tiny_demo(grid, n, quiet, table)


def run_tiny_demo(lambdas: Sequence[float], n_tokens: int, quiet: bool = False, table: bool = True) -> int:
    """Answer the tiny demo question at each λ, print the answers side by side, then the accuracy table."""
    answers = demodata.generate_answers(lambdas, n_tokens, progress=not quiet)
    width = max(60, min(120, shutil.get_terminal_size((100, 24)).columns))
    print(header(n_tokens))
    print()
    print(f"One held-out {DEMO_DOMAIN} question, {DEMO_DOMAIN} AV at each λ:")
    print(format_answers(demodata.demo_question().prompt, answers, width))
    if table:
        result = demodata.accuracy_table(progress=not quiet)
        print()
        print(table_intro())
        print(eval_table(result, title=f"Q4_K_M base ({BASE_FILE}), requant {DEFAULT_POLICY}:"))
    return 0
