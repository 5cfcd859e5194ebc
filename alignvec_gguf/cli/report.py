"""The output of ``alignvec eval`` and ``alignvec demo``: text tables of eval and search results, JSON and the PNG
plot of shares against λ (the plot needs the ``eval`` extra, matplotlib)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_output
from ..errors import InputError
from ..eval import EvalResult
from ..evalset import LEVELS
from ..search import SearchResult

SHORT = {"avoidance": "avoid", "generic": "generic", "expert": "expert"}


def eval_table(result: EvalResult, title: str | None = None) -> str:
    """λ rows; per domain one column per level with the share of questions preferring it."""
    domains = list(result.curves)
    col = 8
    block = col * len(LEVELS)
    lines = [title or f"preference accuracy: {Path(result.base).name}, requant {result.requant}"]
    lines.append(" " * 7 + "".join(f"{f'{d} (n={result.n_items[d]})':^{block}}" for d in domains))
    lines.append(f"{'λ':>6} " + "".join(f"{SHORT[lv]:>{col}}" for _ in domains for lv in LEVELS))
    for lam in result.lambdas:
        cells = "".join(f"{result.curves[d][lam][lv]:>{col}.2f}" for d in domains for lv in LEVELS)
        lines.append(f"{lam:>6g} {cells}")
    return "\n".join(lines)


def max_expert_gap(a: EvalResult, b: EvalResult) -> float:
    """Largest |expert share difference| between two results over their common domains and λ."""
    gaps = [
        abs(a.curves[d][lam]["expert"] - b.curves[d][lam]["expert"])
        for d in a.curves
        if d in b.curves
        for lam in a.lambdas
        if lam in b.curves[d]
    ]
    return max(gaps, default=0.0)


def search_table(result: SearchResult) -> str:
    """One line per combination of targets: the λ found and each domain's target share."""
    d = result.domains
    lines = [
        f"multidomain search: {result.reached} of {len(result.combinations)} target combinations reached "
        f"(every domain's target share >= {result.threshold:g}; {len(result.points)} grid points, "
        f"{result.seconds:.0f}s)",
        "  " + "".join(f"{x:>11}" for x in d) + "   λ (" + ", ".join(d) + ")" + "   target shares",
    ]
    for c in result.combinations:
        targets = "".join(f"{c.targets[x]:>11}" for x in d)
        lams = ", ".join(f"{c.lambdas[x]:g}" for x in d)
        got = " ".join(f"{c.target_shares[x]:.2f}" for x in d)
        lines.append(f"{'*' if c.reached else ' '} {targets}   ({lams}){' ' * max(1, 14 - len(lams))}{got}")
    return "\n".join(lines)


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def plot(
    path: str | os.PathLike[str],
    results: Sequence[tuple[str, EvalResult]],
    levels: Sequence[str] = LEVELS,
    title: str = "Preference accuracy against λ (likelihood-ranked level, llama.cpp)",
) -> None:
    """PNG: one panel per domain, the share of each of ``levels`` against λ; one line style per labelled result."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("the plot needs matplotlib: pip install 'alignvec-gguf[eval]' (or pass --no-plot)") from None
    if not results:
        raise InputError("nothing to plot")
    domains = list(results[0][1].curves)
    colors = {"avoidance": "tab:red", "generic": "tab:gray", "expert": "tab:blue"}
    styles = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1))]
    fig, axes = plt.subplots(1, len(domains), figsize=(4.2 * len(domains), 3.6), sharey=True, squeeze=False)
    for ax, domain in zip(axes[0], domains, strict=True):
        for (label, result), style in zip(results, styles, strict=False):
            if domain not in result.curves:
                continue
            xs = result.lambdas
            for lv in levels:
                ys = [result.curves[domain][lam][lv] for lam in xs]
                marker = "o" if style == "-" else None
                ax.plot(xs, ys, linestyle=style, color=colors[lv], marker=marker, ms=3, label=f"{lv} ({label})")
        ax.set_title(f"{domain} AV")
        ax.set_xlabel("λ")
        ax.axvline(0, color="black", lw=0.5)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of held-out questions")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1 if len(results) > 1 else 0.08, 1, 1))
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
