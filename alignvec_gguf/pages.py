"""Keeping memory-mapped inputs out of the resident set while they are streamed.

A merge reads the base and every vector through read-only memory maps. Each page it touches stays
in the process's resident set until the map is closed, so without help the RSS of a merge grows to
the size of all its inputs. The pages are clean copies of the files (the page cache keeps them), so
dropping them from the process with ``madvise(MADV_DONTNEED)`` costs nothing but a cheap re-fault if
they are read again. Linux only; elsewhere :func:`release` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Iterable
from functools import cache

log = logging.getLogger(__name__)

_MADV_DONTNEED = 4


@cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:  # pragma: no cover - every Linux has a libc
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc


def release(paths: Iterable[str | os.PathLike[str]]) -> int:
    """Drop this process's resident pages of every read-only mapping of ``paths``; returns the bytes advised.

    Writable mappings are never touched: dropping their pages could lose data.
    """
    libc = _libc()
    if libc is None:
        return 0
    targets = {os.path.realpath(p) for p in paths}
    advised = 0
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return 0
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or "w" in parts[1] or parts[5].rstrip("\n") not in targets:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if libc.madvise(lo, hi - lo, _MADV_DONTNEED) == 0:
            advised += hi - lo
        else:  # pragma: no cover - madvise on our own read-only mapping does not fail
            log.debug("madvise failed on %s: errno %d", parts[5].strip(), ctypes.get_errno())
    return advised
