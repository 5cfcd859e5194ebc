"""Random Llama-shaped models and vectors at the sizes people run, streamed to disk and cached.

The benchmarks at 1.1B and 7B parameters need a base GGUF, its quantization and alignment vectors that
match it, without ever holding a model in memory (a 7B in f32 is 29 GB; the machine has 24 GB) and
without drawing billions of random numbers (numpy draws about 50 M normals per second here): values are
tiled from one pool of random numbers drawn once, each tensor from its own offset. That is random enough
for what is measured here (speed, memory), and nothing here is meant to be a model worth running.

Cached under ``~/.cache/alignvec/bench/<size>/`` (``--workdir`` in the benchmarks): the quantized base,
the vectors, and what building them measured (``build.json``: the quantizer's time, which is the merge
benchmark's floor). The float source is deleted once it has been quantized.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CACHE = Path.home() / ".cache" / "alignvec" / "bench"
SHAPES: dict[str, dict[str, int]] = {
    "90m": dict(hidden=768, inter=2048, layers=6, heads=12, kv_heads=4, vocab=32000),
    "1b": dict(hidden=2048, inter=5632, layers=22, heads=32, kv_heads=4, vocab=32000),  # TinyLlama-1.1B
    "7b": dict(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, vocab=32000),  # Mistral-7B
}
POOL_SIZE = (1 << 24) + 7  # a prime-ish length, so that tiles of different tensors do not line up


def tensor_specs(d: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """GGUF names and numpy shapes of a Llama with dimensions ``d`` (untied output)."""
    h, kv = d["hidden"], d["hidden"] // d["heads"] * d["kv_heads"]
    specs: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (d["vocab"], h))]
    for i in range(d["layers"]):
        b = f"blk.{i}."
        specs += [
            (b + "attn_norm.weight", (h,)),
            (b + "attn_q.weight", (h, h)),
            (b + "attn_k.weight", (kv, h)),
            (b + "attn_v.weight", (kv, h)),
            (b + "attn_output.weight", (h, h)),
            (b + "ffn_norm.weight", (h,)),
            (b + "ffn_gate.weight", (d["inter"], h)),
            (b + "ffn_up.weight", (d["inter"], h)),
            (b + "ffn_down.weight", (h, d["inter"])),
        ]
    return specs + [("output_norm.weight", (h,)), ("output.weight", (d["vocab"], h))]


def n_params(d: dict[str, int]) -> int:
    return sum(int(np.prod(s)) for _, s in tensor_specs(d))


def largest_tensor(d: dict[str, int]) -> int:
    """Elements of the largest tensor (the embeddings or the output)."""
    return max(int(np.prod(s)) for _, s in tensor_specs(d))


def llama_writer(path: Path, d: dict[str, int], file_type: int) -> Any:
    """A GGUFWriter with a Llama's metadata and a byte-level vocabulary that llama.cpp loads."""
    from gguf import GGUFWriter, TokenType

    w = GGUFWriter(path, "llama")
    w.add_name("alignvec-bench")
    w.add_context_length(2048)
    w.add_embedding_length(d["hidden"])
    w.add_block_count(d["layers"])
    w.add_feed_forward_length(d["inter"])
    w.add_head_count(d["heads"])
    w.add_head_count_kv(d["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d["hidden"] // d["heads"])
    w.add_file_type(file_type)
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"▁t{i}" for i in range(d["vocab"] - len(tokens))]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * (d["vocab"] - len(types))
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(d["vocab"])])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    return w


class Pool:
    """Standard normal values drawn once; :meth:`take` tiles them into any number of values."""

    def __init__(self, seed: int, size: int = POOL_SIZE):
        self.values = np.random.default_rng(seed).standard_normal(size, dtype=np.float32)
        self.offset = 0

    def take(self, n: int) -> np.ndarray:
        """``n`` values starting where the previous call stopped (plus a stride), as a new float32 array."""
        size = len(self.values)
        start = self.offset % size
        self.offset = start + n + 1_000_003
        head = self.values[start : start + n]
        if len(head) == n:
            return head.copy()
        reps, rem = divmod(n - len(head), size)
        return np.concatenate([head, *([self.values] * reps), self.values[:rem]])


