"""Alignment vectors from two Hugging Face checkpoints: Δ = T(aligned) − T(base), one tensor at a time.

T is llama.cpp's own conversion of each tensor to GGUF layout (see :mod:`converters.layout`), applied
before subtracting, so that Δ lands on exactly the rows the base GGUF has and affine parts of T (Gemma's
norm + 1) cancel. Checkpoints are local directories or hub ids (:mod:`converters.hub`).

Memory: one GGUF tensor is in flight at a time, as one float32 buffer for Δ; the inputs stay in their
stored dtype as views of the memory-mapped shards, and each shard is unmapped after its last tensor.
Δ is computed a cache-sized chunk at a time (cast the aligned chunk into Δ, subtract the base chunk),
while a second thread hashes the base chunk for the fingerprint.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from alignvec_gguf.atomic import check_output
from alignvec_gguf.avfile import STORAGE_TYPES, AVInfo, write_av
from alignvec_gguf.errors import CompatibilityError, InputError
from alignvec_gguf.identity import Fingerprint, signature

from .checkpoint import Checkpoint
from .hub import resolve
from .layout import Layout, PlanItem
from .lowrank import LowRankReport, check_options, write_lowrank

log = logging.getLogger(__name__)


@dataclass
class ConvertReport:
    """What a conversion wrote: the file, how many tensors changed out of all, and the base's identity."""

    path: Path
    tensors_written: int
    tensors_total: int
    base_signature: str
    base_fingerprint: str
    max_abs_delta: float
    lowrank: LowRankReport | None = None  # set for the low-rank form (--rank / --energy)
    base_source: str = ""  # as recorded in the AV: a resolved path or org/name@commit
    aligned_source: str = ""


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


# Δ is computed this many elements at a time, so that each step's data stays in the CPU cache.
CHUNK = 1 << 18


