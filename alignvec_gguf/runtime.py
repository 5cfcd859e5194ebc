"""Loading a base model with alignment vectors applied, as an ordinary ``llama_cpp.Llama``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache import cached_merge
from .errors import InputError
from .merge import Vectors, open_vectors

if TYPE_CHECKING:
    from llama_cpp import Llama


def load(
    base: str | os.PathLike[str],
    vectors: Vectors,
    *,
    requant: str = "same",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    **llama_kwargs: Any,
) -> Llama:
    """Merge ``vectors`` (AV path or object -> λ) into ``base`` (cached) and load it with llama.cpp.

    Extra keyword arguments go to ``llama_cpp.Llama`` (``n_ctx``, ``n_gpu_layers``, ``seed``...).
    """
    try:
        from llama_cpp import Llama
    except ImportError as e:  # pragma: no cover - llama-cpp-python is a dependency
        raise InputError("llama-cpp-python is not installed: pip install llama-cpp-python") from e

    if any(lam != 0 for lam in vectors.values()):
        path = cached_merge(base, vectors, requant=requant, cache_dir=cache_dir, progress=progress)
    else:  # λ = 0 everywhere is the base itself: nothing to merge (the vectors are still validated)
        open_vectors(vectors)
        path = Path(base)
        if not path.is_file():
            raise InputError(f"base model {path} does not exist")
    llama_kwargs.setdefault("verbose", False)
    return Llama(model_path=str(path), **llama_kwargs)
