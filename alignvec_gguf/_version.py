"""The package's version, in one place: ``pyproject.toml`` reads it (``[tool.setuptools.dynamic]``), and every
module that records it (the AV producer, the cache key, the Modelfile, the server) imports it from here."""

from __future__ import annotations

__version__ = "0.3.0"