def _weights(pool: Pool | np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor like a trained model's at this scale: norms near 1, matrices with std 0.02 (tiled from the pool,
    or drawn afresh from a generator)."""
    if isinstance(pool, Pool):
        values = pool.take(int(np.prod(shape))).reshape(shape)
    else:
        values = pool.standard_normal(shape, dtype=np.float32)
    if len(shape) == 1:
        return values * np.float32(0.1) + np.float32(1.0)
    return values * np.float32(0.02)


def write_float_base(path: Path, d: dict[str, int], *, dtype: str = "f16", seed: int = 0, pooled: bool = True) -> int:
    """A random Llama as an F16 (or F32) GGUF, written one tensor at a time; returns its parameter count.

    Norms stay F32, as llama.cpp's converter writes them. ``pooled=False`` draws every value afresh (slower:
    for the models small enough, such as benchmarks/merge.py's and cpu.py's)."""
    ftype = {"f32": 0, "f16": 1}[dtype]
    w = llama_writer(path, d, ftype)
    specs = tensor_specs(d)

    def stored(shape: tuple[int, ...]) -> np.dtype:
        return np.dtype(np.float16 if dtype == "f16" and len(shape) > 1 else np.float32)

    for name, shape in specs:
        w.add_tensor_info(name, shape, stored(shape), int(np.prod(shape)) * stored(shape).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    pool = Pool(seed) if pooled else np.random.default_rng(seed)
    for _name, shape in specs:
        w.write_tensor_data(_weights(pool, shape).astype(stored(shape)))
    w.close()
    return n_params(d)


def quantize(src: Path, out: Path, ftype: str, threads: int) -> tuple[float, float]:
    """``llama_model_quantize`` ``src`` to ``ftype`` (e.g. ``Q4_K_M``) with ``threads``; returns its wall and
    CPU seconds (all threads of this process: a shared machine stretches the first, not the second)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    tmp = out.with_suffix(".tmp")
    t0, c0 = time.perf_counter(), time.process_time()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {ftype} failed ({rc})")
    os.replace(tmp, out)
    return seconds, cpu


def _info(base: Path, name: str) -> Any:
    from gguf import GGUFReader

    from alignvec_gguf.avfile import AVInfo
    from alignvec_gguf.identity import signature
    from tests.support.oracle import tensor_shape

    reader = GGUFReader(base)
    pairs = [(t.name, tensor_shape(t)) for t in reader.tensors]
    return AVInfo("llama", name, "benchmark vector", "bench", str(base), "random", signature(pairs), "")


class _Metadata:
    """gguf-py's ``GGUFWriter`` behind the ``add(key, value, vtype, item_type)`` of the AV writer's metadata
    (``alignvec_gguf.avfile.put_metadata``), so that this two-pass writer puts exactly the AV format's keys."""

    def __init__(self, writer: Any):
        self.writer = writer

    def add(self, key: str, value: Any, vtype: Any, item_type: Any = None) -> None:
        self.writer.add_key_value(key, value, vtype, item_type)


