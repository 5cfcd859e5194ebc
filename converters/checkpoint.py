"""Lazy, streaming access to a Hugging Face checkpoint directory (single or sharded safetensors).

Tensors are opened through safetensors' memory-mapped ``safe_open`` and loaded one at a time,
so memory holds a few tensors, never a model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from alignvec_gguf.errors import FormatError, InputError

_FLOAT_DTYPES = {"F32", "F16", "BF16"}


class Checkpoint:
    """A local HF model directory: its ``config.json`` and its safetensors tensors, read lazily."""

    def __init__(self, path: str | os.PathLike[str], role: str = "checkpoint"):
        self.path = Path(path)
        self.role = role
        if not self.path.exists():
            raise InputError(f"{role} {self.path} does not exist (give a local Hugging Face model directory)")
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
        self._where = self._index()

    def _index(self) -> dict[str, str]:
        """Tensor name -> shard file name."""
        index_file = self.path / "model.safetensors.index.json"
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise FormatError(f"{role_path(self)} has an unreadable model.safetensors.index.json ({e})") from e
            for shard in sorted(set(weight_map.values())):
                if not (self.path / shard).is_file():
                    raise InputError(f"{role_path(self)} is missing shard {shard} named in its index")
            return dict(weight_map)
        shards = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not shards:
            if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
                raise InputError(
                    f"{role_path(self)} has only pickle (.bin) weights; re-save it with safetensors "
                    "(model.save_pretrained(dir, safe_serialization=True))"
                )
            raise InputError(f"{role_path(self)} has no *.safetensors weights")
        where: dict[str, str] = {}
        for shard in shards:
            for name in self._open(shard).keys():
                where[name] = shard
        return where

    def _open(self, shard: str) -> Any:
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(self.path / shard), framework="pt")
            except Exception as e:
                raise FormatError(f"{role_path(self)}: {shard} is not a readable safetensors file ({e})") from e
        return self._handles[shard]

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return str(archs[0]) if archs else str(self.config.get("model_type", "?"))

    def names(self) -> list[str]:
        """Tensor names, grouped by shard so that streaming touches one shard after another."""
        return sorted(self._where, key=lambda n: (self._where[n], n))

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._where[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return str(self._open(self._where[name]).get_slice(name).get_dtype())

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, loaded now, as float32."""
        dtype = self.dtype(name)
        if dtype not in _FLOAT_DTYPES:
            raise FormatError(f"{role_path(self)}: tensor {name} is {dtype}; only F32, F16 and BF16 are supported")
        try:
            return self._open(self._where[name]).get_tensor(name).to(torch.float32)
        except Exception as e:
            raise FormatError(f"{role_path(self)}: cannot read tensor {name} ({e}); is the file truncated?") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def role_path(ckpt: Checkpoint) -> str:
    return f"{ckpt.role} {ckpt.path}"
