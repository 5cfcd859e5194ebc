"""Merging λ-scaled alignment vectors into a (quantized) GGUF base: θ = θ_base + Σ λ_i Δ_i.

Tensors that no vector touches (or only vectors at λ = 0) are copied byte for byte. Touched tensors
get Σ λ_i Δ_i added in float32 and are requantized as the policy says (``policy.POLICIES``): by
ggml's own quantizer to a chosen type, or on the base's own grid (same scales, new integer codes;
``requant.py``). The output is streamed tensor by tensor into a temporary file and renamed into place;
the base file is only ever read.

This module is the streaming pipeline and the provenance the merged file records. What each tensor
becomes is decided first by ``plan.MergePlan``; each touched tensor is computed by ``tensormerge.run_job``;
the warnings are decided by ``diagnose.py``.

Speed and memory: touched tensors are computed in a pipeline of one worker per core plus one (ctypes
and numpy release the GIL), each tensor on one core except the few big ones (embeddings, output),
which use every core so that they do not hold up the rest; results are written in order, and the
jobs in flight never hold more than 1.5 × the largest tensor in float32 (a job rounding on a grid holds its
output and a few chunks; one calling ggml's quantizer the whole tensor in float32 as well). Written tensors'
buffers are reused (``tensormerge.Buffers``).
Pages of the memory-mapped inputs are dropped from the resident set as the merge moves on
(``pages.py``), so peak RSS stays near the base plus a few tensors, whatever the model size.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT
from tqdm import tqdm

from . import ggml, pages
from .atomic import atomic_output
from .diagnose import MergeReport, diagnose, float_fingerprint
from .errors import InputError
from .ggufread import SPLIT_KEYS, GGUFModel, ModelTensor
from .ggufwrite import GGUFStreamWriter, TensorSlot, pack_kv, patch_header
from .imatrix import Imatrix
from .mix import VectorMix, Vectors
from .plan import MergePlan
from .policy import DEFAULT_POLICY
from .tensormerge import Buffers, Kept, TensorJob, on_grid, run_job

log = logging.getLogger(__name__)

BIG_TENSOR_SHARE = 1 / 32  # a tensor with this share of all touched elements is computed on every core

K_MERGED_VECTORS = "alignvec.merged.vectors"
K_MERGED_SHA256 = "alignvec.merged.vector_sha256"
K_MERGED_LAMBDAS = "alignvec.merged.lambdas"
K_MERGED_REQUANT = "alignvec.merged.requant"
K_MERGED_BASE = "alignvec.merged.base"
# [whole file, worst tensor]: <realized change, requested change> / |requested change|², weight space (float64)
K_MERGED_KEPT = "alignvec.merged.kept_share"


def _merged_metadata(model: GGUFModel, extra: list[bytes]) -> tuple[int, bytes]:
    """The base's metadata as stored (less split keys and an earlier merge's record), then ``extra`` items."""
    leave_out = {*SPLIT_KEYS, *(k for k in model.keys() if k.startswith("alignvec.merged."))}
    n, raw = model.raw_metadata(leave_out)
    return n + len(extra), raw + b"".join(extra)


def _working_set(job: TensorJob, out_bytes: int) -> int:
    """The memory a job holds while in flight: its output, and the whole float32 tensor unless it is rounded
    on a grid (which works a chunk at a time)."""
    return out_bytes + (0 if on_grid(job) else 4 * job.tensor.n_elements)


def _read_views(job: TensorJob) -> list[np.ndarray]:
    """The input bytes a touched tensor's merge reads: the base's tensor, each vector's, the full base's."""
    views = [job.tensor.raw(), *(st.raw() for av, _ in job.parts for st in av.stored(job.tensor.name))]
    return views + ([job.full.raw()] if job.full is not None else [])


def merge(
    base: str | os.PathLike[str],
    vectors: Vectors | VectorMix,
    out: str | os.PathLike[str],
    *,
    requant: str = DEFAULT_POLICY,
    progress: bool = False,
    imatrix: str | os.PathLike[str] | Imatrix | None = None,
    full_base: str | os.PathLike[str] | None = None,
    threads: int | None = None,
) -> MergeReport:
    """Write ``base + Σ λ_i Δ_i`` as a GGUF file at ``out`` and return a report.

    ``vectors`` maps AV paths (or :class:`AlignmentVector` objects) to λ, or is a :class:`VectorMix` (opened
    and checked already: used as it is). ``requant`` is a policy of
    ``policy.POLICIES`` or a ggml type name for the touched matrices. ``imatrix`` is llama.cpp's importance
    matrix (GGUF or legacy ``.dat``), used for every touched tensor it covers and required by the
    IQ1/IQ2 types (without it they fall back, with a warning; see ``policy.IMATRIX_FALLBACK``).
    ``full_base`` is the full-precision GGUF the quantized base was made from: touched tensors are
    then computed from it instead of from the dequantized base. ``base`` may be the first file of a
    split model (``NAME-00001-of-0000N.gguf``); the output is one file. ``threads`` defaults to every
    core. Names, shapes, architecture and signature are checked before any work; each vector tensor is
    checked for NaN and infinity as it is read (it is read once), and a bad value aborts the merge
    before the output exists.
    """
    start = time.perf_counter()
    base = Path(base)
    out = Path(out)
    if isinstance(vectors, (Mapping, VectorMix)) and not len(vectors):
        raise InputError("merge needs at least one alignment vector, e.g. {'medical.avec.gguf': 0.5}")
    plan = MergePlan(base, vectors, requant=requant, imatrix=imatrix, full_base=full_base, threads=threads)
    model, opened, policy, jobs = plan.model, plan.vectors, plan.policy, plan.jobs
    if out.exists() and any(os.path.samefile(out, p) for p in model.paths):
        raise InputError(f"output {out} is the base model; the base is never overwritten, choose another path")
    others = [*plan.inputs, *([imatrix] if isinstance(imatrix, (str, os.PathLike)) else [])]
    if out.exists() and any(os.path.exists(p) and os.path.samefile(out, p) for p in others):
        raise InputError(f"output {out} is one of the merge's inputs, which are never overwritten; choose another path")
    report = MergeReport(path=out, policy=policy.name)
    fingerprint = float_fingerprint(plan)
    inputs = plan.inputs

    # The vectors' content sha256 go into the header. Hashing takes a second or more: it runs beside the merge,
    # the header gets placeholders of the same length, and they are patched at the end.
    placeholders = [secrets.token_hex(32) for _ in opened]
    # the kept share is known once every tensor is merged: a placeholder of the same length until then
    kept_placeholder = pack_kv(K_MERGED_KEPT, [1.0 + secrets.randbits(52) / 2**52 for _ in range(2)])
    hasher = ThreadPoolExecutor(1, thread_name_prefix="alignvec-sha256")
    # Each vector is read whole there (AlignmentVector.sha256): the digest recorded is that of what this merge
    # read, and a recorded alignvec.content_sha256 that the tensors no longer match is a FormatError.
    digests = hasher.submit(lambda: [av.sha256 and av.content_sha256 for av, _ in opened])
    hasher.shutdown(wait=False)
    extra = [
        pack_kv(K_MERGED_VECTORS, [av.info.name or av.path.name for av, _ in opened]),
        pack_kv(K_MERGED_SHA256, placeholders),
        pack_kv(K_MERGED_LAMBDAS, [float(lam) for _, lam in opened]),
        pack_kv(K_MERGED_REQUANT, requant.lower()),
        pack_kv(K_MERGED_BASE, base.name),
        kept_placeholder,
    ]
    n_kv, kv = _merged_metadata(model, extra)
    slots = []
    for t in model.tensors:
        qtype = plan.qtype(t.name)
        nbytes = ggml.row_size(qtype, t.shape[-1]) * (t.n_elements // t.shape[-1])
        slots.append(TensorSlot(t.name, t.shape, qtype, nbytes))
    alignment = int(model.field("general.alignment", GGUF_DEFAULT_ALIGNMENT))  # a UINT32 (ggufheader)
    with atomic_output(out) as tmp:
        try:
            with open(tmp, "wb") as f:
                writer = GGUFStreamWriter(f, alignment)
                kv_end = writer.write_header(n_kv, kv, slots)
                del kv
                total = sum(t.n_bytes for t in model.tensors)
                bar = tqdm(total=total, desc="merging", unit="B", unit_scale=True, disable=not progress, delay=1.0)
                # (tensor, its job's future or None for a copy, the job's working set in bytes), in file order
                pending: deque[tuple[ModelTensor, Future[tuple[np.ndarray, int, Kept]] | None, int]] = deque()

                def write_head() -> None:
                    t, fut, _ = pending.popleft()
                    if fut is None:
                        writer.write_tensor(t.raw())
                        report.copied += 1
                        pages.release_views([t.raw()])
                    else:
                        data, refreshed, report.kept[t.name] = fut.result()
                        writer.write_tensor(data)
                        buffers.give(data)
                        report.touched[t.name] = (t.tensor_type, jobs[t.name].qtype)
                        report.refreshed_blocks += refreshed
                        pages.release_views(_read_views(jobs[t.name]))  # never read again
                    bar.update(t.n_bytes)

                largest = max((4 * j.tensor.n_elements for j in jobs.values()), default=0)  # in float32
                touched = sum(j.tensor.n_elements for j in jobs.values())
                big_at = BIG_TENSOR_SHARE * touched
                cores = threads or ggml.default_threads()
                workers = cores + 1 if cores > 1 else 1
                budget = largest + largest // 2  # bytes of the jobs in flight (_working_set)
                sizes = {slot.name: slot.nbytes for slot in slots}
                # written tensors' bytes are reused by the next of the same size: up to one per worker of each
                # size idle, but not the few big tensors'
                regular = [sizes[name] for name, j in jobs.items() if j.tensor.n_elements < big_at]
                buffers = Buffers(workers, max(regular, default=0))
                with ThreadPoolExecutor(workers, thread_name_prefix="alignvec-merge") as pool:
                    try:
                        for t in model.tensors:
                            if fingerprint is not None:
                                fingerprint.add(t.name, ggml.dequantize(t.raw(), t.tensor_type, t.n_elements))
                            job = jobs.get(t.name)
                            if job is None:
                                pending.append((t, None, 0))
                            else:  # memory: the jobs in flight never hold more than the budget
                                need = _working_set(job, sizes[t.name])
                                while pending and sum(m for _, _, m in pending) + need > budget:
                                    write_head()
                                job = replace(job, threads=cores if job.tensor.n_elements >= big_at else 1)
                                pending.append((t, pool.submit(run_job, job, buffers), need))
                            while pending and (
                                pending[0][1] is None
                                or pending[0][1].done()
                                or sum(f is not None for _, f, _ in pending) > workers
                            ):
                                write_head()
                        while pending:
                            write_head()
                    finally:
                        for _, fut, _ in pending:
                            if fut is not None:
                                fut.cancel()
                        bar.close()
                writer.finish()
        finally:
            pages.release(inputs)
        patches = {old.encode(): new.encode() for old, new in zip(placeholders, digests.result(), strict=True)}
        patches[kept_placeholder] = pack_kv(K_MERGED_KEPT, [report.kept_share, report.min_kept_share])
        patch_header(tmp, kv_end, patches)

    diagnose(plan, report, fingerprint)
    report.seconds = time.perf_counter() - start
    return report