def to_float32(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Cast ``src`` into the float32 tensor ``dst``, exactly as ``src.to(torch.float32)`` would.

    bfloat16 is the upper half of a float32, so its cast is a 16-bit shift, which torch runs a few
    times faster on integers than its own bfloat16 conversion.
    """
    if src.dtype == torch.bfloat16:
        bits = dst.view(torch.int32)
        bits.copy_(src.view(torch.int16))
        bits.bitwise_left_shift_(16)
    else:
        dst.copy_(src)


class DeltaStream:
    """Yields (GGUF name, Δ in GGUF layout as float32) for every tensor of the plan, one at a time.

    While streaming it records the base's (GGUF name, shape) pairs and fingerprint, and max |Δ|.

    Memory: Δ is computed in one float32 buffer (the aligned tensor cast into it, then the base
    subtracted in place, ``CHUNK`` elements at a time); inputs stay in their stored dtype, as views of
    the memory-mapped shards where possible. With ``reuse_buffer`` that buffer is reused for the next
    tensor, so a yielded array is valid only until the next one is requested (fine for a consumer that
    writes each delta out at once, as ``write_av`` does); otherwise every tensor gets its own.
    """

    def __init__(
        self, base: Checkpoint, aligned: Checkpoint, layout: Layout, progress: bool = False, reuse_buffer: bool = False
    ):
        self.base, self.aligned, self.layout = base, aligned, layout
        shard_order = {shard: i for i, shard in enumerate(dict.fromkeys(base.shard(n) for n in base.names()))}
        plan = layout.plan(base.names())  # fails on unmappable names before anything is written
        self.plan = sorted(plan, key=lambda item: shard_order[base.shard(item.sources[0])])
        self.progress = progress
        self.reuse_buffer = reuse_buffer
        self.pairs: list[tuple[str, tuple[int, ...]]] = []
        self.fingerprint = Fingerprint()
        self.max_abs = 0.0
        self._hasher: ThreadPoolExecutor | None = None

    def planned(self) -> list[tuple[str, tuple[int, ...]]]:
        """(GGUF name, shape) of every delta, in the order they are yielded (``write_av`` writes the header first)."""
        return [(item.gguf_name, tuple(shape)) for item, shape in zip(self.plan, self._shapes(), strict=True)]

    def _shapes(self) -> list[tuple[int, ...]]:
        return [tuple(self.layout.gguf_shape(item, self.base.shape(item.sources[0]))) for item in self.plan]

    def source(self, ckpt: Checkpoint, hf_name: str) -> torch.Tensor:
        """One checkpoint tensor through llama.cpp's transform, as float32 (may be a read-only view)."""
        return self.layout.transform(hf_name, ckpt.tensor(hf_name)).to(torch.float32)

    def gguf_tensor(self, ckpt: Checkpoint, item: PlanItem) -> np.ndarray:
        """A whole GGUF tensor of one checkpoint, as llama.cpp writes it (float32)."""
        with torch.no_grad():
            parts = [self.source(ckpt, src) for src in item.sources]
            return (torch.stack(parts) if item.stacked else parts[0]).numpy()

    def _delta_into(self, gname: str, src: str, out: torch.Tensor) -> tuple[float, float]:
        """out = T(aligned) − T(base) for one source tensor, hashing the base on the way; (min, max) of out."""
        assert self._hasher is not None, "only while iterating"
        aligned = self.layout.transform(src, self.aligned.tensor(src))
        base = self.layout.transform(src, self.base.tensor(src))
        for t in (aligned, base):
            if tuple(t.shape) != tuple(out.shape):
                raise CompatibilityError(f"{src}: expected shape {tuple(out.shape)}, got {tuple(t.shape)}")
        flat_aligned, flat_base, flat_out = aligned.reshape(-1), base.reshape(-1), out.view(-1)
        lo, hi = math.inf, -math.inf
        buffers = [torch.empty(CHUNK, dtype=torch.float32) for _ in range(2)]
        pending: list[Future[None]] = []
        for k, start in enumerate(range(0, flat_out.numel(), CHUNK)):
            stop = min(start + CHUNK, flat_out.numel())
            if len(pending) == 2:  # the buffer about to be reused must be hashed first
                pending.pop(0).result()
            chunk = buffers[k % 2][: stop - start]
            to_float32(flat_base[start:stop], chunk)
            # hashlib releases the GIL: the base is hashed while the delta is computed
            pending.append(self._hasher.submit(self.fingerprint.add, gname, chunk.numpy()))
            delta = flat_out[start:stop]
            to_float32(flat_aligned[start:stop], delta)
            delta.sub_(chunk)
            c_lo, c_hi = torch.aminmax(delta)
            lo, hi = min(lo, float(c_lo)), max(hi, float(c_hi))
        for f in pending:
            f.result()
        return lo, hi

    def _last_use(self, ckpt: Checkpoint) -> dict[int, list[str]]:
        last: dict[str, int] = {}
        for i, item in enumerate(self.plan):
            for src in item.sources:
                last[ckpt.shard(src)] = i
        by_item: dict[int, list[str]] = {}
        for shard, i in last.items():
            by_item.setdefault(i, []).append(shard)
        return by_item

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        shapes = self._shapes()
        release = {id(c): self._last_use(c) for c in (self.base, self.aligned)}
        size = max((math.prod(s) for s in shapes), default=0)
        scratch = torch.empty(size, dtype=torch.float32) if self.reuse_buffer else None
        # One torch thread: the chunks are too small for its thread pool (whose wake-ups cost more than the
        # work on a busy machine); the second core hashes the base meanwhile.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield from self._stream(shapes, release, scratch)
        finally:
            torch.set_num_threads(threads)

    def _stream(
        self, shapes: list[tuple[int, ...]], release: dict[int, dict[int, list[str]]], scratch: torch.Tensor | None
    ) -> Iterator[tuple[str, np.ndarray]]:
        with ThreadPoolExecutor(1, thread_name_prefix="fingerprint") as self._hasher:
            for i, item in enumerate(tqdm(self.plan, desc="converting", unit="tensor", disable=not self.progress)):
                shape = shapes[i]
                n = math.prod(shape)
                delta = torch.empty(shape, dtype=torch.float32) if scratch is None else scratch[:n].view(shape)
                with torch.no_grad():
                    for x, src in enumerate(item.sources):
                        lo, hi = self._delta_into(item.gguf_name, src, delta[x] if item.stacked else delta)
                        self.max_abs = max(self.max_abs, hi, -lo)
                self.pairs.append((item.gguf_name, shape))
                for ckpt in (self.base, self.aligned):
                    for shard in release[id(ckpt)].get(i, []):
                        ckpt.release(shard)
                out = delta.numpy()
                del delta
                yield item.gguf_name, out


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
    rank: int | None = None,
    energy: float | None = None,
    allow_pickle: bool = False,
) -> ConvertReport:
    """Compute the alignment vector ``aligned − base`` in the base's GGUF layout and write it to ``out``.

    ``base`` and ``aligned`` are local Hugging Face directories or hub ids (``org/name[@revision]``).
    With ``rank`` and/or ``energy`` the low-rank form is written instead (see :mod:`converters.lowrank`).
    ``allow_pickle`` permits ``pytorch_model*.bin`` weights (loaded with ``torch.load(weights_only=True)``).
    """
    if dtype not in STORAGE_TYPES:
        raise InputError(f"--dtype must be one of {', '.join(STORAGE_TYPES)}, got {dtype!r}")
    if rank is not None or energy is not None:
        check_options(rank, energy)
    check_output(out)  # before any download or reading
    base_ref = resolve(base, "base", allow_pickle=allow_pickle)
    aligned_ref = resolve(aligned, "aligned", allow_pickle=allow_pickle)
    base_ckpt = Checkpoint(base_ref.path, "base", allow_pickle=allow_pickle, source=base_ref.source)
    aligned_ckpt = Checkpoint(aligned_ref.path, "aligned", allow_pickle=allow_pickle, source=aligned_ref.source)
    layout = Layout(base_ckpt.architecture, base_ckpt.config, base_ckpt.path)
    _check_pair(base_ckpt, aligned_ckpt, layout)
    full_form = rank is None and energy is None
    stream = DeltaStream(base_ckpt, aligned_ckpt, layout, progress, reuse_buffer=full_form)

    def info() -> AVInfo:
        return AVInfo(
            architecture=layout.gguf_arch_name,
            name=name or aligned_ref.name,
            description=description,
            domain=domain,
            base_source=base_ref.source,
            aligned_source=aligned_ref.source,
            base_signature=signature(stream.pairs),
            base_fingerprint=stream.fingerprint.hexdigest(),
        )

    lowrank = None
    if not full_form:
        items = {item.gguf_name: item for item in stream.plan}

        def base_tensor(gname: str) -> np.ndarray:  # only for the few tensors that cannot be low-rank
            return stream.gguf_tensor(base_ckpt, items[gname])

        arch = layout.gguf_arch_name
        lowrank = write_lowrank(
            out, arch, iter(stream), info, rank=rank, energy=energy, dtype=dtype, base_tensor=base_tensor
        )
        written = lowrank.tensors_written + len(lowrank.dropped)  # changed tensors, as in the full form
    else:
        written = write_av(out, layout.gguf_arch_name, iter(stream), info, dtype=dtype, planned=stream.planned())
    base_ckpt.close()
    aligned_ckpt.close()
    final = info()
    if written == 0:
        log.warning("the two checkpoints are identical: the vector is empty")
    return ConvertReport(
        Path(out),
        written,
        len(stream.pairs),
        final.base_signature,
        final.base_fingerprint,
        stream.max_abs,
        lowrank,
        base_ref.source,
        aligned_ref.source,
    )
