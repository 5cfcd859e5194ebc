"""An on-disk cache of merged models, keyed by what determines their content.

The key covers the base file's identity (resolved path, size, modification time), each vector's
content hash, its λ, the requant policy and the package version. Entries are written atomically,
so concurrent processes may both merge but never see a partial file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from .avfile import AlignmentVector
from .errors import InputError
from .merge import Vectors, merge, open_vectors

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    if env := os.environ.get("ALIGNVEC_CACHE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "alignvec"


def cache_key(base: Path, vectors: list[tuple[AlignmentVector, float]], requant: str) -> str:
    from . import __version__

    st = base.stat()
    payload = {
        "base": [str(base.resolve()), st.st_size, st.st_mtime_ns],
        "vectors": sorted((av.sha256, repr(float(lam))) for av, lam in vectors),
        "requant": requant.lower(),
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cached_merge(
    base: str | os.PathLike[str],
    vectors: Vectors,
    *,
    requant: str = "same",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> Path:
    """The path of the merged model for this mix, merging it first if it is not cached yet."""
    base = Path(base)
    opened = open_vectors(vectors)
    if not base.is_file():
        raise InputError(f"base model {base} does not exist")
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{base.name.removesuffix('.gguf')}.{cache_key(base, opened, requant)[:20]}.gguf"
    if path.exists():
        log.info("using cached merge %s", path)
        os.utime(path)  # recency, for eviction
        return path
    merge(base, dict(opened), path, requant=requant, progress=progress)
    return path
