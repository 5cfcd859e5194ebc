"""Loading base + Σ λ·AV without a merged file: tensors uploaded through ``llama_model_init_from_user``.

llama.cpp 0.3.36 (as bound by llama-cpp-python) can build a model from a GGUF metadata context and a
callback that fills each tensor. Here the metadata comes from the base file (``gguf_init_from_file``
without its data), tensor types follow the merge plan, and the callback writes each tensor: the
base's bytes where no vector touches it, the merged tensor (``tensormerge.run_job``) where one does. No
disk is used, but llama.cpp loads such a model with ``use_extra_bufts = false``: weights are not
repacked into the CPU's interleaved layout (Q4_K and friends), and the whole model is read into
memory instead of memory-mapped. benchmarks/merge.py measures the trade; see README, "Cache and load
modes": the cached merged file is the default.

``Llama`` only loads from a path, so :func:`load_direct` hands ``cpu.new_llama`` a loader that calls
``llama_model_init_from_user``: it replaces llama.cpp's file loader for that one load only, in this thread
(``cpu.py``); a ``Llama`` built elsewhere at the same time loads its own file.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from . import cpu, ggml
from .cpu import new_llama
from .diagnose import MergeReport, diagnose, float_fingerprint
from .errors import AlignVecError, CompatibilityError
from .imatrix import Imatrix
from .mix import VectorMix, Vectors
from .plan import MergePlan
from .policy import DEFAULT_POLICY
from .tensormerge import run_job

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)
# optional tensors whose neutral value is 1 (multiplicative); every other missing one is 0 (additive)
_NEUTRAL_ONE = (".scale", ".input_scale", "rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


class _Uploader:
    """The tensor-data callback: computes or copies each tensor and hands it to ggml's backend."""

    def __init__(self, plan: MergePlan):
        self.plan = plan
        self.tensors = {t.name: t for t in plan.model.tensors}
        self.error: BaseException | None = None
        self.uploaded = 0
        self.filled: list[str] = []
        # what a file merge reports (diagnose.py): touched tensors, their kept share, the base's fingerprint
        self.report = MergeReport(path=plan.base, policy=plan.policy.name)
        self.fingerprint = float_fingerprint(plan)

    def __call__(self, tensor: int, _userdata: int) -> None:
        if self.error is not None:
            return
        lib = ggml.lib()
        try:
            name = lib.ggml_get_name(tensor).decode()
            nbytes = int(lib.ggml_nbytes(tensor))
            t = self.tensors.get(name)
            if t is None:
                # Without files llama.cpp cannot tell which optional tensors exist, so it creates them
                # all (F32): each must get its neutral value, 0 for biases, 1 for scales and rope factors.
                self.filled.append(name)
                neutral = 1.0 if name.endswith(_NEUTRAL_ONE) else 0.0
                values = np.full(nbytes // 4, neutral, dtype=np.float32)
                lib.ggml_backend_tensor_set(tensor, values.ctypes.data, 0, nbytes)
                return
            job = self.plan.jobs.get(name)
            if self.fingerprint is not None:
                self.fingerprint.add(name, ggml.dequantize(t.raw(), t.tensor_type, t.n_elements))
            if job is None:
                data = np.ascontiguousarray(t.raw())
            else:
                data, refreshed, self.report.kept[name] = run_job(job)
                self.report.touched[name] = (t.tensor_type, job.qtype)
                self.report.refreshed_blocks += refreshed
            if data.nbytes != nbytes:
                raise CompatibilityError(f"{name}: llama.cpp expects {nbytes} bytes, the merge made {data.nbytes}")
            lib.ggml_backend_tensor_set(tensor, data.ctypes.data, 0, nbytes)
            self.uploaded += 1
        except BaseException as e:  # an exception must not cross the C callback
            self.error = e


def load_direct(
    base: str | os.PathLike[str],
    vectors: Vectors | VectorMix,
    *,
    requant: str = DEFAULT_POLICY,
    imatrix: str | os.PathLike[str] | Imatrix | None = None,
    full_base: str | os.PathLike[str] | None = None,
    **llama_kwargs: Any,
) -> Llama:
    """A ``llama_cpp.Llama`` of base + Σ λ_i Δ_i built in memory, with no merged file on disk.

    It logs the diagnostics a file merge logs (``diagnose.diagnose``: type fallbacks, the kept-share
    warning, the fingerprint check).
    """
    import llama_cpp.llama_cpp as C

    plan = MergePlan(base, vectors, requant=requant, imatrix=imatrix, full_base=full_base)
    if plan.model.is_split:
        raise CompatibilityError("direct loading reads one base file; merge a split base with alignvec merge")
    lib = ggml.lib()
    gctx = lib.gguf_init_from_file(str(plan.base).encode(), ggml.GGUFInitParams(True, None))
    if not gctx:
        raise CompatibilityError(f"ggml cannot read the metadata of {plan.base}")
    uploader = _Uploader(plan)
    callback = C.llama_model_set_tensor_data_t(uploader)
    try:
        for name, job in plan.jobs.items():
            if job.qtype != job.tensor.tensor_type:
                lib.gguf_set_tensor_type(gctx, name.encode(), int(job.qtype))

        def from_user(_path: bytes, params: Any) -> Any:
            return C.llama_model_init_from_user(gctx, callback, None, params)

        llama_kwargs.setdefault("verbose", False)
        # the CPU guard places weights by the types llama.cpp will see: the plan's, not the base file's
        types = [(t.name, plan.qtype(t.name), t.info.ne) for t in plan.model]
        allow_amx = llama_kwargs.pop("allow_amx", None)
        buffers = cpu.plan(plan.base, allow_amx=allow_amx, tensors=types)
        try:
            llm = new_llama(plan.base, loader=from_user, buffers=buffers, **llama_kwargs)
        except ValueError as e:
            raise uploader.error or AlignVecError(f"llama.cpp could not build the model in memory ({e})") from e
        if uploader.error is not None:
            llm.close()
            raise uploader.error
        if uploader.filled:
            log.info("llama.cpp created %d optional tensors the base lacks; set to neutral", len(uploader.filled))
        diagnose(plan, uploader.report, uploader.fingerprint)
        return llm
    finally:
        lib.gguf_free(ctypes.c_void_p(gctx))
