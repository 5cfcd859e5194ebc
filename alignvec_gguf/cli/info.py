"""``alignvec inspect``, ``doctor`` and ``cache``: what a GGUF file holds, how this machine runs llama.cpp, and
the cache of merged models."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..cache import MergeCache
from ..cpu import system_report
from ..errors import InputError
from ..inspect import describe


def _printable(value: object) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print a GGUF file's metadata (and with ``--tensors`` its tensors), or all of it as JSON."""
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


def cmd_doctor(args: argparse.Namespace) -> int:
    """Print llama.cpp's build, the CPU's features, weight buffer types and the AMX guard's decision."""
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


def cmd_cache(args: argparse.Namespace) -> int:
    """List the cached merged models (most recent first), or remove them all."""
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
