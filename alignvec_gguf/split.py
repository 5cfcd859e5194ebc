"""A GGUF model that may be split over several files (``NAME-00001-of-0000N.gguf``), read as one.

llama.cpp's ``gguf-split`` puts the model's metadata in the first shard, ``split.no`` / ``split.count``
/ ``split.tensors.count`` in every shard, and each tensor in exactly one shard. :class:`GGUFModel`
opens every shard (memory-mapped, validated by :func:`gguffile.open_gguf`), checks that they belong
together, and offers the metadata of the first shard and the tensors of all of them, in order.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, ReaderField, ReaderTensor

from .errors import FormatError, InputError
from .gguffile import INTEGER_TYPES, field, open_gguf, signature, tensor_bytes, tensor_shape


class _PlainReader(GGUFReader):
    """gguf-py's reader, slicing a plain ndarray view of the map instead of the ``np.memmap`` itself.

    gguf-py makes one small array per metadata item (32k-128k for a tokenizer); ``np.memmap`` slices
    carry extra attributes and a slow ``__array_finalize__``. Same values, about 2.5x less memory and
    time. Tensor data stays memory-mapped.
    """

    def _get(
        self, offset: int, dtype: Any, count: int = 1, override_order: Literal["I", "S", "<"] | None = None
    ) -> np.ndarray:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
        count = int(count)
        arr = plain[offset : offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


def _open(path: Path, what: str) -> GGUFReader:
    """:func:`gguffile.open_gguf` with :class:`_PlainReader`: the same checks and one-line errors."""
    return open_gguf(path, what, reader_class=_PlainReader)


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


def _split_field(reader: GGUFReader, key: str, what: str, path: Path) -> int | None:
    """An integer ``split.*`` key, None if absent; a stranger's shard may hold anything there."""
    f = reader.get_field(key)
    if f is None:
        return None
    if len(f.types) != 1 or f.types[0] not in INTEGER_TYPES:
        found = " of ".join(t.name for t in f.types)
        raise FormatError(f"{what} {path.name}: {key} is {found}, expected an integer; the shard is corrupt")
    return int(f.contents())


@dataclass(frozen=True)
class ModelTensor:
    """One tensor of a (possibly split) model, with the shard that holds its bytes."""

    tensor: ReaderTensor
    reader: GGUFReader
    shard: int

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def shape(self) -> tuple[int, ...]:
        """Numpy order (outermost first)."""
        return tensor_shape(self.tensor)

    @property
    def tensor_type(self) -> QT:
        return self.tensor.tensor_type

    @property
    def n_elements(self) -> int:
        return int(self.tensor.n_elements)

    @property
    def n_bytes(self) -> int:
        return int(self.tensor.n_bytes)

    @property
    def data(self) -> np.ndarray:
        """The tensor as gguf-py presents it (typed for float types, raw bytes for quantized ones)."""
        return self.tensor.data

    def raw(self) -> np.ndarray:
        """The stored bytes (a uint8 view of the shard's memory map)."""
        return tensor_bytes(self.reader, self.tensor)


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
        self.readers = [_open(p, what) for p in self.paths]
        first = self.readers[0]
        count = _split_field(first, "split.count", what, self.paths[0])
        if count is not None and int(count) != len(self.paths):
            raise FormatError(
                f"{what} {self.paths[0].name} says split.count = {count} but {len(self.paths)} shard(s) were found; "
                "name shards NAME-00001-of-0000N.gguf as llama.cpp's gguf-split does"
            )
        for i, reader in enumerate(self.readers):
            no = _split_field(reader, "split.no", what, self.paths[i])
            if len(self.readers) > 1 and (no is None or int(no) != i):
                raise FormatError(
                    f"{what} shard {self.paths[i].name} has split.no = {no}, expected {i}: the shards do not match"
                )
        self.tensors: list[ModelTensor] = [
            ModelTensor(t, reader, i) for i, reader in enumerate(self.readers) for t in reader.tensors
        ]
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise FormatError(f"{what} {self.path.name}: tensor {dup} appears twice; is a shard given twice?")
        total = _split_field(first, "split.tensors.count", what, self.paths[0])
        if total is not None and int(total) != len(self.tensors):
            raise FormatError(
                f"{what} {self.path.name}: split.tensors.count = {total} but the shards hold {len(self.tensors)}"
            )

    @property
    def is_split(self) -> bool:
        return len(self.paths) > 1

    @property
    def fields(self) -> dict[str, ReaderField]:
        """Metadata of the first shard (where gguf-split keeps the model's metadata)."""
        return self.readers[0].fields

    def field(self, key: str, default: Any = None) -> Any:
        return field(self.readers[0], key, default)

    def __iter__(self) -> Iterator[ModelTensor]:
        return iter(self.tensors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape for t in self.tensors}

    def signature(self) -> str:
        """The layout signature (names and shapes) that alignment vectors are checked against."""
        return signature((t.name, t.shape) for t in self.tensors)

    def drop_metadata(self) -> None:
        """Free the parsed metadata (gguf-py keeps one numpy view per array item: ~100 MB for a 32k vocabulary).

        Call it once the metadata has been copied; tensors stay readable, :meth:`field` then finds nothing.
        """
        for reader in self.readers:
            reader.fields.clear()

    def size(self) -> int:
        """Bytes on disk, all shards together."""
        return sum(p.stat().st_size for p in self.paths)
