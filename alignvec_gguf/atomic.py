"""Atomic file output (temporary file, fsync, rename into place) and cross-process file locks.

A crash, an exception or a full disk leaves the target as it was (absent or the old file), never
half-written. The only thing a killed process leaves behind is a hidden temporary
``.NAME.XXXXXXXX.tmp`` beside the target. Its writer holds an ``flock`` on it for as long as it
lives, so a later write (:func:`remove_stale_temporaries`) tells a dead writer's leftovers from a
live writer's file and removes only the former.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import DiskFullError, InputError

_TEMP_SUFFIX = ".tmp"
_RANDOM = r"[a-z0-9_]{8}"  # the random part of tempfile.mkstemp's names
_TEMPORARY = re.compile(rf"\..+\.{_RANDOM}\.tmp")
_NAME_IN_TEMP = 200  # bytes; a file name is at most 255: room for ".", ".XXXXXXXX.tmp"
_OUT_OF_ROOM = {
    errno.ENOSPC: "no space left on device",
    errno.EFBIG: "file too large (a file system or per-process file size limit)",
}
if hasattr(errno, "EDQUOT"):  # not on Windows
    _OUT_OF_ROOM[errno.EDQUOT] = "disk quota exceeded"
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile, which sets no errno


def check_output(target: str | os.PathLike[str]) -> Path:
    """Raise :class:`InputError` unless ``target`` names a file in an existing directory; returns that directory."""
    target = Path(target)
    if target.is_dir():
        raise InputError(f"output {target} is a directory; give a file name")
    parent = target.parent
    if not parent.exists():
        raise InputError(f"output directory {parent} does not exist")
    if not parent.is_dir():
        raise InputError(f"output directory {parent} is a file, not a directory")
    return parent


@contextmanager
def atomic_output(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success it is renamed to ``target``.

    On any failure the temporary is removed and ``target`` is untouched; running out of room (no space,
    quota, file size limit) raises :class:`DiskFullError`. Leftovers of killed writers of the same
    target are removed first.
    """
    target = Path(target)
    parent = check_output(target)
    remove_stale_temporaries(parent, target.name)
    fd, tmp = _create_temporary(parent, target.name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_directory(parent)  # the rename itself survives a power loss
    except OSError as e:
        reason = _out_of_room(e, tmp)
        tmp.unlink(missing_ok=True)
        if reason:
            raise DiskFullError(f"{reason} while writing {target}; nothing was written") from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)  # releases the temporary's lock


def _create_temporary(parent: Path, name: str) -> tuple[int, Path]:
    """A new empty temporary for ``name`` in ``parent``, mode 0644, locked by the returned descriptor."""
    for _ in range(10):
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{_temp_stem(name)}.", suffix=_TEMP_SUFFIX, dir=parent)
        except OSError as e:
            if e.errno in _OUT_OF_ROOM:
                raise DiskFullError(f"{_OUT_OF_ROOM[e.errno]} in {parent}; nothing was written") from e
            raise InputError(f"cannot create a file in {parent} ({e.strerror}); choose another output path") from e
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; outputs are ordinary files
        if sys.platform == "win32":  # pragma: no cover - no flock: temporaries are never swept there
            return fd, Path(tmp_name)
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink > 0:  # else a sweep removed it before we locked it: make another
            return fd, Path(tmp_name)
        os.close(fd)
    raise InputError(f"temporary files in {parent} keep disappearing; is another program cleaning it?")


def _temp_stem(name: str) -> str:
    """The target's name as its temporaries carry it: cut to fit a file name, at a character boundary."""
    return name.encode("utf-8", "surrogateescape")[:_NAME_IN_TEMP].decode("utf-8", "ignore")


def _out_of_room(e: OSError, tmp: Path) -> str | None:
    """What ran out, if ``e`` is a write that ran out of room; None for other errors.

    A short write to a regular file means the room ran out; numpy's ``tofile`` reports one as "N requested
    and M written", without an errno. One more byte written to the doomed temporary then fails with the
    real reason, unless the short write hit another file (a writer's spool in the temporary directory).
    """
    if e.errno in _OUT_OF_ROOM:
        return _OUT_OF_ROOM[e.errno]
    if e.errno is not None or not _SHORT_WRITE.search(str(e)):
        return None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"\0")
        finally:
            os.close(fd)
    except OSError as probe:
        if probe.errno in _OUT_OF_ROOM:
            return _OUT_OF_ROOM[probe.errno]
    return f"ran out of room (a short write: no space left or a file size limit, here or in {tempfile.gettempdir()})"


def _fsync_directory(directory: Path) -> None:
    if sys.platform == "win32":  # pragma: no cover - directories cannot be opened there
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; the rename is done either way
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: str | os.PathLike[str], name: str | None = None) -> int:
    """Remove the temporaries that killed writers left in ``directory``; returns the bytes freed.

    Only ``atomic_output``'s temporaries (of target ``name``, or of any target) whose lock no process
    holds are removed; a live writer's temporary is left alone.
    """
    if sys.platform == "win32":  # pragma: no cover - no flock there
        return 0
    import fcntl

    pattern = re.compile(rf"\.{re.escape(_temp_stem(name))}\.{_RANDOM}\.tmp") if name else _TEMPORARY
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    freed = 0
    for entry in names:
        if not pattern.fullmatch(entry):
            continue
        path = os.path.join(directory, entry)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, a link, unreadable
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # its writer is alive
                continue
            if _same_file(fd, path):
                os.unlink(path)
                freed += st.st_size
        except OSError:  # a read-only directory: nothing to clean there
            continue
        finally:
            os.close(fd)
    return freed


def _same_file(fd: int, path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not removed or replaced meanwhile)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


@contextmanager
def file_lock(path: str | os.PathLike[str], *, shared: bool = False, blocking: bool = True) -> Iterator[bool]:
    """Hold an advisory lock on ``path`` (created if missing) across processes; yields whether it was taken.

    ``shared`` locks may be held by many processes at once, an exclusive one by one process with no
    shared holders. With ``blocking=False`` the context yields False at once instead of waiting.
    The lock file may be removed only by a holder of its exclusive lock; a process that was waiting on
    the removed file notices and locks the new one. POSIX ``flock``; on Windows ``msvcrt.locking``
    (always exclusive).
    """
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                msvcrt.locking(fd, msvcrt.LK_LOCK if blocking else msvcrt.LK_NBLCK, 1)
                taken = True
            except OSError:
                if blocking:
                    raise
                taken = False
            try:
                yield taken
            finally:
                if taken:
                    os.lseek(fd, 0, os.SEEK_SET)
                    msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        finally:
            os.close(fd)
        return
    import fcntl

    op = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, op)
        except BlockingIOError:
            taken = False
            break
        except BaseException:
            os.close(fd)
            raise
        taken = True
        if _same_file(fd, path):
            break
        os.close(fd)  # removed by its holder while we waited: lock the file that is there now
    try:
        yield taken
    finally:
        if taken:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