def write_full_av(path: Path, base: Path, d: dict[str, int], *, seed: int = 1, dtype: str = "f16") -> None:
    """One full-rank vector on every tensor (Δ = 2% of the weights' std, tiled noise), streamed.

    ``alignvec_gguf.write_av`` spools its tensors to a temporary file to learn their digest before it
    writes the header; at 7B that is another 14 GB on disk, so this writes the same format in two
    passes over the (cheap) tiled values instead: the digest first, then the tensors."""
    from gguf import GGUFWriter

    from alignvec_gguf.avfile import put_metadata

    if dtype not in ("f16", "f32"):
        raise ValueError(dtype)
    specs = tensor_specs(d)
    stored = np.dtype(np.float16 if dtype == "f16" else np.float32)

    def deltas() -> Iterator[np.ndarray]:
        pool = Pool(seed)
        for _name, shape in specs:
            scale = 0.02 * (0.1 if len(shape) == 1 else 0.02)
            yield (pool.take(int(np.prod(shape))).reshape(shape) * np.float32(scale)).astype(stored)

    content = hashlib.sha256()
    for delta in deltas():
        content.update(delta.data)
    tmp = path.with_suffix(".tmp")
    w = GGUFWriter(tmp, "llama")
    put_metadata(_Metadata(w), _info(base, "bench"), "llama", "full", content)
    for name, shape in specs:
        w.add_tensor_info(name, shape, stored, int(np.prod(shape)) * stored.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for delta in deltas():
        w.write_tensor_data(delta)
    w.close()
    os.replace(tmp, path)


def write_lowrank_avs(
    paths: list[Path], base: Path, d: dict[str, int], *, rank: int = 32, dtype: str = "f32", seed: int = 11
) -> None:
    """Rank-``rank`` vectors on every block matrix, one per path, each from its own seed (|BA| ≈ 3% of |W|)."""
    from alignvec_gguf.avfile import LoraStats, write_lowrank_av

    specs = [(n, s) for n, s in tensor_specs(d) if len(s) == 2 and n.startswith("blk.")]
    for i, path in enumerate(paths):
        rng = np.random.default_rng(seed + i)

        def factors(rng: np.random.Generator = rng) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
            for name, (n_out, n_in) in specs:
                a = rng.standard_normal((rank, n_in), dtype=np.float32) * np.float32(0.01)
                b = rng.standard_normal((n_out, rank), dtype=np.float32) * np.float32(0.01)
                yield name, a, b

        info = _info(base, f"v{i + 1}")
        write_lowrank_av(path, "llama", factors(), info, LoraStats(rank, 0.0, 0.0), alpha=rank, dtype=dtype)


def cached(root: Path, key: str, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """What ``build`` recorded the first time (``root/key.json``), building it only when the record is missing."""
    record = root / f"{key}.json"
    if record.is_file():
        return dict(json.loads(record.read_text()))
    root.mkdir(parents=True, exist_ok=True)
    result = build()
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, record)
    return result


def quantized_base(size: str, ftype: str, threads: int, root: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The cached random ``size`` model quantized to ``ftype``, and its build record (``quantize_seconds``:
    ``llama_model_quantize`` from F16 with ``threads``, the float source deleted afterwards)."""
    root = (root or CACHE) / size
    out = root / f"base-{ftype}.gguf"

    def build() -> dict[str, Any]:
        d = SHAPES[size]
        src = root / "base-f16.gguf"
        t0 = time.perf_counter()
        tmp = src.with_suffix(".tmp")
        write_float_base(tmp, d)
        os.replace(tmp, src)
        written = time.perf_counter() - t0
        log.info("wrote %s (%.1f GB) in %.0f s; quantizing to %s", src, src.stat().st_size / 1e9, written, ftype)
        seconds, cpu = quantize(src, out, ftype, threads)
        src.unlink()
        return {
            "params": n_params(d),
            "write_f16_seconds": round(written, 1),
            "quantize_seconds": round(seconds, 1),
            "quantize_cpu_seconds": round(cpu, 1),
            "load_average": round(os.getloadavg()[0], 2),
            "quantize_threads": threads,
            "source": "f16",
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    record = root / f"base-{ftype}.json"
    if record.is_file() and not out.is_file():
        record.unlink()
    return out, cached(root, f"base-{ftype}", build)


def drawn_quantized_bases(root: Path, label: str, d: dict[str, int], types: tuple[str, ...]) -> dict[str, Path]:
    """The random Llama of benchmarks/merge.py (every value drawn, ``pooled=False``) with dimensions ``d``,
    quantized by llama.cpp to each of ``types`` with every core, cached as ``root/cpu-<label>-<type>.gguf``
    (benchmarks/cpu.py and live_1b.py share them); the F32 source is deleted once all are made."""
    from alignvec_gguf import ggml

    root.mkdir(parents=True, exist_ok=True)
    f32 = root / f"cpu-{label}-f32.gguf"
    out = {}
    for qtype in types:
        path = root / f"cpu-{label}-{qtype}.gguf"
        if not path.exists():
            if not f32.exists():
                tmp = f32.with_suffix(".tmp")
                write_float_base(tmp, d, dtype="f32", pooled=False)
                os.replace(tmp, f32)
            quantize(f32, path, qtype, ggml.default_threads())
        out[qtype] = path
    if f32.exists():
        f32.unlink()  # only the quantized models are kept
    return out
