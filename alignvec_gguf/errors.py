"""The error hierarchy. The CLI prints any of these as one line and exits with status 2."""

from __future__ import annotations


class AlignVecError(Exception):
    """Base class: something the user can fix, with a message that says how."""


class FormatError(AlignVecError):
    """A file is not what it claims to be: not GGUF, truncated, wrong version, bad values."""


class CompatibilityError(AlignVecError):
    """Two inputs do not fit together: architecture, tensor names or shapes, configs."""


class InputError(AlignVecError):
    """A path, argument or option is wrong: missing file, bad λ syntax, unsupported choice."""


class DiskFullError(AlignVecError):
    """Writing ran out of room (no space left, a disk quota, a file-size limit); nothing was written."""
