"""Support shared by the tests and the benchmarks (both import it as ``tests.support.<module>``; nothing imports
``benchmarks/``): tiny and real models, llama.cpp's tools, loopback servers, the fuzz engine, the synthetic Llama
shapes, and small helpers (file digests, CLI runners, the one-line-error assertion).

Only the standard library is imported here, so that ``from tests.support import REPO`` is cheap."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository root (the checkout holding ``alignvec_gguf/``, ``tests/`` and ``benchmarks/``)."""
