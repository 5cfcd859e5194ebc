"""The ``alignvec`` command line. Bad input exits with status 2 and one line; a traceback is a bug."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, NoReturn

from ._version import __version__
from .errors import AlignVecError, InputError
from .mix import VectorRef

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
        if Path(path).is_dir():
            raise InputError(f"alignment vector {path} is a directory; give an .avec.gguf file")
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
        rank=args.rank,
        energy=args.energy,
        allow_pickle=args.allow_pickle,
    )
    print(
        f"wrote {report.path}: {report.tensors_written} of {report.tensors_total} tensors changed, "
        f"max |Δ| {report.max_abs_delta:.4g}"
    )
    lowrank = getattr(report, "lowrank", None)
    if lowrank is not None:
        print(lowrank.summary())
    return 0


def _check_not_an_input(output: str, inputs: list[tuple[str, str | None]]) -> None:
    """Refuse an output path that is one of the inputs: the rename would replace the user's file."""
    if not Path(output).is_file():
        return
    for what, path in inputs:
        if path is not None and Path(path).is_file() and os.path.samefile(output, path):
            raise InputError(f"output {output} is the {what} {path}; choose another output path")


def cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge

    vectors = _vectors(args.vector)
    inputs: list[tuple[str, str | None]] = [("alignment vector", str(v)) for v in vectors]
    inputs += [("importance matrix", args.imatrix), ("full-precision base", args.full_base)]
    _check_not_an_input(args.output, inputs)
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
        from .export import write_modelfile

        print(f"wrote {write_modelfile(report.path)}")
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
    try:
        from .server import run_server
    except ImportError as e:
        raise InputError(f"alignvec serve needs {e.name or 'fastapi'}: pip install 'alignvec-gguf[serve]'") from e
    from .avfile import AlignmentVector
    from .live import LiveModel

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


def cmd_run(args: argparse.Namespace) -> int:
    from .runtime import load

    vectors = _vectors(args.vector)
    llm = load(
        args.base,
        vectors,
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


def _printable(value: object) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))


def cmd_inspect(args: argparse.Namespace) -> int:
    meta = describe(args.file)
    if args.json:
        print(json.dumps(meta, indent=2, default=str))
        return 0
    tensors = meta.pop("tensors")
    for key, value in meta.items():  # a stranger's strings: control characters (terminal escapes) escaped
        print(f"{_printable(key):32} {_printable(value)}")
    if args.tensors:
        for name, t in tensors.items():
            print(f"  {name:40} {t['type']:8} {t['shape']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(lambdas=args.lambdas, n_tokens=args.n, quiet=args.quiet, table=not args.no_table, tiny=args.tiny)


def cmd_eval(args: argparse.Namespace) -> int:
    from .report import run_eval

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


def _add_vector_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "-v",
        "--vector",
        action="append",
        metavar="AV=LAMBDA",
        required=required,
        help="alignment vector file and its strength λ (repeatable)",
    )
    _add_requant_args(p)


def _add_requant_args(p: argparse.ArgumentParser) -> None:
    from .policy import DEFAULT_POLICY, POLICIES

    p.add_argument(
        "--requant",
        default=DEFAULT_POLICY,
        metavar="POLICY",
        help=f"how merged tensors are requantized: {', '.join(POLICIES)} or a ggml type (q8_0, f16, q6_k...); "
        f"default {DEFAULT_POLICY} (README: 'Requantization and the knob')",
    )
    p.add_argument("--imatrix", metavar="FILE", help="llama.cpp importance matrix (GGUF or .dat); IQ1/IQ2 need one")
    p.add_argument(
        "--full-base", metavar="GGUF", help="the F32/F16/BF16 GGUF the quantized base was made from; merge from it"
    )


