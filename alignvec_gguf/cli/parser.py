"""Every ``alignvec`` command, flag and help text: the command line's contract (DESIGN.md), in one place.

Each command's ``func`` is its ``cmd_*`` function, in the module of its group.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from .._version import __version__
from ..policy import DEFAULT_POLICY, POLICIES
from .convert import cmd_convert
from .demo import cmd_demo
from .evaluate import cmd_eval, cmd_fidelity
from .info import cmd_cache, cmd_doctor, cmd_inspect
from .models import cmd_merge, cmd_run, cmd_serve

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_vector_args(p: argparse.ArgumentParser, required: bool) -> None:
    """``-v AV=LAMBDA`` (repeatable) and the requant flags: what every command that merges takes."""
    p.add_argument(
        "-v",
        "--vector",
        action="append",
        metavar="AV=LAMBDA",
        required=required,
        help="alignment vector file and its strength λ (repeatable)",
    )
    add_requant_args(p)


def add_requant_args(p: argparse.ArgumentParser) -> None:
    """``--requant``, ``--imatrix`` and ``--full-base``: how merged tensors are written."""
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


def build_parser() -> argparse.ArgumentParser:
    """The ``alignvec`` parser with all its subcommands, in the order ``alignvec --help`` lists them."""
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
    add_vector_args(p, required=True)
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
    add_vector_args(p, required=False)
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
    p.add_argument("--requant", default=DEFAULT_POLICY, help=f"requant policy of the merges (default {DEFAULT_POLICY})")
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
    add_vector_args(p, required=True)
    p.add_argument("--policies", default="same,calibrated,unbiased,hifi", help="comma-separated policies to compare")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_fidelity)

    p = sub.add_parser("doctor", help="llama.cpp build, CPU features, weight buffer types and the AMX guard")
    p.add_argument("model", nargs="?", help="also show how this GGUF's weights would be placed")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)
    return parser
