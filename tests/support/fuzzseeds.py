"""The fuzzer's seed files: a tiny valid base model and three vectors for it (full F32, full Q8_0, low-rank F16),
written with the product's own AV writers, and where each file's header fields and sections are (from gguf-py's
parse, the independent oracle), so that mutations can aim at them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from alignvec_gguf.avfile import AVInfo, LoraStats, write_av, write_lowrank_av
from alignvec_gguf.identity import Fingerprint, signature

ARCH = "llama"
# The tiny base: (name, numpy shape, storage). Q8_0 rows are 32-value blocks; token_embd stays F32.
BASE_TENSORS: list[tuple[str, tuple[int, ...], str]] = [
    ("token_embd.weight", (16, 32), "f32"),
    ("blk.0.attn_norm.weight", (32,), "f32"),
    ("blk.0.attn_q.weight", (32, 32), "q8_0"),
    ("blk.0.ffn_up.weight", (64, 32), "f16"),
    ("output_norm.weight", (32,), "f32"),
]


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
