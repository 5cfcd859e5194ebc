"""Support shared by the tests and the benchmarks, both importing it as ``tests.support.<module>`` (the tests
never import ``benchmarks/``):

- ``tinymodels``: tiny transformers Llamas (and other architectures), their tokenizer, llama.cpp's converter
  and quantizer on them; ``realmodels``: SmolLM2-135M-Instruct and its style fine-tune, cached;
- ``llamatools``: llama.cpp's own tools built once from the pinned sdist; ``loopback``: servers on 127.0.0.1;
- ``oracle``: gguf-py's reader, the independent oracle of what the package writes;
- ``fuzzseeds``, ``mutations``, ``fuzzing``: the fuzz engine (seed files, mutations, targets and the command
  behind ``benchmarks/fuzz.py``);
- ``synthetic``: the random Llama shapes and files of the 1.1B/7B benchmarks; ``measure``: their timings;
- ``commands`` (the in-process CLI runner, the one-line-error check), ``files`` (digests), ``childcode``
  (code pasted into the crash tests' children); :func:`pin`: a version ``pyproject.toml`` pins.

Only the standard library is imported here, so that ``from tests.support import REPO`` is cheap."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository root (the checkout holding ``alignvec_gguf/``, ``tests/`` and ``benchmarks/``)."""


def pin(package: str) -> str:
    """The version ``pyproject.toml`` pins ``package`` to (a ``"name==version"`` or ``"name[extra]==version"``
    requirement), so that the tools and venvs built beside the project take the same one. Read as text: the
    project supports Python 3.10, which has no ``tomllib``."""
    import re

    text = (REPO / "pyproject.toml").read_text()
    match = re.search(rf'"{re.escape(package)}(?:\[[^\]"]*\])?==([^"\s;,]+)"', text)
    if match is None:
        raise LookupError(f"pyproject.toml pins no {package}==...")
    return match.group(1)
