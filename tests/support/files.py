"""File helpers of the tests: a file's content digest (to check that a command left a user's file untouched)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256(path: Path) -> str:
    """The hex SHA-256 of the file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
