"""Atomic file output (temporary file, fsync, rename into place) and cross-process file locks.

A crash, an exception or a full disk leaves the target as it was (absent or the old file), never
half-written.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError


@contextmanager
def atomic_output(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success it is renamed to ``target``."""
    target = Path(target)
    if target.is_dir():
        raise InputError(f"output {target} is a directory; give a file name")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output directory {parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; outputs are ordinary files
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise InputError(f"no space left on device while writing {target}; nothing was written") from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def file_lock(path: str | os.PathLike[str], *, shared: bool = False, blocking: bool = True) -> Iterator[bool]:
    """Hold an advisory lock on ``path`` (created if missing) across processes; yields whether it was taken.

    ``shared`` locks may be held by many processes at once, an exclusive one by one process with no
    shared holders. With ``blocking=False`` the context yields False at once instead of waiting.
    POSIX ``flock``; on Windows ``msvcrt.locking`` (always exclusive).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    taken = False
    try:
        if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
            import msvcrt

            try:
                msvcrt.locking(fd, msvcrt.LK_LOCK if blocking else msvcrt.LK_NBLCK, 1)
                taken = True
            except OSError:
                if blocking:
                    raise
            try:
                yield taken
            finally:
                if taken:
                    os.lseek(fd, 0, os.SEEK_SET)
                    msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            op = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
            try:
                fcntl.flock(fd, op)
                taken = True
            except BlockingIOError:
                taken = False
            try:
                yield taken
            finally:
                if taken:
                    fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
