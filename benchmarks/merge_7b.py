"""``benchmarks/merge.py --size 7b``: the merge engine on a Mistral-7B-shaped Llama at Q4_K_M.

The model: hidden 4096, 32 layers, GQA 32/8, FFN 14336, vocabulary 32000 (7.24B parameters, random
weights tiled from one pool: benchmarks/synthetic.py), written as F16 one tensor at a time, quantized by
llama.cpp's ``llama_model_quantize`` to Q4_K_M (that run is the floor: the same tensors, the same types,
every core; its wall and CPU seconds are recorded when the model is built), the F16 source deleted. One
full-rank vector (Δ on every tensor, 2% of the weights' std, stored F16: 14.5 GB) at λ = 1. The base,
the vector and the floor's record are cached under ~/.cache/alignvec/bench/7b (``--clean`` deletes them
at the end; about 19 GB). Every measurement runs in a fresh process (benchmarks/merge.py's children:
wall time, CPU time of all the child's threads, peak RSS from VmHWM):

- ``merge_s_default``: ``cached_merge()`` of the mix into an empty cache with the default policy (what
  ``load()`` waits for on a new mix; the inputs' content digests, remembered by the cache, are taken
  first in their own process: ``digest_s``); ``merge_s_hifi``: ``merge()`` with ``hifi``;
  ``merge_vs_quantize_floor``: the default's over the floor's, by the wall clock and by CPU time
  (``_cpu``), which a shared machine disturbs far less;
- ``peak_rss_mb`` of the default merge, against ``base_size_mb`` and the largest tensor in f32;
- ``cached_load_vs_plain``: ``alignvec_gguf.load`` on a cache hit over ``Llama(model_path=merged file)``;
- ``tokens_per_s_vs_base``: decode speed of the merged model over the base's, one thread, tokens per CPU
  second (``DECODE_TOKENS_7B`` single-token evals after an 8-token prompt, best of two, two rounds);
  ``tokens_per_s_vs_base_dither`` and ``merge_s_dither``: the same for ``merge()`` under ``dither``, which
  keeps the base's types (the default moves the tensors it cannot dither within budget to Q8_0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: tests.support

from tests.support import measure, synthetic  # noqa: E402

MERGE = Path(__file__).with_name("merge.py")  # its --child tasks: the measurements, each in a fresh process

DECODE_TOKENS_7B = 16
# a policy that keeps the base's types (dithering on its own scales): decode speed without the default's Q8_0 move
SAME_SIZE_POLICY = "dither"


def run_child(task: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One of benchmarks/merge.py's measurements in a fresh process (its wall time and peak RSS added)."""
    return measure.run_child(MERGE, task, spec)


