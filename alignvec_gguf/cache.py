"""An on-disk cache of merged models, keyed by what determines their content.

- Key: sha256 over the base's content (every shard), each vector's content hash and λ, the requant
  policy, the importance matrix and full-precision base if given, and the package version. Content
  hashes of large files are computed once and remembered by (real path, size, mtime, inode) in
  ``digests.json``, so a second load of the same mix costs a few ``stat`` calls, not a hash of the base.
- Entries are written atomically (temporary file + rename), so an entry's ``.gguf`` exists only when
  complete. A lock per entry makes concurrent processes that want the same mix merge it once: the
  others wait, then find the finished file.
- Names: the base file's name (sanitized, shortened) and the key; nothing an alignment vector says
  about itself (name, description, sources) reaches a path.
- A killed merge leaves only a hidden temporary and a lock file; the next merge into the cache removes
  the temporaries whose writer is gone (``atomic.remove_stale_temporaries``), ``alignvec cache clear``
  removes those and the locks of missing entries.
- Size bound (``ALIGNVEC_CACHE_MAX``, default 20G): after a new entry is written, the least recently
  used entries are removed until the cache fits. An entry being written or loaded (its lock is held)
  and the entry just made are never removed.
- Location: ``ALIGNVEC_CACHE_DIR``, else ``$XDG_CACHE_HOME/alignvec`` or ``~/.cache/alignvec``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._version import __version__
from .atomic import atomic_output, file_lock, remove_stale_temporaries
from .avfile import AlignmentVector
from .errors import AlignVecError, DiskFullError, InputError
from .ggufread import shard_paths
from .merge import merge
from .mix import VectorMix, Vectors
from .policy import DEFAULT_POLICY, parse_requant

log = logging.getLogger(__name__)

ENV_DIR = "ALIGNVEC_CACHE_DIR"
ENV_MAX = "ALIGNVEC_CACHE_MAX"
DEFAULT_MAX_BYTES = 20 << 30
_DIGESTS = "digests.json"
_DIR_LOCK = ".lock"
_SIDE = ".json"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_STEM_CHARS = 64  # of the base's name in an entry's name


def default_cache_dir() -> Path:
    """``$ALIGNVEC_CACHE_DIR``, else ``$XDG_CACHE_HOME/alignvec`` or ``~/.cache/alignvec``."""
    if env := os.environ.get(ENV_DIR):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "alignvec"


def parse_size(text: str) -> int:
    """``"20G"``, ``"512M"``, ``"1.5T"``, ``"1000000"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)i?B?\s*", text.upper())
    if not m:
        raise InputError(f"bad cache size {text!r}: use a number of bytes or e.g. 512M, 20G")
    return int(float(m[1]) * _UNITS[m[2]])


def default_max_bytes() -> int:
    env = os.environ.get(ENV_MAX)
    return parse_size(env) if env else DEFAULT_MAX_BYTES


def check_base(base: Path) -> None:
    """Raise :class:`InputError` unless the base model ``base`` is an existing file."""
    if base.is_dir():
        raise InputError(f"base model {base} is not a file but a directory; give the .gguf file")
    if not base.is_file():
        raise InputError(f"base model {base} does not exist")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class CacheEntry:
    """One merged model in the cache."""

    path: Path
    size: int
    last_used: float  # seconds since the epoch (the file's mtime, refreshed on every use)
    meta: dict[str, Any] = field(default_factory=dict)  # base, vectors, lambdas, requant, created


