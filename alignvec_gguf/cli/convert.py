"""``alignvec convert``: an alignment vector from two Hugging Face checkpoints (needs the ``convert`` extra)."""

from __future__ import annotations

import argparse

from ..errors import InputError


def cmd_convert(args: argparse.Namespace) -> int:
    """Write the AV of ``args.aligned`` over ``args.base`` and print what was written."""
    try:  # converters needs torch, which the runtime never imports: only this command pays for it
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
