"""What a GGUF file holds, as a JSON-ready dict: the library side of ``alignvec inspect``."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from .ggufread import GGUFModel

MAX_LISTED = 16  # longer arrays are summarized by their length


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Metadata and tensor summary of one model or AV GGUF file (a shard of a split model: that shard).

    Every metadata item but the tokenizer's vocabulary (``tokenizer.ggml.*``) is listed with its value;
    an array of more than :data:`MAX_LISTED` items as ``"[N items]"``, without decoding it. Then
    ``kind`` (``alignment_vector`` or ``model``), the tensor count, the count per tensor type and every
    tensor's type and numpy-order shape.
    """
    model = GGUFModel(path, "file", split=False)
    meta: dict[str, Any] = {"path": str(path), "size_bytes": Path(path).stat().st_size}
    for key in model.keys():
        if key.startswith("tokenizer.ggml."):
            continue
        n = model.field_length(key)
        meta[key] = f"[{n} items]" if n is not None and n > MAX_LISTED else model.field(key)
    meta["kind"] = "alignment_vector" if model.field_type("alignvec.format_version") is not None else "model"
    meta["tensor_count"] = len(model.tensors)
    meta["tensor_types"] = dict(Counter(t.tensor_type.name for t in model.tensors))
    meta["tensors"] = {t.name: {"type": t.tensor_type.name, "shape": list(t.shape)} for t in model.tensors}
    return meta
