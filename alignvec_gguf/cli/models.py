"""``alignvec merge``, ``run`` and ``serve``: a base model with alignment vectors, written, generated from or
served (``serve`` needs the ``serve`` extra)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..avfile import AlignmentVector
from ..errors import InputError
from ..export import write_modelfile
from ..live import LiveModel
from ..merge import merge
from ..runtime import load
from .args import vectors as parse_vectors


def check_not_an_input(output: str, inputs: list[tuple[str, str | None]]) -> None:
    """Refuse an output path that is one of the inputs: the rename would replace the user's file."""
    if not Path(output).is_file():
        return
    for what, path in inputs:
        if path is not None and Path(path).is_file() and os.path.samefile(output, path):
            raise InputError(f"output {output} is the {what} {path}; choose another output path")


def cmd_merge(args: argparse.Namespace) -> int:
    """Write base + Σ λ·AV to ``args.output`` (and an Ollama Modelfile with ``--modelfile``)."""
    vectors = parse_vectors(args.vector)
    inputs: list[tuple[str, str | None]] = [("alignment vector", str(v)) for v in vectors]
    inputs += [("importance matrix", args.imatrix), ("full-precision base", args.full_base)]
    check_not_an_input(args.output, inputs)
    report = merge(
        args.base,
        vectors,
        args.output,
        requant=args.requant,
        progress=not args.quiet,
        imatrix=args.imatrix,
        full_base=args.full_base,
    )
    print(f"wrote {report.path}: {len(report.touched)} tensors merged, {report.copied} copied, {report.seconds:.1f}s")
    if args.modelfile:
        print(f"wrote {write_modelfile(report.path)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Generate from base + Σ λ·AV (merged and cached, or merged in memory) and print the text."""
    llm = load(
        args.base,
        parse_vectors(args.vector),
        requant=args.requant,
        progress=not args.quiet,
        imatrix=args.imatrix,
        full_base=args.full_base,
        mode=args.load_mode,
        seed=args.seed,
        n_ctx=args.ctx,
        n_threads=args.threads,
    )
    out: Any = llm(args.prompt, max_tokens=args.n, temperature=args.temp, seed=args.seed)
    print(out["choices"][0]["text"])
    return 0


def parse_named_vector(spec: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (name, path); a bare ``PATH`` -> (None, path): the name comes from the file."""
    if Path(spec).is_file():
        return None, spec
    name, sep, path = spec.partition("=")
    if not sep:
        raise InputError(f"alignment vector {spec} does not exist; expected NAME=PATH, e.g. -v medical=med.avec.gguf")
    if not name or not path:
        raise InputError(f"bad -v {spec!r}: expected NAME=PATH, e.g. -v medical=medical.avec.gguf")
    if not Path(path).is_file():
        raise InputError(f"alignment vector {path} does not exist")
    return name, path


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the base with live knobs (low-rank vectors) until interrupted."""
    try:  # fastapi and uvicorn are the serve extra
        from ..server import run_server
    except ImportError as e:
        raise InputError(f"alignvec serve needs {e.name or 'fastapi'}: pip install 'alignvec-gguf[serve]'") from e

    vectors: dict[str, str] = {}
    for spec in args.vector or []:
        name, path = parse_named_vector(spec)
        name = name or AlignmentVector(path).info.name
        if name in vectors:
            raise InputError(f"two vectors are named {name!r}; give each its own with -v NAME=PATH")
        vectors[name] = path
    live = LiveModel(
        args.base,
        vectors,
        lambda_range=(args.lambda_min, args.lambda_max),
        n_ctx=args.ctx,
        n_threads=args.threads,
    )
    try:
        url = f"http://{args.host}:{args.port}"
        print(f"serving {args.base} with {', '.join(live.names) or 'no vectors'} on {url}/v1; playground: {url}/")
        run_server(live, host=args.host, port=args.port, model_id=args.model_id)
    finally:
        live.close()
    return 0