class MergeCache:
    """The merged-model cache in one directory."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, max_bytes: int | None = None):
        self.dir = Path(directory) if directory is not None else default_cache_dir()
        self.max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
        if self.max_bytes < 0:
            raise InputError(f"cache size bound must be >= 0, got {self.max_bytes}")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create the cache directory {self.dir} ({e.strerror}); set {ENV_DIR}") from e

    # --- content identity -----------------------------------------------------------------------

    @contextmanager
    def _dir_lock(self) -> Iterator[None]:
        with file_lock(self.dir / _DIR_LOCK):
            yield

    def _read_digests(self) -> dict[str, Any]:
        try:
            data = json.loads((self.dir / _DIGESTS).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def file_digest(self, path: str | os.PathLike[str], hasher: Callable[[Path], str] | None = None) -> str:
        """sha256 of a file's content, hashed once and then remembered by path, size, mtime and inode.

        ``hasher`` reads the file instead of a plain sha256 (an AV checks its content digest on the way).
        """
        real = os.path.realpath(path)
        st = os.stat(real)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        known = self._read_digests().get(real)
        if isinstance(known, dict) and known.get("stat") == stamp and isinstance(known.get("sha256"), str):
            return str(known["sha256"])
        log.info("hashing %s (once; remembered in %s)", path, self.dir / _DIGESTS)
        digest = (hasher or _sha256_file)(Path(real))
        try:
            with self._dir_lock():
                digests = self._read_digests()
                digests = {k: v for k, v in digests.items() if os.path.exists(k)}  # forget deleted files
                digests[real] = {"stat": stamp, "sha256": digest}
                with atomic_output(self.dir / _DIGESTS) as tmp:
                    tmp.write_text(json.dumps(digests, indent=0, sort_keys=True))
        except (OSError, AlignVecError) as e:  # a memo only: a full disk or read-only cache still serves entries
            log.warning("cannot remember the hash of %s in %s (%s)", path, self.dir / _DIGESTS, e)
        return digest

    def key(
        self,
        base: Path,
        vectors: VectorMix,
        requant: str,
        imatrix: str | os.PathLike[str] | None = None,
        full_base: str | os.PathLike[str] | None = None,
    ) -> str:
        """The content key of a mix (hex sha256); ``vectors`` as :meth:`VectorMix.open` gives it."""
        for what, extra in (("importance matrix", imatrix), ("full-precision base", full_base)):
            if extra is not None and not Path(extra).is_file():
                raise InputError(f"{what} {extra} does not exist")
        payload = {
            "base": [self.file_digest(p) for p in shard_paths(base)],
            "base_name": base.name,  # the merged file records it
            # everything the merged file records of its vectors, in the order they are summed
            "vectors": [(av.sha256, repr(float(lam)), _recorded_name(av)) for av, lam in self.canonical(vectors)],
            "requant": parse_requant(requant).name,
            "imatrix": self.file_digest(imatrix) if imatrix is not None else None,
            "full_base": [self.file_digest(p) for p in shard_paths(full_base)] if full_base is not None else None,
            "version": __version__,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def canonical(self, vectors: VectorMix) -> VectorMix:
        """The mix as it is keyed and merged: λ = 0 left out, the rest in the order of their file digests.

        float32 sums depend on their order and the merged file records its vectors, so the merge of a
        key must not depend on how the caller listed the mix: ``{A: 0.5, B: 0.3}``, ``{B: 0.3, A: 0.5}``
        and ``{A: 0.5, B: 0.3, C: 0}`` are one entry, byte for byte.
        """
        for av, _ in vectors:  # remember the digest; it orders the mix and keys it
            if "sha256" not in av.__dict__:  # hashing an AV checks its recorded content digest too
                av.__dict__["sha256"] = self.file_digest(av.path, _av_hasher(av))
        return vectors.canonical(lambda av, lam: (av.sha256, lam, _recorded_name(av)))

    # --- entries --------------------------------------------------------------------------------

    def entry_path(self, base: Path, key: str) -> Path:
        """``<base name>.<key prefix>.gguf``: the base's name for people, its characters limited and shortened."""
        stem = re.sub(r"-\d{5}-of-\d{5}$", "", base.name.removesuffix(".gguf"))
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).lstrip(".")[:_STEM_CHARS] or "model"
        return self.dir / f"{stem}.{key[:20]}.gguf"

    @staticmethod
    def _lock_path(entry: Path) -> Path:
        return entry.with_name(f".{entry.name}.lock")

    @contextmanager
    def using(self, entry: Path) -> Iterator[None]:
        """Hold a shared lock on an entry while it is being loaded, so that eviction leaves it alone."""
        with file_lock(self._lock_path(entry), shared=True):
            yield

    def get(
        self,
        base: str | os.PathLike[str],
        vectors: Vectors | VectorMix,
        *,
        requant: str = DEFAULT_POLICY,
        imatrix: str | os.PathLike[str] | None = None,
        full_base: str | os.PathLike[str] | None = None,
        progress: bool = False,
    ) -> Path:
        """The path of the merged model for this mix, merging it first (once, across processes) if needed.

        ``vectors`` is the mapping users pass or a :class:`VectorMix` (opened and checked once, here or by
        the caller, and handed on to the merge as it is). A mix whose λ are all 0 is the base itself: its
        path is returned (nothing is merged or written).
        """
        base = Path(base)
        opened = VectorMix.open(vectors)
        check_base(base)
        key = self.key(base, opened, requant, imatrix, full_base)
        opened = self.canonical(opened)
        if not opened:
            return base
        requant = parse_requant(requant).name  # the merged file records the policy as the key has it
        path = self.entry_path(base, key)
        if path.exists():
            log.info("using cached merge %s", path)
            self._touch(path)
            return path
        lock = self._lock_path(path)
        with file_lock(lock):
            if path.exists():  # another process merged it while we waited
                log.info("using cached merge %s (made by another process)", path)
                self._touch(path)
                return path
            try:
                report = merge(
                    base, opened, path, requant=requant, progress=progress, imatrix=imatrix, full_base=full_base
                )
            except BaseException as e:
                lock.unlink(missing_ok=True)  # no entry to guard (allowed while holding it: atomic.file_lock)
                if isinstance(e, DiskFullError):
                    raise DiskFullError(
                        f"{e}; the merge cache is {self.dir}: free space there, set {ENV_DIR}, or lower {ENV_MAX}"
                    ) from e
                raise
            meta = {
                "key": key,
                "base": str(base.resolve()),
                "vectors": [str(av.path.resolve()) for av, _ in opened],
                "lambdas": [lam for _, lam in opened],
                "requant": requant.lower(),
                "created": time.time(),
                "merge_seconds": round(report.seconds, 3),
            }
            try:
                with atomic_output(path.with_suffix(_SIDE)) as tmp:
                    tmp.write_text(json.dumps(meta, indent=1))
            except (OSError, AlignVecError) as e:  # the entry is complete; its description is for 'cache ls'
                log.warning("cannot write %s (%s)", path.with_suffix(_SIDE), e)
        self.evict(keep=path)
        return path

    @staticmethod
    def _touch(path: Path) -> None:
        try:
            os.utime(path)  # recency, for eviction
        except OSError:  # a read-only cache still serves its entries
            pass

    def entries(self) -> list[CacheEntry]:
        """Every complete entry, least recently used first."""
        out = []
        for p in self.dir.glob("*.gguf"):
            try:
                st = p.stat()
            except OSError:  # removed meanwhile
                continue
            try:
                meta = json.loads(p.with_suffix(_SIDE).read_text())
            except (OSError, ValueError):
                meta = {}
            out.append(CacheEntry(p, st.st_size, st.st_mtime, meta if isinstance(meta, dict) else {}))
        return sorted(out, key=lambda e: e.last_used)

    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries())

    def _remove(self, entry: CacheEntry) -> bool:
        """Remove an entry and its lock unless another process holds the lock (writing or loading it)."""
        lock = self._lock_path(entry.path)
        with file_lock(lock, blocking=False) as taken:
            if not taken:
                return False
            entry.path.unlink(missing_ok=True)
            entry.path.with_suffix(_SIDE).unlink(missing_ok=True)
            lock.unlink(missing_ok=True)  # allowed while holding it: waiters lock a fresh file (atomic.file_lock)
        return True

    def evict(self, keep: Path | None = None) -> list[CacheEntry]:
        """Remove least recently used entries until the cache fits its bound; returns what was removed."""
        removed: list[CacheEntry] = []
        with self._dir_lock():
            remove_stale_temporaries(self.dir)  # what killed merges left behind
            entries = self.entries()
            total = sum(e.size for e in entries)
            for e in entries:
                if total <= self.max_bytes:
                    break
                if keep is not None and e.path == keep:
                    continue
                if self._remove(e):
                    total -= e.size
                    removed.append(e)
                    log.info("evicted %s from the cache (%.1f MB)", e.path.name, e.size / 1e6)
            if total > self.max_bytes:
                log.warning(
                    "the merge cache %s holds %.1f MB, over its bound of %.1f MB (entries in use or just made); "
                    "raise %s or run 'alignvec cache clear'",
                    self.dir,
                    total / 1e6,
                    self.max_bytes / 1e6,
                    ENV_MAX,
                )
        return removed

    def clear(self) -> tuple[int, int]:
        """Remove every entry not in use, and what killed merges left behind; returns (entries, bytes freed)."""
        n = freed = 0
        with self._dir_lock():
            for e in self.entries():
                if self._remove(e):
                    n += 1
                    freed += e.size
            freed += remove_stale_temporaries(self.dir)
            # locks and sidecars of entries that are gone (a merge killed before or an eviction killed after
            # the rename), unless a merge of that entry is running
            gone = {p.with_name(p.name[1:].removesuffix(".lock")) for p in self.dir.glob(".*.gguf.lock")}
            gone |= {p.with_suffix(".gguf") for p in self.dir.glob(f"*{_SIDE}") if p.name != _DIGESTS}
            for entry in sorted(gone):
                lock = self._lock_path(entry)
                with file_lock(lock, blocking=False) as taken:
                    if taken and not entry.exists():
                        entry.with_suffix(_SIDE).unlink(missing_ok=True)
                        lock.unlink(missing_ok=True)
        return n, freed


def _av_hasher(av: AlignmentVector) -> Callable[[Path], str]:
    def hash_av(_path: Path) -> str:
        return av.hash_file()

    return hash_av


def _recorded_name(av: AlignmentVector) -> str:
    """How the merged file names a vector (``alignvec.merged.vectors``)."""
    return av.info.name or av.path.name


def cached_merge(
    base: str | os.PathLike[str],
    vectors: Vectors | VectorMix,
    *,
    requant: str = DEFAULT_POLICY,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    imatrix: str | os.PathLike[str] | None = None,
    full_base: str | os.PathLike[str] | None = None,
    max_bytes: int | None = None,
) -> Path:
    """The path of the merged model for this mix, merging it first if it is not cached yet."""
    cache = MergeCache(cache_dir, max_bytes)
    return cache.get(base, vectors, requant=requant, imatrix=imatrix, full_base=full_base, progress=progress)