def main(args: argparse.Namespace, size: str = "7b") -> None:
    """The measurements above on the ``size`` model of :data:`synthetic.SHAPES` (``--lean`` runs them at 90m
    or 1b too, for the scaling table)."""
    from alignvec_gguf import ggml
    from alignvec_gguf.policy import DEFAULT_POLICY

    threads = ggml.default_threads()
    dims = synthetic.SHAPES[size]
    workdir = Path(args.workdir) if args.workdir else synthetic.CACHE
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / size
    rows: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    free_gb = shutil.disk_usage(workdir).free / 1e9
    base, record = synthetic.quantized_base(size, "Q4_K_M", threads, workdir)
    av = root / "full-f16.avec.gguf"
    if not av.is_file():
        synthetic.write_full_av(av, base, dims)
    rows.append(
        (
            "setup",
            f"{record['params'] / 1e9:.2f}B params; Q4_K_M base, F16 vector ready in {time.perf_counter() - t0:.0f}s "
            f"(cached; built {record['built']}, {free_gb:.0f} GB free before)",
        )
    )
    floor, floor_cpu = record["quantize_seconds"], record["quantize_cpu_seconds"]
    lam = 1.0
    mix = {"base": str(base), "av": str(av), "lam": lam}
    cache = root / "cache"
    hifi_out, same_out = root / "merged-hifi.gguf", root / f"merged-{SAME_SIZE_POLICY}.gguf"
    out: dict[str, Any] = {"model": f"{size} ({dims})", "params": record["params"], "threads": threads}
    try:
        shutil.rmtree(cache, ignore_errors=True)
        digest = run_child("digest", {**mix, "cache": str(cache), "requant": DEFAULT_POLICY})
        default = run_child("cached_merge", {**mix, "cache": str(cache), "requant": DEFAULT_POLICY})
        merged = Path(default["path"])
        merged_size = merged.stat().st_size / 2**20

        spec = {"threads": 1, "decode": True, "cpu_clock": True, "tokens": DECODE_TOKENS_7B}
        hit_spec = {**mix, "threads": threads, "cache": str(cache), "mix": True, "decode": False}
        base_tps, merged_tps, hits, plains = [], [], [], []
        for _ in range(2):  # interleaved: a busy moment hits both sides alike
            base_tps.append(run_child("speed", {**spec, "path": str(base)})["tokens_per_s"])
            merged_tps.append(run_child("speed", {**spec, "path": str(merged)})["tokens_per_s"])
            hits.append(run_child("speed", hit_spec)["load_seconds"])
            plains.append(
                run_child("speed", {"threads": threads, "path": str(merged), "decode": False})["load_seconds"]
            )
        hit, plain, btps, mtps = min(hits), min(plains), max(base_tps), max(merged_tps)
        shutil.rmtree(cache, ignore_errors=True)  # one merged model on disk at a time
        hifi = run_child("merge", {**mix, "out": str(hifi_out), "requant": "hifi"})
        hifi_size = hifi_out.stat().st_size / 2**20
        hifi_out.unlink()
        # the same merge engine under a same-size policy: what decode costs when the base's types are kept
        same = run_child("merge", {**mix, "out": str(same_out), "requant": SAME_SIZE_POLICY})
        same_tps, same_base_tps = [], []
        for _ in range(2):
            same_base_tps.append(run_child("speed", {**spec, "path": str(base)})["tokens_per_s"])
            same_tps.append(run_child("speed", {**spec, "path": str(same_out)})["tokens_per_s"])
        same_out.unlink()
        stps, sbtps = max(same_tps), max(same_base_tps)
        rows.append(("digests", f"the inputs' content digests, once per file (remembered): {digest['seconds']:.1f}s"))
        rows.append(
            (
                "floor",
                f"llama_model_quantize F16 -> Q4_K_M: {floor:.1f}s wall, {floor_cpu:.1f}s CPU "
                f"(at build time, load average {record.get('load_average')})",
            )
        )
        for name, r in ((DEFAULT_POLICY, default), ("hifi", hifi)):
            rows.append(
                (
                    f"merge {name}",
                    f"{r['seconds']:.1f}s wall (x{r['seconds'] / floor:.2f} floor), {r['cpu_seconds']:.1f}s CPU "
                    f"(x{r['cpu_seconds'] / floor_cpu:.2f}), peak RSS {r['peak_rss_mb']:.0f} MB, "
                    f"{(merged_size if r is default else hifi_size):.0f} MB",
                )
            )
        rows.append(("load", f"cached load() {hit:.2f}s vs plain Llama() {plain:.2f}s (x{hit / plain:.2f})"))
        rows.append(("tokens/s", f"base {btps:.2f}, merged {mtps:.2f} (x{mtps / btps:.3f}), per CPU second, 1 thread"))
        rows.append(
            (
                SAME_SIZE_POLICY,
                f"merge {same['seconds']:.1f}s wall, {same['cpu_seconds']:.1f}s CPU; decode base {sbtps:.2f}, "
                f"merged {stps:.2f} (x{stps / sbtps:.3f}): the base's types kept",
            )
        )
        out.update(
            {
                "merge_s_default": round(default["seconds"], 1),
                "merge_cpu_s_default": round(default["cpu_seconds"], 1),
                "merge_s_hifi": round(hifi["seconds"], 1),
                "merge_cpu_s_hifi": round(hifi["cpu_seconds"], 1),
                "quantize_floor_s": floor,
                "quantize_floor_cpu_s": floor_cpu,
                "merge_vs_quantize_floor": round(default["seconds"] / floor, 3),
                "merge_vs_quantize_floor_cpu": round(default["cpu_seconds"] / floor_cpu, 3),
                "hifi_vs_quantize_floor": round(hifi["seconds"] / floor, 3),
                "hifi_vs_quantize_floor_cpu": round(hifi["cpu_seconds"] / floor_cpu, 3),
                "peak_rss_mb": round(default["peak_rss_mb"]),
                "hifi_peak_rss_mb": round(hifi["peak_rss_mb"]),
                "base_size_mb": round(base.stat().st_size / 2**20),
                "merged_size_mb": round(merged_size),
                "hifi_size_mb": round(hifi_size),
                "largest_tensor_f32_mb": round(synthetic.largest_tensor(dims) * 4 / 2**20),
                "vector_size_mb": round(av.stat().st_size / 2**20),
                "digest_s": round(digest["seconds"], 1),
                "cached_load_vs_plain": round(hit / plain, 3),
                "cached_load_s": round(hit, 2),
                "plain_load_s": round(plain, 2),
                "tokens_per_s_vs_base": round(mtps / btps, 3),
                "base_tokens_per_s": round(btps, 2),
                "merged_tokens_per_s": round(mtps, 2),
                f"merge_s_{SAME_SIZE_POLICY}": round(same["seconds"], 1),
                f"tokens_per_s_vs_base_{SAME_SIZE_POLICY}": round(stps / sbtps, 3),
                "default_policy": DEFAULT_POLICY,
                "load_average": round(os.getloadavg()[0], 2),
            }
        )
    finally:
        hifi_out.unlink(missing_ok=True)
        same_out.unlink(missing_ok=True)
        shutil.rmtree(cache, ignore_errors=True)
        if args.clean:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{'':12} model: {size} {dims}, {threads} threads, policy {DEFAULT_POLICY}, λ = {lam}")
    for name, text in rows:
        print(f"{name:12} {text}")
    print(json.dumps(out))
