"""The fuzzer's mutations of its seed files: byte-level (flips, truncation, insertions, deletions, duplicated
chunks, header fields set to interesting values), logical (a well-formed file with one value, type, shape or name
changed) and noise, each drawn from a :class:`Chooser` (``random.Random`` in the fuzzer, hypothesis in the tests)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from gguf import GGUFReader, GGUFValueType

from tests.support.fuzzseeds import Seed, Slot


class Chooser(Protocol):
    """Where mutations get their choices: ``random.Random``, or hypothesis draws in tests/test_fuzz.py."""

    def randrange(self, stop: int, /) -> int: ...

    def choice(self, seq: Any) -> Any: ...

    def randbytes(self, n: int) -> bytes: ...


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
