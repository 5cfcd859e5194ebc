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
import mmap
import os
import sys
from collections.abc import Iterable
from functools import cache

import numpy as np

log = logging.getLogger(__name__)

_MADV_DONTNEED = 4
_PAGE = 4096 if not hasattr(os, "sysconf") else os.sysconf("SC_PAGE_SIZE")


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


def _file_mapped(view: np.ndarray) -> bool:
    """Whether ``view`` lies in a memory map of a file (on anonymous memory, MADV_DONTNEED would zero data)."""
    base: object = view
    while isinstance(base, np.ndarray):
        if isinstance(base, np.memmap):
            return True
        base = base.base
    return isinstance(base, mmap.mmap)


def release_views(views: Iterable[np.ndarray]) -> int:
    """Drop this process's resident pages under each read-only memory-mapped view (the whole pages inside it).

    What a merge has finished reading (a written tensor's bytes in the base and in each vector) goes at
    once: no walk over whole files, and the pages other threads are reading stay mapped (but for the rest
    of a huge page the kernel mapped whole, which faults back in from the page cache). Writable arrays and
    arrays that are not a file's map are never touched. Returns the bytes advised.
    """
    libc = _libc()
    if libc is None:
        return 0
    advised = 0
    for view in views:
        if view.flags.writeable or not view.nbytes or not _file_mapped(view):
            continue
        start = view.ctypes.data
        lo, hi = -(-start // _PAGE) * _PAGE, (start + view.nbytes) // _PAGE * _PAGE
        if hi > lo and libc.madvise(lo, hi - lo, _MADV_DONTNEED) == 0:
            advised += hi - lo
    return advised
