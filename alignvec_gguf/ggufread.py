"""Reading GGUF files: one file, or a model split over several (``NAME-00001-of-0000N.gguf``) read as one.

llama.cpp's ``gguf-split`` puts the model's metadata in the first shard, ``split.no`` / ``split.count``
/ ``split.tensors.count`` in every shard, and each tensor in exactly one shard. :class:`GGUFModel`
opens every shard, checks that they belong together, and offers the metadata of the first shard and
the tensors of all of them, in order.

It reads a model from its checked header (:func:`ggufheader.check_gguf`: one sequential walk, bounded
work) and a read-only memory map of the data, not through gguf-py's ``GGUFReader``: that one parses
every metadata item into numpy objects up front, which costs about 0.6 s for a 32k-token vocabulary
and 15 s for a 262k one, on every merge. Here a metadata item is decoded only when asked for, and a
merge copies the ones it keeps as raw bytes (:meth:`GGUFModel.raw_metadata`).

It is the one reader of every GGUF the package opens: models (split or not), alignment vectors
(:mod:`avfile`), importance matrices (:mod:`imatrix`), ``alignvec inspect`` (:mod:`inspect`), live knobs
and exports. AVs and imatrices are single files: ``GGUFModel(path, what, split=False)`` (or
:func:`open_file`) opens exactly the file named, whatever its name. Whether the path is a file, and
whether the file changed between the header check and the memory map, is checked here, once.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
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
        found = " of ".join(t.name for t in shard.value_types(kv))
        raise FormatError(f"{what} {shard.path.name}: {key} is {found}, expected an integer; the shard is corrupt")
    return int(shard.value(kv))


def check_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a Path if it names an existing regular file; else an :class:`InputError` naming it."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    if not path.is_file():
        raise InputError(f"{what} {path} is not a file")
    return path


class _Shard:
    """One file: its checked header, its metadata by key and a read-only memory map of all of it."""

    def __init__(self, path: Path, what: str):
        self.path = check_file(path, what)
        self.what = what
        self.header: Header = check_gguf(path, what)
        self.kv: dict[str, KeyValue] = {kv.key: kv for kv in self.header.kv}
        self.map = np.memmap(path, dtype=np.uint8, mode="r")
        ends = [kv.end for kv in self.header.kv] + [t.offset + t.nbytes for t in self.header.tensors]
        if self.map.size < max(ends, default=0):  # it shrank between the check and the map
            raise self._changed()

    def _changed(self) -> FormatError:
        return FormatError(
            f"{self.what} {self.path} changed while it was being read; open it again once it is complete"
        )

    def value_types(self, kv: KeyValue) -> tuple[GGUFValueType, ...]:
        """``(type,)`` for a scalar or string, ``(ARRAY, item type)`` for an array (as gguf-py's ``types``)."""
        if kv.vtype != GGUFValueType.ARRAY:
            return (kv.vtype,)
        try:
            return (kv.vtype, GGUFValueType(int(np.frombuffer(self.map, np.uint32, 1, kv.value_start)[0])))
        except ValueError:  # only if the file changed since the check
            raise self._changed() from None

    def array_length(self, kv: KeyValue) -> int:
        return int(np.frombuffer(self.map, np.uint64, 1, kv.value_start + 4)[0])

    def value(self, kv: KeyValue) -> Any:
        try:
            return decode_value(self.map[kv.value_start : kv.end].data, kv.vtype)
        except (struct.error, UnicodeDecodeError, ValueError):  # only if the file changed since the check
            raise self._changed() from None


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
        return math.prod(self.info.ne)

    @property
    def n_bytes(self) -> int:
        return self.info.nbytes

    @property
    def offset(self) -> int:
        """Where the tensor's bytes start in its shard's file."""
        return self.info.offset

    def raw(self) -> np.ndarray:
        """The stored bytes (a uint8 view of the shard's memory map, no copy; made once, then reused)."""
        return self._raw

    @cached_property
    def _raw(self) -> np.ndarray:
        return self.map[self.info.offset : self.info.offset + self.info.nbytes]

    def values(self) -> np.ndarray:
        """The stored values of an F32 or F16 tensor, a typed view in numpy-order shape (no copy).

        Other types are blocks or bit patterns, not numbers numpy can hold: read them with :meth:`raw`
        and decode them with :func:`alignvec_gguf.ggml.dequantize`.
        """
        dtype = _TYPED.get(self.tensor_type)
        if dtype is None:
            raise ValueError(f"tensor {self.name} is {self.tensor_type.name}; only F32 and F16 have a typed view")
        return self.raw().view(dtype).reshape(self.shape)


class GGUFModel:
    """A GGUF file, or a model split over several files, read as one; only ever read.

    ``what`` names the file in error messages (``"base model"``, ``"alignment vector"``...). With
    ``split=False`` exactly the file named is opened and its ``split.*`` keys are plain metadata (an AV,
    an imatrix, or ``alignvec inspect`` of one shard).
    """

    def __init__(self, path: str | os.PathLike[str], what: str = "base model", *, split: bool = True):
        self.path = Path(path)
        self.what = what
        self.paths = shard_paths(self.path) if split else [self.path]
        missing = [p for p in self.paths if not p.is_file()]
        if missing and self.paths != [self.path]:
            raise InputError(
                f"{what} {self.path.name} is split into {len(self.paths)} files but {missing[0].name} is missing; "
                "keep all shards in one directory"
            )
        self.shards = [_Shard(p, what) for p in self.paths]
        self.tensors: list[ModelTensor] = [
            ModelTensor(info, shard.map, i) for i, shard in enumerate(self.shards) for info in shard.header.tensors
        ]
        self._by_name = {t.name: t for t in self.tensors}
        if split:
            self._check_split(what)

    def _check_split(self, what: str) -> None:
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
        if len(self._by_name) != len(self.tensors):
            names = [t.name for t in self.tensors]
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
        """The value type of a metadata key (``ARRAY`` for any array), or None if it is absent."""
        kv = self.shards[0].kv.get(key)
        return None if kv is None else kv.vtype

    def field_types(self, key: str) -> tuple[GGUFValueType, ...] | None:
        """``(type,)``, or ``(ARRAY, item type)`` for an array, without decoding the value; None if absent."""
        kv = self.shards[0].kv.get(key)
        return None if kv is None else self.shards[0].value_types(kv)

    def field_length(self, key: str) -> int | None:
        """How many items an array holds, without decoding them; None if the key is absent or not an array."""
        kv = self.shards[0].kv.get(key)
        if kv is None or kv.vtype != GGUFValueType.ARRAY:
            return None
        return self.shards[0].array_length(kv)

    def tensor(self, name: str) -> ModelTensor:
        """The tensor called ``name`` (KeyError if there is none)."""
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        """Whether the model has a tensor called ``name``."""
        return name in self._by_name

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


def open_file(path: str | os.PathLike[str], what: str = "GGUF file") -> GGUFModel:
    """Open exactly one GGUF file (no shard lookup; ``split.*`` keys are plain metadata), checked and mapped."""
    return GGUFModel(path, what, split=False)
