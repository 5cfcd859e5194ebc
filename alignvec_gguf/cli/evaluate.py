"""``alignvec eval`` (preference accuracy over a λ grid, and with ``--search`` the multidomain search) and
``alignvec fidelity`` (how much of the knob each requant policy keeps)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ..demodata import demo_data
from ..errors import InputError
from ..eval import domain_of, evaluate
from ..evalset import by_domain, load_eval_set
from ..fidelity import fidelity
from ..search import search
from .args import vectors as parse_vectors
from .report import eval_table, max_expert_gap, plot, search_table, write_json


def cmd_eval(args: argparse.Namespace) -> int:
    """``alignvec eval``: :func:`run_eval` with the command line's arguments."""
    return run_eval(
        base=args.base,
        vectors=args.vector,
        data=args.data,
        lambdas=args.lambdas,
        compare=args.compare,
        requant=args.requant,
        run_search=args.search,
        grid=args.grid,
        threshold=args.threshold,
        limit=args.limit,
        output_dir=args.output_dir,
        make_plot=not args.no_plot,
        n_threads=args.threads,
        progress=not args.quiet,
    )


def run_eval(
    *,
    base: str | None,
    vectors: Sequence[str] | None,
    data: str | None,
    lambdas: Sequence[float],
    compare: str | None = None,
    requant: str = "same",
    run_search: bool = False,
    grid: Sequence[float] = (),
    threshold: float = 0.5,
    limit: int | None = None,
    output_dir: str = "alignvec-eval",
    make_plot: bool = True,
    n_threads: int | None = None,
    progress: bool = True,
) -> int:
    """``alignvec eval``: tables on stdout, ``eval.json`` and ``eval.png`` in ``output_dir``. Returns 0.

    Defaults (no base, vectors or data given) are the bundled demo models and held-out set.
    """
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    out_dir = Path(output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--output-dir {out_dir} is a file; give a directory")
    for given in [base, compare, data, *(vectors or [])]:
        if given is not None and not Path(given).is_file():
            raise InputError(f"{given} does not exist")
    with ExitStack() as stack:
        need_bundled = not (base and vectors and data)
        bundled = stack.enter_context(demo_data()) if need_bundled else None
        base_path = Path(base) if base else bundled.base  # type: ignore[union-attr]
        items = load_eval_set(data) if data else bundled.items()  # type: ignore[union-attr]
        by_vector: dict[str, str | os.PathLike[str]] = {}
        for v in vectors or []:
            domain = domain_of(v)
            if domain in by_vector:
                raise InputError(f"two vectors are for domain {domain!r}; give one vector per domain")
            by_vector[domain] = v
        if not vectors:
            by_vector = dict(bundled.vectors)  # type: ignore[union-attr]
        if limit is not None:
            items = [it for group in by_domain(items).values() for it in group[:limit]]
        out_dir.mkdir(parents=True, exist_ok=True)
        runs = [("this base", base_path)] + ([("compare", Path(compare))] if compare else [])
        results = []
        for label, path in runs:
            one = evaluate(path, by_vector, items, lambdas, requant=requant, n_threads=n_threads, progress=progress,
                           desc=f"eval {path.name}")  # fmt: skip
            results.append((label, one))
        payload: dict[str, Any] = {"eval": results[0][1].to_json()}
        for _, result in results:
            print(eval_table(result))
            print()
        if compare:
            gap = max_expert_gap(results[0][1], results[1][1])
            payload["compare"] = results[1][1].to_json()
            payload["max_expert_gap"] = gap
            print(f"largest expert-share difference between {base_path.name} and {Path(compare).name}: {gap:.3f}")
        if run_search:
            found = search(base_path, by_vector, items, grid, threshold=threshold, requant=requant,
                           n_threads=n_threads, progress=progress)  # fmt: skip
            payload["search"] = found.to_json()
            print(search_table(found))
    write_json(out_dir / "eval.json", payload)
    written = [str(out_dir / "eval.json")]
    if make_plot:
        labels = [(Path(r.base).name, r) for _, r in results]
        plot(out_dir / "eval.png", labels)
        written.append(str(out_dir / "eval.png"))
    print(f"wrote {', '.join(written)}")
    return 0


def cmd_fidelity(args: argparse.Namespace) -> int:
    """Print (or with ``--json`` dump) the knob fidelity of each policy against the float reference."""
    vectors = parse_vectors(args.vector)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    report = fidelity(
        args.base, vectors, policies=policies, full_base=args.full_base, imatrix=args.imatrix, threads=args.threads
    )
    if args.json:
        print(report.dumps())
        return 0
    print(f"{args.base}: knob fidelity over {report.n_tokens} tokens, reference: {report.reference}")
    print(report.table())
    return 0