def cmd_cache(args: argparse.Namespace) -> int:
    from .cache import MergeCache

    cache = MergeCache(args.dir)
    if args.action == "clear":
        n, freed = cache.clear()
        print(f"removed {n} merged models ({freed / 1e6:.1f} MB) from {cache.dir}")
        return 0
    entries = cache.entries()
    total = sum(e.size for e in entries)
    print(f"{cache.dir}: {len(entries)} merged models, {total / 1e6:.1f} MB of {cache.max_bytes / 1e6:.0f} MB")
    for e in reversed(entries):  # most recent first
        pairs = zip(e.meta.get("vectors", []), e.meta.get("lambdas", []), strict=False)
        mix = ", ".join(f"{Path(v).name}={lam:g}" for v, lam in pairs)
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        base = Path(e.meta.get("base", "?")).name
        print(f"  {e.path.name}  {e.size / 1e6:9.1f} MB  {used}  {base}  {mix}  requant={e.meta.get('requant', '?')}")
    return 0


def cmd_fidelity(args: argparse.Namespace) -> int:
    from .fidelity import fidelity

    vectors = _vectors(args.vector)
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


def cmd_doctor(args: argparse.Namespace) -> int:
    from .cpu import system_report

    if args.model is not None and not Path(args.model).is_file():
        raise InputError(f"model {args.model} does not exist")
    report = system_report(args.model)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    width = max(len(k) for k in report)
    for key, value in report.items():
        if isinstance(value, dict):
            value = " ".join(f"{k}={v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = ", ".join(str(v) for v in value) or "-"
        print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .policy import DEFAULT_POLICY as default_policy

    parser = _Parser(prog="alignvec", description="Alignment vectors as a dial for llama.cpp GGUF models.")
    parser.add_argument("--version", action="version", version=f"alignvec-gguf {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("convert", help="compute an alignment vector from two Hugging Face checkpoints")
    p.add_argument("base", help="base model: local Hugging Face directory or hub id org/name[@revision]")
    p.add_argument("aligned", help="aligned model (a fine-tune of base): local directory or hub id org/name[@revision]")
    p.add_argument("-o", "--output", required=True, help="output file, e.g. medical.avec.gguf")
    p.add_argument("--name", help="vector name (default: the aligned directory's name)")
    p.add_argument("--domain", default="", help="domain or preference, e.g. medical")
    p.add_argument("--description", default="", help="free text")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"], help="storage type")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickle (.bin) checkpoints, loaded with torch.load(weights_only=True)",
    )
    p.add_argument("--rank", type=int, help="write the low-rank form (a llama.cpp LoRA) with at most this rank")
    p.add_argument("--energy", type=float, help="low-rank form: smallest rank keeping this share of ‖Δ‖², e.g. 0.9")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("merge", help="write base + Σ λ·AV as a GGUF file")
    p.add_argument("base", help="base model GGUF (any quantization)")
    _add_vector_args(p, required=True)
    p.add_argument("-o", "--output", required=True, help="merged GGUF to write")
    p.add_argument("--modelfile", action="store_true", help="also write an Ollama Modelfile beside the output")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("serve", help="OpenAI-compatible server with per-request λ (low-rank vectors)")
    p.add_argument("base", help="base model GGUF (any quantization)")
    p.add_argument(
        "-v",
        "--vector",
        action="append",
        metavar="NAME=AV",
        help="low-rank alignment vector and its knob name (repeatable; NAME defaults to its alignvec.name)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--lambda-min", type=float, default=-2.0, help="smallest λ a request may ask for")
    p.add_argument("--lambda-max", type=float, default=2.0, help="largest λ a request may ask for")
    p.add_argument("--ctx", type=int, default=2048, help="context size")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    p.add_argument("--model-id", help="model name in responses (default: the base file's name)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("run", help="generate text from base + Σ λ·AV (merged and cached)")
    p.add_argument("base", help="base model GGUF")
    _add_vector_args(p, required=False)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-n", type=int, default=64, help="tokens to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--ctx", type=int, default=512, help="context size")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--load-mode", choices=["cached", "direct"], default="cached", help="cached merged file (default) or in memory"
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="show the metadata of a model or alignment-vector GGUF")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--tensors", action="store_true", help="list tensors")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("eval", help="preference accuracy over a λ grid per domain, and the multidomain search")
    p.add_argument("--base", help="base model GGUF (default: the bundled Q4_K_M demo base)")
    p.add_argument(
        "-v", "--vector", action="append", metavar="AV", help="alignment vector; its domain comes from its metadata"
    )
    p.add_argument("--data", help="eval set JSON: [{domain, prompt, responses: {avoidance, generic, expert}}]")
    p.add_argument("--lambdas", type=float, nargs="+", default=[-1.5, -1.0, -0.5, 0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 1.5])
    p.add_argument("--compare", metavar="BASE", help="a second base (e.g. the F32 one) evaluated the same way")
    p.add_argument("--requant", default=default_policy, help=f"requant policy of the merges (default {default_policy})")
    p.add_argument("--search", action="store_true", help="also search one λ per domain for all target combinations")
    p.add_argument("--grid", type=float, nargs="+", default=[-1.0, -0.5, 0.0, 0.5, 1.0], help="search grid")
    p.add_argument("--threshold", type=float, default=0.5, help="target share that counts as reached (search)")
    p.add_argument("--limit", type=int, help="use the first N questions of each domain (quick runs)")
    p.add_argument("-o", "--output-dir", default="alignvec-eval", help="where eval.json and eval.png go")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (it needs matplotlib)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the preference spectrum as a dial on SmolLM2-135M (or the bundled tiny models)")
    p.add_argument("--lambdas", type=float, nargs="+", default=[-1.0, 0.0, 0.5, 1.0], help="λ for the answers")
    p.add_argument("-n", type=int, default=None, help="tokens per answer (default 72; tiny models 48)")
    p.add_argument("--no-table", action="store_true", help="skip the preference-accuracy table")
    p.add_argument("--tiny", action="store_true", help="the bundled tiny models instead of SmolLM2 (no download)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("cache", help="list or clear the cache of merged models")
    p.add_argument("action", choices=["ls", "clear"])
    p.add_argument("--dir", help="cache directory (default: $ALIGNVEC_CACHE_DIR or ~/.cache/alignvec)")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("fidelity", help="how much of the knob each requant policy keeps (logits against float)")
    p.add_argument("base", help="base model GGUF (quantized)")
    _add_vector_args(p, required=True)
    p.add_argument("--policies", default="same,calibrated,unbiased,hifi", help="comma-separated policies to compare")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_fidelity)

    p = sub.add_parser("doctor", help="llama.cpp build, CPU features, weight buffer types and the AMX guard")
    p.add_argument("model", nargs="?", help="also show how this GGUF's weights would be placed")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)
    return parser


MAX_ERROR_CHARS = 2000


def one_line(text: str) -> str:
    """An error message as one printable line: control characters (newlines, escapes, NUL) from file
    metadata or paths are shown escaped, and an overlong message is cut in the middle."""
    text = re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", lambda m: repr(m[0])[1:-1], text.strip())
    if len(text) > MAX_ERROR_CHARS:
        half = MAX_ERROR_CHARS // 2
        text = f"{text[:half]} [... {len(text) - 2 * half} characters ...] {text[-half:]}"
    return text


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that temporaries are removed on the way out."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s: %(message)s")
    for noisy in ("gguf", "gguf.gguf_writer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return int(args.func(args))
    except AlignVecError as e:
        return _fail(args.command, str(e))
    except OSError as e:  # permissions, I/O errors: still one line, no traceback
        where = f": {e.filename}" if e.filename else ""
        return _fail(args.command, f"{e.strerror or e}{where}")
    except MemoryError:
        return _fail(args.command, "out of memory; close other programs or use a smaller model")
    except KeyboardInterrupt:
        print("alignvec: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("alignvec: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _fail(command: str, message: str) -> int:
    print(f"alignvec {command}: error: {one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
