"""A GGUF model that may be split over several files (``NAME-00001-of-0000N.gguf``), read as one.

llama.cpp's ``gguf-split`` puts the model's metadata in the first shard, ``split.no`` / ``split.count``
/ ``split.tensors.count`` in every shard, and each tensor in exactly one shard. :class:`GGUFModel`
opens every shard, checks that they belong together, and offers the metadata of the first shard and
the tensors of all of them, in order.

It reads a model from its checked header (:func:`ggufheader.check_gguf`: one sequential walk, bounded
work) and a read-only memory map of the data, not through gguf-py's ``GGUFReader``: that one parses
every metadata item into numpy objects up front, which costs about 0.6 s for a 32k-token vocabulary
and 15 s for a 262k one, on every merge. Here a metadata item is decoded only when asked for, and a
merge copies the ones it keeps as raw bytes (:meth:`GGUFModel.raw_metadata`).
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType

from .errors import FormatError, InputError
from .ggufheader import INTEGER_TYPES, Header, KeyValue, TensorInfo, check_gguf, decode_value
from .identity import signature

SPLIT_PATTERN = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


def shard_paths(path: str | os.PathLike[str]) -> list[Path]:
    """All shards of the model that ``path`` belongs to (just ``[path]`` for an ordinary file)."""
    path = Path(path)
    m = SPLIT_PATTERN.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    if count < 1:
        raise InputError(f"{path.name}: a split model has at least one shard")
    return [path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def _split_field(shard: _Shard, key: str, what: str) -> int | None:
    """An integer ``split.*`` key, None if absent; a stranger's shard may hold anything there."""
    kv = shard.kv.get(key)
    if kv is None:
        return None
    if kv.vtype not in INTEGER_TYPES:
        found = kv.vtype.name
        if kv.vtype == GGUFValueType.ARRAY:
            found += " of " + GGUFValueType(int(np.frombuffer(shard.map, np.uint32, 1, kv.value_start)[0])).name
        raise FormatError(f"{what} {shard.path.name}: {key} is {found}, expected an integer; the shard is corrupt")
    return int(shard.value(kv))


class _Shard:
    """One file: its checked header, its metadata by key and a read-only memory map of all of it."""

    def __init__(self, path: Path, what: str):
        if not path.exists():
            raise InputError(f"{what} {path} does not exist")
        if not path.is_file():
            raise InputError(f"{what} {path} is not a file")
        self.path = path
        self.header: Header = check_gguf(path, what)
        self.kv: dict[str, KeyValue] = {kv.key: kv for kv in self.header.kv}
        self.map = np.memmap(path, dtype=np.uint8, mode="r")
        if self.map.size < max((t.offset + t.nbytes for t in self.header.tensors), default=0):
            raise FormatError(f"{what} {path} changed while it was being read; open it again once it is complete")

    def value(self, kv: KeyValue) -> Any:
        try:
            return decode_value(self.map[kv.value_start : kv.end].data, kv.vtype)
        except (struct.error, UnicodeDecodeError, ValueError):  # only if the file changed since the check
            raise FormatError(f"{self.path} changed while it was being read; open it again when complete") from None


_TYPED = {QT.F32: np.float32, QT.F16: np.float16}


@dataclass(frozen=True)
class ModelTensor:
    """One tensor of a (possibly split) model, with the memory map of the shard that holds its bytes."""

    info: TensorInfo
    map: np.memmap
    shard: int

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def shape(self) -> tuple[int, ...]:
        """Numpy order (outermost first), the reverse of ggml's ``ne``."""
        return tuple(reversed(self.info.ne))

    @property
    def tensor_type(self) -> QT:
        return self.info.tensor_type

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.info.ne))

    @property
    def n_bytes(self) -> int:
        return self.info.nbytes

    @property
    def data(self) -> np.ndarray:
        """Like gguf-py's ``ReaderTensor.data``: typed values for F32/F16, raw bytes for other types."""
        dtype = _TYPED.get(self.tensor_type)
        return self.raw() if dtype is None else self.raw().view(dtype)

    def raw(self) -> np.ndarray:
        """The stored bytes (a uint8 view of the shard's memory map)."""
        return self.map[self.info.offset : self.info.offset + self.info.nbytes]


class GGUFModel:
    """A model GGUF, single file or split; only ever read."""

    def __init__(self, path: str | os.PathLike[str], what: str = "base model"):
        self.path = Path(path)
        self.paths = shard_paths(self.path)
        missing = [p for p in self.paths if not p.is_file()]
        if missing and self.paths != [self.path]:
            raise InputError(
                f"{what} {self.path.name} is split into {len(self.paths)} files but {missing[0].name} is missing; "
                "keep all shards in one directory"
            )
        self.shards = [_Shard(p, what) for p in self.paths]
        first = self.shards[0]
        count = _split_field(first, "split.count", what)
        if count is not None and int(count) != len(self.paths):
            raise FormatError(
                f"{what} {self.paths[0].name} says split.count = {count} but {len(self.paths)} shard(s) were found; "
                "name shards NAME-00001-of-0000N.gguf as llama.cpp's gguf-split does"
            )
        for i, shard in enumerate(self.shards):
            no = _split_field(shard, "split.no", what)
            if len(self.shards) > 1 and (no is None or int(no) != i):
                raise FormatError(
                    f"{what} shard {self.paths[i].name} has split.no = {no}, expected {i}: the shards do not match"
                )
        self.tensors: list[ModelTensor] = [
            ModelTensor(info, shard.map, i) for i, shard in enumerate(self.shards) for info in shard.header.tensors
        ]
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise FormatError(f"{what} {self.path.name}: tensor {dup} appears twice; is a shard given twice?")
        total = _split_field(first, "split.tensors.count", what)
        if total is not None and int(total) != len(self.tensors):
            raise FormatError(
                f"{what} {self.path.name}: split.tensors.count = {total} but the shards hold {len(self.tensors)}"
            )

    @property
    def is_split(self) -> bool:
        return len(self.paths) > 1

    def keys(self) -> list[str]:
        """The metadata keys of the first shard (where gguf-split keeps the model's metadata), in file order."""
        return list(self.shards[0].kv)

    def field(self, key: str, default: Any = None) -> Any:
        """One metadata value of the first shard, decoded now (lists for arrays), or ``default``."""
        kv = self.shards[0].kv.get(key)
        return default if kv is None else self.shards[0].value(kv)

    def field_type(self, key: str) -> GGUFValueType | None:
        kv = self.shards[0].kv.get(key)
        return None if kv is None else kv.vtype

    def raw_metadata(self, leave_out: Iterable[str] = ()) -> tuple[int, bytes]:
        """The first shard's metadata items as stored (key, type and value bytes), all but ``leave_out``.

        Returns (how many items, their bytes): a writer puts them into another GGUF file unchanged.
        """
        skip = set(leave_out)
        shard = self.shards[0]
        kept = [kv for kv in shard.header.kv if kv.key not in skip]
        return len(kept), b"".join(bytes(shard.map[kv.start : kv.end]) for kv in kept)

    def __iter__(self) -> Iterator[ModelTensor]:
        return iter(self.tensors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape for t in self.tensors}

    def signature(self) -> str:
        """The layout signature (names and shapes) that alignment vectors are checked against."""
        return signature((t.name, t.shape) for t in self.tensors)

    def size(self) -> int:
        """Bytes on disk, all shards together."""
        return sum(p.stat().st_size for p in self.paths)
