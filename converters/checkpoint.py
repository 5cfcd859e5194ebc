"""Lazy, streaming access to a Hugging Face checkpoint directory (single or sharded).

Weights are read the way llama.cpp's converter finds them: ``model*.safetensors`` (with
``model.safetensors.index.json`` when sharded), else ``pytorch_model*.bin``. Safetensors shards are
opened memory-mapped and tensors are loaded one at a time; a shard is unmapped as soon as the caller
says it is done with it (:meth:`Checkpoint.release`), so memory holds a few tensors, never a model.
Pickle (``.bin``) checkpoints are refused unless ``allow_pickle`` is set, and then loaded with
``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from alignvec_gguf.errors import FormatError, InputError

log = logging.getLogger(__name__)

_FLOAT_DTYPES = {"F32", "F16", "BF16"}
_TORCH_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"


def _parts(path: Path, prefix: str, suffix: str) -> list[str]:
    """Weight files as llama.cpp's ``get_model_part_names`` finds them (top level, prefix*suffix)."""
    return sorted(p.name for p in path.iterdir() if p.name.startswith(prefix) and p.name.endswith(suffix))


class Checkpoint:
    """A local HF model directory: its ``config.json`` and its weights, read lazily one tensor at a time.

    ``source`` is what the AV records as this checkpoint's origin (a resolved path or a hub id with
    its commit); ``allow_pickle`` permits ``pytorch_model*.bin`` weights.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        role: str = "checkpoint",
        *,
        allow_pickle: bool = False,
        source: str | None = None,
    ):
        self.path = Path(path)
        self.role = role
        self.source = source or str(self.path.resolve())
        self.allow_pickle = allow_pickle
        if not self.path.exists():
            raise InputError(
                f"{role} {self.path} does not exist (give a local Hugging Face model directory or a hub id org/name)"
            )
        if not self.path.is_dir():
            raise InputError(f"{role} {self.path} is not a directory; give a Hugging Face model directory")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise InputError(f"{role} {self.path} has no config.json; is it a Hugging Face model directory?")
        try:
            self.config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise FormatError(f"{role} {config_file} is not valid JSON ({e})") from e
        self._handles: dict[str, Any] = {}
        self.pickle = False
        self._where = self._index()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, role={self.role!r}, tensors={len(self._where)})"

    def _read_index(self, name: str) -> dict[str, str]:
        try:
            weight_map = json.loads((self.path / name).read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{self.where} has an unreadable {name} ({e})") from e
        for shard in sorted(set(weight_map.values())):
            if not (self.path / shard).is_file():
                raise InputError(f"{self.where} is missing shard {shard} named in its {name}")
        return {str(k): str(v) for k, v in weight_map.items()}

    def _index(self) -> dict[str, str]:
        """Tensor name -> shard file name."""
        if (self.path / SAFETENSORS_INDEX).is_file():
            return self._read_index(SAFETENSORS_INDEX)
        shards = _parts(self.path, "model", ".safetensors")
        if not shards:
            pickles = _parts(self.path, "pytorch_model", ".bin")
            if not pickles and not (self.path / PICKLE_INDEX).is_file():
                raise InputError(f"{self.where} has no model*.safetensors weights")
            if not self.allow_pickle:
                raise InputError(
                    f"{self.where} has only pickle (.bin) weights, which can run code when loaded; pass "
                    "--allow-pickle to load them with torch.load(weights_only=True), or re-save with safetensors"
                )
            self.pickle = True
            if (self.path / PICKLE_INDEX).is_file():
                return self._read_index(PICKLE_INDEX)
            shards = pickles
        where: dict[str, str] = {}
        for shard in shards:
            for name in self._open(shard).keys():
                where[name] = shard
        return where

    @property
    def where(self) -> str:
        return f"{self.role} {self.path}"

    def _open(self, shard: str) -> Any:
        if shard not in self._handles:
            file = str(self.path / shard)
            try:
                if self.pickle:
                    self._handles[shard] = _load_pickle(file)
                else:
                    self._handles[shard] = safe_open(file, framework="pt")
            except Exception as e:
                kind = "pickle" if self.pickle else "safetensors"
                raise FormatError(f"{self.where}: {shard} is not a readable {kind} file ({e})") from e
        return self._handles[shard]

    def release(self, shard: str) -> None:
        """Unmap a shard the caller is done with (it is reopened if needed again)."""
        self._handles.pop(shard, None)

    def close(self) -> None:
        self._handles.clear()

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return str(archs[0]) if archs else str(self.config.get("model_type", "?"))

    def names(self) -> list[str]:
        """Tensor names, grouped by shard so that streaming touches one shard after another."""
        return sorted(self._where, key=lambda n: (self._where[n], n))

    def shard(self, name: str) -> str:
        return self._where[name]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._open(self._where[name])
        if self.pickle:
            return tuple(handle[name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The stored dtype as safetensors names it (F32, F16, BF16, I64, ...)."""
        handle = self._open(self._where[name])
        if self.pickle:
            dtype = handle[name].dtype
            return _TORCH_DTYPES.get(dtype, str(dtype))
        return str(handle.get_slice(name).get_dtype())

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor as stored (float32, float16 or bfloat16): a read-only view of the memory map when the
        format allows, so the caller must not modify it in place."""
        dtype = self.dtype(name)
        if dtype not in _FLOAT_DTYPES:
            raise FormatError(f"{self.where}: tensor {name} is {dtype}; only F32, F16 and BF16 are supported")
        try:
            handle = self._open(self._where[name])
            return handle[name] if self.pickle else handle.get_tensor(name)
        except Exception as e:
            raise FormatError(f"{self.where}: cannot read tensor {name} ({e}); is the file truncated?") from e


def _load_pickle(file: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        # the legacy (pre-zip) format cannot be memory-mapped: this shard is read whole
        log.warning("%s is in torch's legacy format and is loaded whole, not memory-mapped", file)
        state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FormatError(f"{file} is not a state dict of tensors")
    return state
