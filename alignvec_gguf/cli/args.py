"""Values given on the command line: ``-v PATH=LAMBDA`` and the vector files they name."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import InputError
from ..mix import VectorRef


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


def vectors(specs: list[str] | None) -> dict[VectorRef, float]:
    """The ``-v PATH=LAMBDA`` arguments as the ``vectors`` mapping of :func:`alignvec_gguf.merge`: each path an
    existing file, given once."""
    out: dict[VectorRef, float] = {}
    for spec in specs or []:
        path, lam = parse_vector(spec)
        if Path(path).is_dir():
            raise InputError(f"alignment vector {path} is a directory; give an .avec.gguf file")
        if not Path(path).is_file():
            raise InputError(f"alignment vector {path} does not exist")
        if path in out:
            raise InputError(f"alignment vector {path} is given twice; give each vector once with its λ")
        out[path] = lam
    return out
