"""Fuzzing the file readers with hostile GGUF models and alignment vectors: nothing but AlignVecError may escape.

Users open GGUF models and AV files from strangers. This generates mutants of small valid files
(byte flips, truncation, inserted and deleted bytes, duplicated chunks, header fields set to
interesting values: counts, lengths, value and tensor types, dims, offsets; NaN and infinity in
tensor data) and random bytes, and runs each through one of two targets:

- ``gguf``: a mutated base model (or AV, or noise) through ``open_gguf``, ``alignvec inspect``'s
  :func:`describe`, :class:`GGUFModel`, and when it still opens as a model, a merge plan with a
  valid vector (every check of ``alignvec merge`` before writing) and then the merge itself;
- ``av``: a mutated vector (full F32, full Q8_0 or low-rank F16) through :class:`AlignmentVector`,
  the merge's compatibility checks against the tiny base, every delta (and the low-rank factors),
  and when it passes everything, a merge into a temporary directory.
  (``--merge-every N`` merges only every Nth input that passes.)

Each input runs in a worker subprocess: a segfault or abort counts as a crash (the worker is
restarted and the run goes on), an input past ``--timeout`` seconds as a hang, an allocation
past the worker's 4 GiB address-space limit as an escaped MemoryError. Outcomes: ``ok`` (the
file passed every check), ``rejected`` (an AlignVecError: the wanted failure), ``escaped`` (any
other exception: a bug), ``crash``, ``hang``.

The mutation engine is also used by tests/test_fuzz.py with hypothesis as the source of choices.

``--atheris RUNS`` adds coverage-guided fuzzing (atheris, i.e. libFuzzer; ``pip install atheris``):
libFuzzer mutates the seed files, keeps what reaches new code, and runs each input through both
targets in a child process until RUNS inputs or the first escape, crash or hang (kept under the work
directory's ``findings/``). Its counts are added to the totals and reported under ``"atheris"``.

Usage: python benchmarks/fuzz.py [--cases N] [--seed S] [--timeout SECONDS] [--workdir DIR] [--atheris RUNS]
Default 10,000 cases, each that passes every check also merged: about 25 s on this 2-core machine
(100,000 with --merge-every 3: about 4 minutes; --atheris 20000 adds about 3 minutes). The last line
is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from alignvec_gguf.avfile import AVInfo, LoraStats, write_av, write_lowrank_av
from alignvec_gguf.errors import AlignVecError
from alignvec_gguf.identity import Fingerprint, signature
from tests.support import REPO

ARCH = "llama"
# The tiny base: (name, numpy shape, storage). Q8_0 rows are 32-value blocks; token_embd stays F32.
BASE_TENSORS: list[tuple[str, tuple[int, ...], str]] = [
    ("token_embd.weight", (16, 32), "f32"),
    ("blk.0.attn_norm.weight", (32,), "f32"),
    ("blk.0.attn_q.weight", (32, 32), "q8_0"),
    ("blk.0.ffn_up.weight", (64, 32), "f16"),
    ("output_norm.weight", (32,), "f32"),
]
TARGETS = ("gguf", "av")


class Chooser(Protocol):
    """Where mutations get their choices: ``random.Random``, or hypothesis draws in tests/test_fuzz.py."""

    def randrange(self, stop: int) -> int: ...

    def choice(self, seq: Any) -> Any: ...

    def randbytes(self, n: int) -> bytes: ...


@dataclass(frozen=True)
class Slot:
    """A header field in a valid file: where it is, how wide, and what it means."""

    offset: int
    size: int
    kind: str  # count, strlen, vtype, atype, alen, ndims, dim, ttype, toffset, scalar


@dataclass(frozen=True)
class Seed:
    """A valid file to mutate, with its header fields and where its sections end."""

    name: str
    data: bytes
    slots: tuple[Slot, ...]
    boundaries: tuple[int, ...]  # ends of: magic, version, counts, each KV, each tensor info; padding; data
    data_offset: int


def layout(path: Path) -> tuple[tuple[Slot, ...], tuple[int, ...], int]:
    """The header fields and section ends of a valid GGUF file, from gguf-py's parse of it."""
    reader = GGUFReader(path)
    slots = [Slot(4, 4, "version"), Slot(8, 8, "count"), Slot(16, 8, "count")]
    bounds = [4, 8, 24]
    for f in reader.fields.values():
        if f.name.startswith("GGUF."):
            continue
        pos = f.offset
        kinds = ["strlen", "key", "vtype"]
        if f.types[0] == GGUFValueType.STRING:
            kinds += ["strlen", "str"]
        elif f.types[0] == GGUFValueType.ARRAY:
            kinds += ["atype", "alen"]
            kinds += ["strlen", "str"] * ((len(f.parts) - 5) // 2) if f.types[-1] == GGUFValueType.STRING else []
            kinds += ["scalar"] * (len(f.parts) - len(kinds))
        else:
            kinds += ["scalar"]
        for part, kind in zip(f.parts, kinds, strict=True):
            if kind not in ("key", "str"):
                slots.append(Slot(pos, part.nbytes, kind))
            pos += part.nbytes
        bounds.append(pos)
    for t in reader.tensors:
        pos = t.field.offset
        for part, kind in zip(t.field.parts, ("strlen", "name", "ndims", "dim", "ttype", "toffset"), strict=True):
            if kind == "dim":
                slots += [Slot(pos + 8 * i, 8, "dim") for i in range(len(part))]
            elif kind != "name":
                slots.append(Slot(pos, part.nbytes, kind))
            pos += part.nbytes
        bounds.append(pos)
    bounds.append(reader.data_offset)
    return tuple(slots), tuple(bounds), reader.data_offset


def _write_base(path: Path) -> None:
    from gguf import GGMLQuantizationType as QT
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    w = GGUFWriter(path, ARCH)
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_key_value("tokenizer.ggml.tokens", ["<s>", "a", "b", "ab"], GGUFValueType.ARRAY, GGUFValueType.STRING)
    w.add_key_value("tokenizer.ggml.scores", [0.0, -1.0, -2.0, -3.0], GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    for name, shape, storage in BASE_TENSORS:
        values = rng.standard_normal(shape).astype(np.float32)
        if storage == "q8_0":
            w.add_tensor(name, quantize(values, QT.Q8_0), raw_dtype=QT.Q8_0)
        else:
            w.add_tensor(name, values.astype(np.float16) if storage == "f16" else values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _fingerprint(base: Path) -> str:
    from gguf.quants import dequantize

    fp = Fingerprint()
    for t in GGUFReader(base).tensors:
        fp.add(t.name, dequantize(np.asarray(t.data), t.tensor_type))
    return fp.hexdigest()


def make_seeds(root: Path) -> dict[str, Seed]:
    """The tiny base model and three vectors for it (full F32, full Q8_0, low-rank), written and mapped."""
    root.mkdir(parents=True, exist_ok=True)
    base = root / "base.gguf"
    _write_base(base)
    rng = np.random.default_rng(1)
    info = AVInfo(
        ARCH,
        "fuzz",
        "seed vector",
        "medical",
        "base",
        "aligned",
        signature((n, s) for n, s, _ in BASE_TENSORS),
        _fingerprint(base),
        producer="fuzz",
    )
    deltas = [(n, (rng.standard_normal(s) * 0.01).astype(np.float32)) for n, s, _ in BASE_TENSORS]
    write_av(root / "full.avec.gguf", ARCH, deltas, info)
    write_av(root / "q8.avec.gguf", ARCH, deltas, info, dtype="q8_0")
    factors = [
        (n, rng.standard_normal((4, s[1])).astype(np.float32), rng.standard_normal((s[0], 4)).astype(np.float32))
        for n, s, _ in BASE_TENSORS
        if len(s) == 2
    ]
    stats = LoraStats(
        rank=4,
        energy=0.0,
        rel_error=0.1,
        dropped=("blk.0.attn_norm.weight",),
        dropped_norm=(0.5,),
        dropped_rel_change=(float("nan"),),
        dropped_energy=0.01,
    )
    write_lowrank_av(root / "lora.avec.gguf", ARCH, factors, info, stats, alpha=4.0, dtype="f16")
    seeds = {}
    for path in (base, root / "full.avec.gguf", root / "q8.avec.gguf", root / "lora.avec.gguf"):
        slots, bounds, data_offset = layout(path)
        seeds[path.name] = Seed(path.name, path.read_bytes(), slots, bounds, data_offset)
    return seeds


# Values that break parsers: zero, one, powers of two and their neighbours, all ones, sign bits.
INTERESTING = (
    0,
    1,
    2,
    3,
    4,
    5,
    7,
    8,
    13,
    31,
    32,
    33,
    63,
    64,
    255,
    256,
    1 << 15,
    1 << 16,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    1 << 40,
    1 << 50,
    1 << 62,
    (1 << 63) - 1,
    1 << 63,
    (1 << 64) - 1,
)
FLOATS = (float("nan"), float("inf"), float("-inf"), 3.4e38, -0.0, 1e-45)


def _set_slot(data: bytearray, slot: Slot, r: Chooser) -> None:
    old = int.from_bytes(data[slot.offset : slot.offset + slot.size], "little")
    mask = (1 << (8 * slot.size)) - 1
    value = r.choice((*INTERESTING, old + 1, old - 1, old * 2, old + 32, old ^ (1 << r.randrange(8 * slot.size))))
    data[slot.offset : slot.offset + slot.size] = (value & mask).to_bytes(slot.size, "little")


def mutate(seed: Seed, r: Chooser, max_steps: int = 3) -> bytes:
    """One mutant of ``seed``: 1 to ``max_steps`` mutations, chosen by ``r``."""
    data = bytearray(seed.data)
    header = seed.data_offset
    for _ in range(1 + r.randrange(max_steps)):
        op = r.choice(("slot", "slot", "slot", "flip", "truncate", "insert", "delete", "duplicate", "float"))
        n = len(data)
        if n == 0:
            break
        if op == "slot" and seed.slots:
            slot = r.choice(seed.slots)
            if slot.offset + slot.size <= n:
                _set_slot(data, slot, r)
        elif op == "flip":
            for _ in range(1 + r.randrange(4)):
                pos = r.randrange(min(n, header)) if r.randrange(4) else r.randrange(n)
                data[pos] ^= 1 << r.randrange(8)
        elif op == "truncate":
            cut = r.choice(seed.boundaries) if r.randrange(2) else r.randrange(n)
            cut = min(n, cut + r.choice((-1, 0, 0, 1)))
            del data[max(cut, 0) :]
        elif op == "insert":
            pos = r.randrange(n)
            data[pos:pos] = r.randbytes(1 + r.randrange(16))
        elif op == "delete":
            pos = r.randrange(n)
            del data[pos : pos + 1 + r.randrange(16)]
        elif op == "duplicate":  # a copy of a KV or tensor info elsewhere in the header: duplicate keys and names
            i = r.randrange(len(seed.boundaries) - 1)
            start, end = seed.boundaries[i], seed.boundaries[i + 1]
            pos = r.choice(seed.boundaries)
            if end <= n and pos <= n:
                data[pos:pos] = data[start:end]
        elif op == "float" and n > header + 4:
            pos = header + 4 * r.randrange((n - header) // 4)
            data[pos : pos + 4] = struct.pack("<f", r.choice(FLOATS))
    return bytes(data)


# --- logical mutations: a well-formed file whose content is hostile (types, shapes, names, values) ---

KV = tuple[str, GGUFValueType, Any, "GGUFValueType | None"]  # key, type, value, item type of an array
Tensor = tuple[str, int, tuple[int, ...], bytes]  # name, ggml type id, ne (ggml order), data
_PACK = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
# Keys the readers look at: where a wrong type or value matters.
KEYS = (
    "general.type",
    "general.architecture",
    "general.alignment",
    "adapter.type",
    "adapter.lora.alpha",
    "alignvec.format_version",
    "alignvec.form",
    "alignvec.name",
    "alignvec.base.signature",
    "alignvec.lora.rank",
    "alignvec.lora.dropped",
    "alignvec.lora.dropped_norm",
    "alignvec.lora.rel_error",
    "split.count",
    "split.no",
    "split.tensors.count",
    "llama.context_length",
)
STRINGS = ("", "adapter", "alignment_vector", "lora", "full", "llama", "qwen2", "model", "\u00e9\u4e2d", "x" * 300)


def read_logical(data: bytes, root: Path) -> tuple[list[KV], list[Tensor]]:
    """The metadata and tensors of a valid GGUF file, as plain values."""
    path = root / "logical.gguf"
    path.write_bytes(data)
    reader = GGUFReader(path)
    kvs: list[KV] = []
    for f in reader.fields.values():
        if not f.name.startswith("GGUF."):
            item = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
            kvs.append((f.name, f.types[0], f.contents(), item))
    tensors = [
        (t.name, int(t.tensor_type), tuple(int(d) for d in t.shape), bytes(np.asarray(t.data).tobytes()))
        for t in reader.tensors
    ]
    return kvs, tensors


def _pack(vtype: GGUFValueType, value: Any, item: GGUFValueType | None) -> bytes:
    if vtype == GGUFValueType.STRING:
        raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else bytes(value)
        return struct.pack("<Q", len(raw)) + raw
    if vtype == GGUFValueType.ARRAY:
        assert item is not None
        return struct.pack("<IQ", item, len(value)) + b"".join(_pack(item, v, None) for v in value)
    return struct.pack("<" + _PACK[vtype], value)


def serialize(kvs: list[KV], tensors: list[Tensor], alignment: int = 32) -> bytes:
    """A GGUF v3 file: header, metadata, tensor infos, then each tensor's data at the next aligned offset."""
    out = bytearray(struct.pack("<IIQQ", 0x46554747, 3, len(tensors), len(kvs)))
    for key, vtype, value, item in kvs:
        out += _pack(GGUFValueType.STRING, key, None) + struct.pack("<I", vtype) + _pack(vtype, value, item)
    offsets, offset = [], 0
    for _, _, _, data in tensors:
        offsets.append(offset)
        offset += -(-len(data) // alignment) * alignment
    for (name, qtype, ne, _), off in zip(tensors, offsets, strict=True):
        out += _pack(GGUFValueType.STRING, name, None) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, qtype, off)
    out += bytes(-len(out) % alignment)
    for _, _, _, data in tensors:
        out += bytes(-len(out) % alignment) + data
    return bytes(out)


def _random_value(r: Chooser) -> tuple[GGUFValueType, Any, GGUFValueType | None]:
    vtype = r.choice(tuple(GGUFValueType))
    if vtype == GGUFValueType.ARRAY:
        item = r.choice((GGUFValueType.STRING, GGUFValueType.FLOAT32, GGUFValueType.UINT32, GGUFValueType.INT8))
        return vtype, [_random_value_of(item, r) for _ in range(1 + r.randrange(3))], item
    return vtype, _random_value_of(vtype, r), None


def _random_value_of(vtype: GGUFValueType, r: Chooser) -> Any:
    if vtype == GGUFValueType.STRING:
        return r.choice(STRINGS)
    if vtype == GGUFValueType.BOOL:
        return bool(r.randrange(2))
    fmt = _PACK[vtype]
    if fmt in "fd":
        return r.choice((*FLOATS, 0.0, 1.0, -1.0, 4.0, 1e300 if fmt == "d" else 1e30))
    bits = 8 * struct.calcsize(fmt)
    value = r.choice(INTERESTING) % (1 << bits)
    return value - (1 << bits) if fmt.islower() and value >= 1 << (bits - 1) else value


def _tensor_data(qtype: int, ne: tuple[int, ...], r: Chooser) -> bytes:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    n = int(np.prod(ne)) // block * size
    fill = r.choice(("zeros", "random", "nan"))
    if fill == "random" or n % 4:
        return r.randbytes(n) if n < 1 << 16 else bytes(n)
    return (np.full(n // 4, np.nan if fill == "nan" else 0.0, dtype=np.float32)).tobytes()


def mutate_logical(seed: Seed, root: Path, r: Chooser) -> bytes:
    """A well-formed file with one piece of content changed: a value's type or value, a tensor's type, shape or name."""
    from gguf import GGML_QUANT_SIZES

    kvs, tensors = read_logical(seed.data, root)
    op = r.choice(("kv_type", "kv_value", "kv_drop", "kv_add", "t_type", "t_shape", "t_name", "t_drop", "t_dup"))
    if op.startswith("kv") and kvs:
        i = r.randrange(len(kvs))
        key, vtype, value, item = kvs[i]
        if op == "kv_type":
            kvs[i] = (key, *_random_value(r))
        elif op == "kv_value":
            vt = item if vtype == GGUFValueType.ARRAY else vtype
            assert vt is not None
            v = _random_value_of(vt, r)
            kvs[i] = (key, vtype, [v] * (1 + r.randrange(3)) if vtype == GGUFValueType.ARRAY else v, item)
        elif op == "kv_drop":
            del kvs[i]
        else:
            key = r.choice(KEYS)
            kvs = [kv for kv in kvs if kv[0] != key] + [(key, *_random_value(r))]
    elif tensors:
        i = r.randrange(len(tensors))
        name, qtype, ne, data = tensors[i]
        if op == "t_type":
            qtype = int(r.choice(sorted(GGML_QUANT_SIZES)))
            block = GGML_QUANT_SIZES[qtype][0]  # type: ignore[index]
            ne = (-(-ne[0] // block) * block, *ne[1:]) if r.randrange(4) else ne
            if ne[0] % block == 0:
                tensors[i] = (name, qtype, ne, _tensor_data(qtype, ne, r))
        elif op == "t_shape":
            ne = r.choice(
                (
                    ne[::-1],
                    ne[:1],
                    (*ne, 1),
                    (ne[0], 1 + r.randrange(70)),
                    (1 + r.randrange(70), *ne[1:]),
                    (ne[0], 2, 2, 2),
                    (ne[0], *ne[1:], 3),
                )
            )
            if ne[0] % GGML_QUANT_SIZES[qtype][0] == 0:  # type: ignore[index]
                tensors[i] = (name, qtype, ne, _tensor_data(qtype, ne, r))
        elif op == "t_name":
            other = r.choice([t[0] for t in tensors])
            new = r.choice(
                (
                    name.removesuffix(".lora_a"),
                    name + ".lora_b",
                    name.replace(".lora_a", ".lora_b"),
                    other.split(".lora")[0] + ".lora_a",
                    "blk.9.attn_q.weight",
                    ".lora_a",
                    "x",
                )
            )
            if new not in {t[0] for t in tensors}:
                tensors[i] = (new, qtype, ne, data)
        elif op == "t_drop":
            del tensors[i]
        else:
            new = r.choice(
                ("blk.0.attn_q.weight", "blk.0.attn_q.weight.lora_b", "output.weight", "blk.1.ffn_up.weight")
            )
            if new not in {t[0] for t in tensors}:
                tensors.append((new, qtype, ne, data))
    return serialize(kvs, tensors)


def noise(r: Chooser) -> bytes:
    """Random bytes, often behind a valid magic and version so that they reach the counts."""
    head = r.choice((b"", b"GGUF", b"GGUF\x03\x00\x00\x00", b"GGUF\x02\x00\x00\x00"))
    return head + r.randbytes(r.randrange(256))


def make_case(target: str, seeds: dict[str, Seed], root: Path, r: Chooser) -> bytes:
    """One input for ``target``: a byte-level mutant (60%), a logical mutant (30%) or noise (10%)."""
    pick = r.randrange(10)
    if pick == 0:
        return noise(r)
    if target == "gguf":
        seed = seeds["base.gguf"] if r.randrange(4) else seeds[r.choice(sorted(seeds))]
    else:
        seed = seeds[r.choice(("full.avec.gguf", "q8.avec.gguf", "lora.avec.gguf"))]
    return mutate_logical(seed, root, r) if pick < 4 else mutate(seed, r)


class Runner:
    """Runs the targets in this process (the worker, and tests/test_fuzz.py)."""

    def __init__(self, root: Path):
        """``root`` holds the seeds written by :func:`make_seeds`."""
        self.root = root
        self.base = root / "base.gguf"
        self.good_av = root / "full.avec.gguf"
        self.merges = 0

    def gguf(self, path: Path, merge_too: bool) -> None:
        from alignvec_gguf.cli import describe
        from alignvec_gguf.gguffile import open_gguf
        from alignvec_gguf.ggufread import GGUFModel
        from alignvec_gguf.merge import MergePlan

        reader = open_gguf(path)
        for t in reader.tensors:
            np.asarray(t.data).tobytes()
        describe(str(path))
        model = GGUFModel(path)
        if model.field("general.type") == "adapter":
            return
        MergePlan(path, {str(self.good_av): 0.5})
        if merge_too:
            self._merge(path, self.good_av)

    def av(self, path: Path, merge_too: bool) -> None:
        from alignvec_gguf.avfile import AlignmentVector
        from alignvec_gguf.ggufread import GGUFModel
        from alignvec_gguf.merge import check_compatible

        av = AlignmentVector(path)
        check_compatible(GGUFModel(self.base), self.base, [(av, 0.5)])
        for name in av.names:
            av.delta(name)
            if av.lora is not None:
                av.factors(name)
        av.check_finite()
        if merge_too:
            self._merge(self.base, path)

    def _merge(self, base: Path, av: Path) -> None:
        from alignvec_gguf.merge import merge

        out = self.root / "merged.gguf"
        self.merges += 1
        try:
            merge(base, {str(av): 0.5}, out, threads=1)
        finally:
            out.unlink(missing_ok=True)

    def run(self, target: str, path: Path, merge_too: bool = True) -> tuple[str, str]:
        """(outcome, detail): ok, rejected (an AlignVecError) or escaped (anything else, with its traceback)."""
        try:
            getattr(self, target)(path, merge_too)
        except AlignVecError as e:
            return "rejected", f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 (what we are looking for)
            tb = traceback.extract_tb(e.__traceback__)[-1]
            return "escaped", f"{type(e).__name__}: {str(e)[:200]} (at {Path(tb.filename).name}:{tb.lineno})"
        return "ok", ""


def _child_env() -> dict[str, str]:
    """This environment with the repository root first on ``PYTHONPATH``: a child runs ``-m tests.support.fuzzing``
    from any directory."""
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def worker(root: Path) -> None:
    """Read ``TARGET<TAB>PATH<TAB>MERGE`` lines, run them, answer one JSON line each."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    runner = Runner(root)
    for line in sys.stdin:
        target, path, merge_too = line.rstrip("\n").split("\t")
        outcome, detail = runner.run(target, Path(path), merge_too == "1")
        print(json.dumps({"outcome": outcome, "detail": detail}), flush=True)


class WorkerProcess:
    def __init__(self, root: Path):
        self.root = root
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> subprocess.Popen[str]:
        if self.proc is None or self.proc.poll() is not None:
            env = {**_child_env(), "OMP_NUM_THREADS": "1"}
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.fuzzing", "--worker", str(self.root)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=env,
            )
        return self.proc

    def run(self, target: str, path: Path, merge_too: bool, timeout: float) -> tuple[str, str]:
        proc = self.start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(f"{target}\t{path}\t{int(merge_too)}\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            self.stop()
            return "hang", f"no answer in {timeout:g} s"
        line = proc.stdout.readline()
        if not line:
            code = proc.wait()
            self.proc = None
            return "crash", f"worker exited with {code}" + (f" (signal {-code})" if code < 0 else "")
        answer = json.loads(line)
        return answer["outcome"], answer["detail"]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def atheris_worker(root: Path, libfuzzer_args: list[str]) -> None:
    """Coverage-guided fuzzing with atheris (libFuzzer): each input, a mutation of the seed files that
    libFuzzer chooses by the coverage it gains, runs through both targets; an escape is raised so that
    libFuzzer reports it and keeps the input. Never returns (libFuzzer exits the process)."""
    import atheris

    atheris.instrument_all()  # alignvec_gguf is already imported; this instruments what is loaded
    runner = Runner(root)
    paths = {t: root / f"atheris-{t}.gguf" for t in TARGETS}

    def one(data: bytes) -> None:
        for target in TARGETS:
            paths[target].write_bytes(data)
            outcome, detail = runner.run(target, paths[target], merge_too=False)
            if outcome == "escaped":
                raise RuntimeError(f"escaped from the {target} target: {detail}")

    atheris.Setup([sys.argv[0], *libfuzzer_args], one)
    atheris.Fuzz()


def run_atheris(runs: int, root: Path, timeout: float) -> dict[str, Any]:
    """libFuzzer through atheris in a child process, seeded with the seed files; stops at the first finding."""
    import re

    seeds = root / "seeds"
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for f in seeds.glob("*.gguf"):
        shutil.copy(f, corpus / f.name)
    findings = root / "findings"
    findings.mkdir(exist_ok=True)
    max_len = 2 * max(f.stat().st_size for f in seeds.glob("*.gguf"))
    cmd = [sys.executable, "-m", "tests.support.fuzzing", "--atheris-worker", str(seeds)]
    cmd += [f"-runs={runs}", f"-max_len={max_len}"]
    cmd += [f"-timeout={int(timeout)}", "-rss_limit_mb=4096", f"-artifact_prefix={findings}/", str(corpus)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
    log = proc.stdout + proc.stderr
    done = re.search(r"Done (\d+) runs in (\d+) second", log)
    escaped = "Uncaught Python exception" in log
    crashed = "deadly signal" in log or "ERROR: libFuzzer: out-of-memory" in log
    hung = "ERROR: libFuzzer: timeout" in log
    if not done and not (escaped or crashed or hung):
        raise RuntimeError(f"atheris did not run (exit {proc.returncode}):\n{log[-2000:]}")
    executed = re.findall(r"#(\d+)\s", log)
    cov = re.findall(r"cov: (\d+)", log)
    return {
        "cases": int(done.group(1)) if done else int(executed[-1]) if executed else 0,
        "escaped_errors": int(escaped),
        "crashes": int(crashed),
        "hangs": int(hung),
        "coverage_edges": int(cov[-1]) if cov else None,
        "findings": sorted(f.name for f in findings.iterdir()),
        "log_tail": log[-1500:] if (escaped or crashed or hung) else "",
    }


def main(argv: list[str] | None = None) -> int:
    import random

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--atheris-worker"]:
        atheris_worker(Path(argv[1]), argv[2:])
        return 0

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=20.0, help="seconds one input may take")
    p.add_argument("--merge-every", type=int, default=1, help="merge every Nth input that passes every check")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--atheris", type=int, metavar="RUNS", help="also RUNS inputs of coverage-guided fuzzing (atheris)")
    args = p.parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return 0

    start = time.perf_counter()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="alignvec-fuzz-"))
    seeds = make_seeds(root / "seeds")
    r = random.Random(args.seed)
    proc = WorkerProcess(root / "seeds")
    counts: dict[str, Counter[str]] = {t: Counter() for t in TARGETS}
    examples: list[str] = []
    passed = Counter[str]()
    merges = 0
    try:
        for i in range(args.cases):
            target = TARGETS[i % len(TARGETS)]
            data = make_case(target, seeds, root, r)
            path = root / ("case.gguf" if target == "gguf" else "case.avec.gguf")
            path.write_bytes(data)
            merge_too = False
            outcome, detail = proc.run(target, path, merge_too, args.timeout)
            if outcome == "ok":
                passed[target] += 1
                if (passed[target] - 1) % args.merge_every == 0:
                    merges += 1
                    outcome, detail = proc.run(target, path, True, args.timeout)
            counts[target][outcome] += 1
            if outcome in ("escaped", "crash", "hang"):
                kept = root / "findings" / f"{i:05d}-{target}-{outcome}.gguf"
                kept.parent.mkdir(exist_ok=True)
                shutil.copy(path, kept)
                if len(examples) < 8:
                    examples.append(f"  #{i} {target} {outcome}: {detail} [{kept}]")
    finally:
        proc.stop()
    elapsed = time.perf_counter() - start

    total = sum(counts.values(), Counter[str]())
    print(f"{'target':8} {'cases':>7} {'ok':>7} {'rejected':>9} {'escaped':>8} {'crash':>6} {'hang':>5}")
    for t in TARGETS:
        c = counts[t]
        cells = "".join(
            f"{c[k]:>{w}}" for k, w in (("ok", 8), ("rejected", 10), ("escaped", 9), ("crash", 7), ("hang", 6))
        )
        print(f"{t:8} {sum(c.values()):>7}{cells}")
    kept = args.workdir is not None or bool(examples)
    print(
        f"{args.cases} cases ({merges} with a merge) in {elapsed:.0f} s ({args.cases / elapsed:.0f}/s); "
        f"seed {args.seed}" + (f"; work dir {root}" if kept else "")
    )
    if examples:
        print("first findings:")
        print("\n".join(examples))
    guided: dict[str, Any] | None = None
    if args.atheris:
        t0 = time.perf_counter()
        guided = run_atheris(args.atheris, root, args.timeout)
        guided["seconds"] = round(time.perf_counter() - t0, 1)
        print(
            f"atheris (coverage-guided): {guided['cases']} inputs through both targets in {guided['seconds']:.0f} s, "
            f"{guided['coverage_edges']} edges; escaped {guided['escaped_errors']}, crashes {guided['crashes']}, "
            f"hangs {guided['hangs']}"
        )
        if guided["log_tail"]:
            print(guided["log_tail"])
            kept = True
        guided.pop("log_tail")
    if not kept:
        shutil.rmtree(root, ignore_errors=True)
    g = guided or {"cases": 0, "escaped_errors": 0, "crashes": 0, "hangs": 0}
    result = {
        "cases": args.cases + g["cases"],
        "escaped_errors": total["escaped"] + g["escaped_errors"],
        "crashes": total["crash"] + g["crashes"],
        "hangs": total["hang"] + g["hangs"],
        "per_target": {t: dict(counts[t]) for t in TARGETS},
        "merges": merges,
        "seconds": round(elapsed, 1),
        "seed": args.seed,
        **({"atheris": guided} if guided is not None else {}),
    }
    print(json.dumps(result))
    return 0 if not (result["escaped_errors"] or result["crashes"] or result["hangs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
