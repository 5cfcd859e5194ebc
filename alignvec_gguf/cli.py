"""The ``alignvec`` command line. Bad input exits with status 2 and one line; a traceback is a bug."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .errors import AlignVecError, InputError
from .merge import VectorRef

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_vector(spec: str) -> tuple[str, float]:
    """``PATH=LAMBDA`` -> (path, λ)."""
    path, sep, value = spec.rpartition("=")
    if not sep or not path:
        raise InputError(f"bad -v {spec!r}: expected PATH=LAMBDA, e.g. -v medical.avec.gguf=0.5")
    try:
        lam = float(value)
    except ValueError:
        raise InputError(f"bad -v {spec!r}: λ {value!r} is not a number; expected PATH=LAMBDA, e.g. =0.5") from None
    if not math.isfinite(lam):
        raise InputError(f"bad -v {spec!r}: λ must be finite")
    return path, lam


def _vectors(specs: list[str] | None) -> dict[VectorRef, float]:
    vectors: dict[VectorRef, float] = {}
    for spec in specs or []:
        path, lam = parse_vector(spec)
        if not Path(path).is_file():
            raise InputError(f"alignment vector {path} does not exist")
        if path in vectors:
            raise InputError(f"alignment vector {path} is given twice; give each vector once with its λ")
        vectors[path] = lam
    return vectors


def cmd_convert(args: argparse.Namespace) -> int:
    try:
        from converters import convert
    except ImportError as e:
        missing = e.name or "torch"
        raise InputError(f"alignvec convert needs {missing}: pip install 'alignvec-gguf[convert]'") from e
    report = convert(
        args.base,
        args.aligned,
        args.output,
        name=args.name,
        domain=args.domain,
        description=args.description,
        dtype=args.dtype,
        progress=not args.quiet,
    )
    print(
        f"wrote {report.path}: {report.tensors_written} of {report.tensors_total} tensors changed, "
        f"max |Δ| {report.max_abs_delta:.4g}"
    )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge

    vectors = _vectors(args.vector)
    report = merge(args.base, vectors, args.output, requant=args.requant, progress=not args.quiet)
    print(f"wrote {report.path}: {len(report.touched)} tensors merged, {report.copied} copied, {report.seconds:.1f}s")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .runtime import load

    vectors = _vectors(args.vector)
    llm = load(
        args.base,
        vectors,
        requant=args.requant,
        progress=not args.quiet,
        seed=args.seed,
        n_ctx=args.ctx,
        n_threads=args.threads,
    )
    out: Any = llm(args.prompt, max_tokens=args.n, temperature=args.temp, seed=args.seed)
    print(out["choices"][0]["text"])
    return 0


def describe(path: str) -> dict[str, Any]:
    """Metadata and tensor summary of a model or AV GGUF file."""
    from .gguffile import field, open_gguf, tensor_shape

    reader = open_gguf(path, "file")
    meta: dict[str, Any] = {"path": str(path), "size_bytes": Path(path).stat().st_size}
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name.startswith("tokenizer.ggml."):
            continue
        value = f.contents()
        if isinstance(value, list) and len(value) > 16:
            value = f"[{len(value)} items]"
        meta[f.name] = value
    meta["kind"] = "alignment_vector" if field(reader, "alignvec.format_version") is not None else "model"
    meta["tensor_count"] = len(reader.tensors)
    meta["tensor_types"] = dict(Counter(t.tensor_type.name for t in reader.tensors))
    meta["tensors"] = {t.name: {"type": t.tensor_type.name, "shape": list(tensor_shape(t))} for t in reader.tensors}
    return meta


def cmd_inspect(args: argparse.Namespace) -> int:
    meta = describe(args.file)
    if args.json:
        print(json.dumps(meta, indent=2, default=str))
        return 0
    tensors = meta.pop("tensors")
    for key, value in meta.items():
        print(f"{key:32} {value}")
    if args.tensors:
        for name, t in tensors.items():
            print(f"  {name:40} {t['type']:8} {t['shape']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(lambdas=args.lambdas, n_tokens=args.n, quiet=args.quiet)


def _add_vector_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "-v",
        "--vector",
        action="append",
        metavar="AV=LAMBDA",
        required=required,
        help="alignment vector file and its strength λ (repeatable)",
    )
    p.add_argument("--requant", default="same", help="type for merged tensors: same (default) or q8_0, f16, f32, ...")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="alignvec", description="Alignment vectors as a dial for llama.cpp GGUF models.")
    parser.add_argument("--version", action="version", version=f"alignvec-gguf {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("convert", help="compute an alignment vector from two Hugging Face checkpoints")
    p.add_argument("base", help="base model: local Hugging Face directory")
    p.add_argument("aligned", help="aligned model (a fine-tune of base): local Hugging Face directory")
    p.add_argument("-o", "--output", required=True, help="output file, e.g. medical.avec.gguf")
    p.add_argument("--name", help="vector name (default: the aligned directory's name)")
    p.add_argument("--domain", default="", help="domain or preference, e.g. medical")
    p.add_argument("--description", default="", help="free text")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"], help="storage type")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("merge", help="write base + Σ λ·AV as a GGUF file")
    p.add_argument("base", help="base model GGUF (any quantization)")
    _add_vector_args(p, required=True)
    p.add_argument("-o", "--output", required=True, help="merged GGUF to write")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("run", help="generate text from base + Σ λ·AV (merged and cached)")
    p.add_argument("base", help="base model GGUF")
    _add_vector_args(p, required=False)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-n", type=int, default=64, help="tokens to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--ctx", type=int, default=512, help="context size")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="show the metadata of a model or alignment-vector GGUF")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--tensors", action="store_true", help="list tensors")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="the dial on the bundled tiny models")
    p.add_argument("--lambdas", type=float, nargs="+", default=[-1.0, 0.0, 0.5, 1.0])
    p.add_argument("-n", type=int, default=40, help="tokens per generation")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s: %(message)s")
    for noisy in ("gguf", "gguf.gguf_writer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except AlignVecError as e:
        print(f"alignvec {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # permissions, I/O errors: still one line, no traceback
        where = f": {e.filename}" if e.filename else ""
        print(f"alignvec {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("alignvec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
