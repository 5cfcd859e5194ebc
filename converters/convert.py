"""Alignment vectors from two Hugging Face checkpoints: Δ = T(aligned) − T(base), one tensor at a time.

T is llama.cpp's own conversion of each tensor to GGUF layout (see :mod:`converters.layout`), applied
before subtracting, so that Δ lands on exactly the rows the base GGUF has.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from alignvec_gguf.avfile import STORAGE_TYPES, AVInfo, write_av
from alignvec_gguf.errors import CompatibilityError, InputError
from alignvec_gguf.gguffile import Fingerprint, signature

from .checkpoint import Checkpoint
from .layout import Layout

log = logging.getLogger(__name__)


@dataclass
class ConvertReport:
    path: Path
    tensors_written: int
    tensors_total: int
    base_signature: str
    base_fingerprint: str
    max_abs_delta: float


def _check_pair(base: Checkpoint, aligned: Checkpoint, layout: Layout) -> None:
    if aligned.architecture != base.architecture:
        raise CompatibilityError(
            f"base is {base.architecture} but aligned is {aligned.architecture}; both must be the same model family"
        )
    for key in layout.arch.shape_keys:
        if base.config.get(key) != aligned.config.get(key):
            raise CompatibilityError(
                f"configs differ in {key}: base {base.config.get(key)!r}, aligned {aligned.config.get(key)!r}; "
                "the aligned model must be a fine-tune of the base"
            )
    missing = sorted(set(base.names()) - set(aligned.names()))
    extra = sorted(set(aligned.names()) - set(base.names()))
    if missing or extra:
        which = f"aligned lacks {missing[0]}" if missing else f"aligned has extra tensor {extra[0]}"
        raise CompatibilityError(f"checkpoints have different tensors ({which}); are they the same model?")
    for name in base.names():
        if base.shape(name) != aligned.shape(name):
            raise CompatibilityError(
                f"tensor {name} has shape {base.shape(name)} in base but {aligned.shape(name)} in aligned"
            )


def convert(
    base: str | os.PathLike[str],
    aligned: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    name: str | None = None,
    domain: str = "",
    description: str = "",
    dtype: str = "f32",
    progress: bool = False,
) -> ConvertReport:
    """Compute the alignment vector ``aligned − base`` in the base's GGUF layout and write it to ``out``."""
    if dtype not in STORAGE_TYPES:
        raise InputError(f"--dtype must be one of {', '.join(STORAGE_TYPES)}, got {dtype!r}")
    base_ckpt = Checkpoint(base, "base")
    aligned_ckpt = Checkpoint(aligned, "aligned")
    layout = Layout(base_ckpt.architecture, base_ckpt.config)
    _check_pair(base_ckpt, aligned_ckpt, layout)
    gguf_names = {hf: layout.gguf_name(hf) for hf in base_ckpt.names()}  # fail on unmappable names up front

    pairs: list[tuple[str, tuple[int, ...]]] = []
    fingerprint = Fingerprint()
    max_abs = 0.0

    def deltas() -> Iterator[tuple[str, np.ndarray]]:
        nonlocal max_abs
        names = [hf for hf, g in gguf_names.items() if g is not None]
        for hf in tqdm(names, desc="converting", unit="tensor", disable=not progress):
            gname = gguf_names[hf]
            assert gname is not None
            with torch.no_grad():
                t_base = layout.transform(hf, base_ckpt.tensor(hf))
                t_aligned = layout.transform(hf, aligned_ckpt.tensor(hf))
                delta = (t_aligned - t_base).numpy()
            base_np = t_base.numpy()
            pairs.append((gname, base_np.shape))
            fingerprint.add(gname, base_np)
            if delta.size:
                max_abs = max(max_abs, float(np.abs(delta).max()))
            yield gname, delta

    def info() -> AVInfo:
        return AVInfo(
            architecture=layout.gguf_arch_name,
            name=name or Path(aligned).name,
            description=description,
            domain=domain,
            base_source=str(Path(base).resolve()),
            aligned_source=str(Path(aligned).resolve()),
            base_signature=signature(pairs),
            base_fingerprint=fingerprint.hexdigest(),
        )

    written = write_av(out, layout.gguf_arch_name, deltas(), info, dtype=dtype)
    final = info()
    if written == 0:
        log.warning("the two checkpoints are identical: the vector is empty")
    return ConvertReport(Path(out), written, len(pairs), final.base_signature, final.base_fingerprint, max_abs)
