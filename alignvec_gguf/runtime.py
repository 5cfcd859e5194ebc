"""Loading a base model with alignment vectors applied, as an ordinary ``llama_cpp.Llama``.

Two load modes (README, "Cache and load modes"):

- ``cached`` (default): the merged model is written once to the cache (``cache.py``) and loaded from
  there like any GGUF: memory-mapped, with llama.cpp's CPU weight repacking. A second load of the same
  mix costs a plain load.
- ``direct``: no merged file; tensors are uploaded through ``llama_model_init_from_user``
  (``direct.py``). No disk, but every load merges again and the weights are neither memory-mapped nor
  repacked (slower tokens on K-quants).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache import MergeCache, check_base
from .cpu import new_llama
from .errors import InputError
from .mix import VectorMix, Vectors
from .policy import DEFAULT_POLICY

if TYPE_CHECKING:
    from llama_cpp import Llama

LOAD_MODES = ("cached", "direct")


def load(
    base: str | os.PathLike[str],
    vectors: Vectors | VectorMix,
    *,
    requant: str = DEFAULT_POLICY,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    imatrix: str | os.PathLike[str] | None = None,
    full_base: str | os.PathLike[str] | None = None,
    mode: str = "cached",
    **llama_kwargs: Any,
) -> Llama:
    """Merge ``vectors`` (AV path or object -> λ) into ``base`` and load it with llama.cpp.

    ``requant``, ``imatrix`` and ``full_base`` are as for :func:`alignvec_gguf.merge`; ``mode`` is
    ``"cached"`` (default) or ``"direct"`` (see the module doc). Extra keyword arguments go to
    ``llama_cpp.Llama`` (``n_ctx``, ``n_gpu_layers``, ``seed``...), and ``allow_amx`` to the CPU guard
    (``alignvec_gguf.cpu``: on Intel AMX CPUs the model is loaded so that llama.cpp's crashing AMX kernel
    is never used; ``allow_amx=True`` restores llama.cpp's own choice).
    """
    if mode not in LOAD_MODES:
        raise InputError(f"unknown load mode {mode!r}; use one of {', '.join(LOAD_MODES)}")
    llama_kwargs.setdefault("verbose", False)

    # the vectors are opened and checked here, once; the cache and the merge take the mix as it is
    mix = VectorMix.open(vectors)  # or one InputError line
    if mix.is_identity:
        # λ = 0 everywhere is the base itself: nothing to merge
        path = Path(base)
        check_base(path)
        return new_llama(path, **llama_kwargs)
    if mode == "direct":
        from .direct import load_direct

        return load_direct(base, mix, requant=requant, imatrix=imatrix, full_base=full_base, **llama_kwargs)
    cache = MergeCache(cache_dir)
    for _ in range(3):
        path = cache.get(base, mix, requant=requant, imatrix=imatrix, full_base=full_base, progress=progress)
        with cache.using(path):  # eviction by another process leaves an entry alone while it is being opened
            if path.exists():  # else it was evicted between the lookup and the lock: look up again
                return new_llama(path, **llama_kwargs)
    raise InputError(f"the cache {cache.dir} keeps evicting this mix; raise ALIGNVEC_CACHE_MAX")
