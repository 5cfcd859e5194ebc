"""Atomic file output: write to a temporary file beside the target, fsync, rename into place.

A crash, an exception or a full disk leaves the target as it was (absent or the old file), never
half-written.
"""

from __future__ import annotations

import errno
import os
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
