"""Exports for other runtimes: an Ollama Modelfile beside a merged GGUF.

A merged model is an ordinary GGUF, so Ollama needs only a Modelfile whose ``FROM`` points at it
(``ollama create NAME -f FILE.Modelfile``). The Modelfile records, as comments, the vectors and λ
the merged file was made with (read from its ``alignvec.merged.*`` metadata). Ollama reads the chat
template from the GGUF itself. Low-rank AVs can also ride along as ``ADAPTER`` lines, but Ollama
applies an adapter at scale 1 only: λ = 1, fixed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._version import __version__
from .atomic import atomic_output
from .errors import InputError
from .ggufread import GGUFModel

MODELFILE_SUFFIX = ".Modelfile"


def modelfile_path(model: str | os.PathLike[str]) -> Path:
    """Where the Modelfile of ``model`` goes: beside it, ``NAME.gguf`` -> ``NAME.Modelfile``."""
    model = Path(model)
    return model.with_name(model.name.removesuffix(".gguf") + MODELFILE_SUFFIX)


def _quote(path: str) -> str:
    return f'"{path}"' if any(c.isspace() for c in path) else path


def _reference(target: Path, directory: Path) -> str:
    """``./name`` when beside the Modelfile (Ollama resolves relative paths from it), else absolute."""
    target = target.resolve()
    if target.parent == directory.resolve():
        return _quote(f"./{target.name}")
    return _quote(str(target))


def _value(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"' if any(c.isspace() for c in value) or not value else value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _line(value: object) -> str:
    """A metadata value for a comment line: control characters (a newline would start a new Modelfile
    instruction) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))


def write_modelfile(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    adapters: Sequence[str | os.PathLike[str]] = (),
    parameters: Mapping[str, Any] | None = None,
    system: str | None = None,
) -> Path:
    """Write an Ollama Modelfile for the GGUF ``model`` (default: beside it) and return its path.

    ``parameters`` become ``PARAMETER`` lines (a list value gives one line per item, as Ollama wants
    for ``stop``); ``adapters`` become ``ADAPTER`` lines (low-rank AVs, applied by Ollama at scale 1).
    """
    model = Path(model)
    reader = GGUFModel(model, "model", split=False)  # its metadata only: decoded when asked, not the vocabulary
    if reader.field("general.type") == "adapter":
        raise InputError(f"{model} is an adapter, not a model; give the (merged) model GGUF")
    target = Path(out) if out is not None else modelfile_path(model)
    directory = target.parent if str(target.parent) else Path(".")

    lines = [f"# Ollama Modelfile written by alignvec-gguf {__version__} for {model.name}"]
    vectors = reader.field("alignvec.merged.vectors")
    if vectors:
        lambdas = reader.field("alignvec.merged.lambdas") or []
        mix = ", ".join(f"{_line(name)} λ={lam:g}" for name, lam in zip(vectors, lambdas, strict=False))
        lines.append(f"# base: {_line(reader.field('alignvec.merged.base', '?'))}; alignment: {mix}")
        lines.append(f"# requant: {_line(reader.field('alignvec.merged.requant', '?'))}")
    name = model.name.removesuffix(".gguf").lower().replace(" ", "-")
    lines.append(f"# use: ollama create {name} -f {target.name} && ollama run {name}")
    lines.append(f"FROM {_reference(model, directory)}")
    for adapter in adapters:
        lines.append(f"ADAPTER {_reference(Path(adapter), directory)}")
    for key, value in (parameters or {}).items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            lines.append(f"PARAMETER {key} {_value(item)}")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    with atomic_output(target) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target
