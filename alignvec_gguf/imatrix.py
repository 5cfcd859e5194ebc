"""Importance matrices as llama.cpp's ``llama-imatrix`` writes them: the GGUF format and the legacy ``.dat``.

An importance matrix holds, per weight tensor, the mean squared activation of every input column
(and, for stacked-expert tensors, one such vector per expert). ggml's quantizers weigh their
rounding error by it; the IQ1/IQ2 types cannot be quantized without one. Values are normalized as
llama.cpp's ``llama-quantize`` does (tools/quantize/quantize.cpp, ``load_imatrix``):

- GGUF (``imatrix.*`` metadata, tensors ``NAME.in_sum2`` and ``NAME.counts``): ``in_sum2 / count``
  per expert, and 1 where an expert was never activated;
- legacy ``.dat`` (int32 entry count; per entry a length-prefixed name, int32 ncall, int32 nval,
  nval float32): ``values / ncall``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

from .errors import CompatibilityError, FormatError
from .ggufread import GGUFModel, check_file

_MAX_NAME = 1 << 16


@dataclass
class Imatrix:
    """Per-tensor importance vectors, normalized; look them up with :meth:`for_tensor`."""

    path: Path
    entries: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float32 (n_expert·n_per_row,)
    datasets: list[str] = field(default_factory=list)
    legacy: bool = False

    def __len__(self) -> int:
        return len(self.entries)

    def for_tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """The importance of ``name`` as (n_matrices, n_per_row), or None if the file has no entry for it.

        ``shape`` is the tensor's numpy-order shape; a 3-D (stacked-expert) tensor needs one vector per
        expert. A size mismatch is an error, as in llama-quantize: the file was made for another model.
        """
        values = self.entries.get(name)
        if values is None:
            return None
        n_per_row = shape[-1]
        n_mat = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        if values.size != n_per_row * n_mat:
            raise CompatibilityError(
                f"importance matrix {self.path.name} has {values.size} values for {name} but the tensor needs "
                f"{n_per_row * n_mat}; use the imatrix made for this model"
            )
        return values.reshape(n_mat, n_per_row)


def _check(path: Path, name: str, values: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(values)):
        raise FormatError(f"importance matrix {path}: entry {name} has NaN or infinite values; recompute it")
    return values.astype(np.float32, copy=False)


def _load_gguf(path: Path) -> Imatrix:
    file = GGUFModel(path, "importance matrix", split=False)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in file.tensors:
        for suffix, into in ((".in_sum2", sums), (".counts", counts)):
            if t.name.endswith(suffix):
                if t.tensor_type != QT.F32:
                    raise FormatError(f"importance matrix {path}: {t.name} is {t.tensor_type.name}, expected F32")
                into[t.name.removesuffix(suffix)] = t.values().reshape(-1)
    if not sums:
        raise FormatError(f"importance matrix {path} has no *.in_sum2 tensors; is it an imatrix file?")
    out = Imatrix(path)
    value = file.field("imatrix.datasets")
    if value is not None:
        out.datasets = [str(v) for v in (value if isinstance(value, list) else [value])]
    for name, s in sums.items():
        c = counts.get(name)
        if c is None or c.size == 0 or s.size % c.size:
            raise FormatError(f"importance matrix {path}: sums and counts of {name} do not match")
        per = s.reshape(c.size, -1)
        cnt = np.rint(c).reshape(-1, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            norm = np.where(cnt > 0, per / np.where(cnt > 0, cnt, 1), np.float32(1))
        out.entries[name] = _check(path, name, norm.reshape(-1))
    return out


def _load_legacy(path: Path, data: bytes) -> Imatrix:
    out = Imatrix(path, legacy=True)
    pos = 0

    def take(fmt: str) -> tuple[int, ...]:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise FormatError(f"importance matrix {path} is truncated; recompute it with llama-imatrix")
        values = struct.unpack_from(fmt, data, pos)
        pos += size
        return values

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > len(data) // 12:
        raise FormatError(f"importance matrix {path} is neither GGUF nor a legacy imatrix.dat file")
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length < _MAX_NAME or pos + length > len(data):
            raise FormatError(f"importance matrix {path} has a bad entry name; is it an imatrix file?")
        name = data[pos : pos + length].decode("utf-8", errors="replace")
        pos += length
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(data):
            raise FormatError(f"importance matrix {path}: entry {name} is truncated")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        out.entries[name] = _check(path, name, values / ncall if ncall > 0 else values)
    if pos + 8 <= len(data):  # optional trailer: chunk count and dataset name
        _, length = take("<ii")
        if 0 < length <= len(data) - pos:
            out.datasets = [data[pos : pos + length].decode("utf-8", errors="replace")]
    return out


def load_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read an importance matrix in either of llama.cpp's formats (GGUF or legacy ``.dat``)."""
    path = check_file(path, "importance matrix")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _load_gguf(path)
    return _load_legacy(path, path.read_bytes())
