"""The merge engine on a ~1B Llama: speed against llama.cpp's own quantizer, memory, cached loads, tokens/s.

Builds a Llama-shaped model with TinyLlama's dimensions (hidden 2048, 22 layers, 32 heads, 4 KV heads,
FFN 5632, vocabulary 32000; ~1.1B parameters, random weights) as an F32 GGUF, quantizes it with
llama.cpp's ``llama_model_quantize`` to Q4_K_M and Q8_0, and makes one full-rank alignment vector (a
random Δ of 2% of each tensor's std on every tensor, stored F16). Every measurement runs in a fresh
process (timings and peak RSS from ``wait4``). What is measured:

- ``merge_vs_quantize_floor``: wall time of ``alignvec merge`` (default policy) / ``llama_model_quantize``
  of the same tensors (all of them) to the same types, with the same threads (every core).
- ``cached_load_vs_plain``: ``alignvec_gguf.load`` on a cache hit / ``Llama(model_path=merged file)``.
- ``tokens_per_s_vs_base``: decode speed of the merged model / the base's (same types: same kernels).
- ``peak_rss_mb`` of the merge process (its VmHWM) against ``base_size_mb`` (goal: ≤ base + 4 × largest
  tensor in f32).
- ``export_lora_pipeline_vs_merge``: llama.cpp's ``llama-export-lora`` (F32 base + a rank-32 LoRA -> F16)
  then ``llama-quantize`` (-> Q4_K_M), built from the llama-cpp-python source distribution, against
  ``alignvec merge`` of the same low-rank vector into the Q4_K_M base. Both tools are built from the
  pinned llama-cpp-python sdist on first use and cached (``tests/support/llamatools.py``; LLAMA_CPP_BIN points at
  tools built by hand instead); where that is impossible the output says why in one line.
- ``numpy_pipeline_vs_merge``: gguf-py's numpy dequantize + quantize of the same merge (Q8_0 base: gguf-py
  cannot quantize K-quants); past 60 s it is extrapolated from the tensors done.
- The in-memory load through ``llama_model_init_from_user`` (``load(mode="direct")``): load time, tokens/s
  and disk use against the cached file.

Usage: python benchmarks/merge.py [--quick] [--workdir DIR] [--keep]. --quick: a ~90M model, under two
minutes. The last line is JSON.

``--size 7b`` runs benchmarks/merge_7b.py instead: a Mistral-7B-shaped model at Q4_K_M, built once, streamed
and cached under ~/.cache/alignvec/bench/7b (``--clean`` deletes it at the end); its docstring says what it
measures. ``--lean`` runs those same measurements on the 1.1B model (or the 90M one with --quick), for the
README's scaling table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support import measure  # noqa: E402
from tests.support.measure import decode_speed, peak_rss_mb, run_timed  # noqa: E402
from tests.support.synthetic import SHAPES, tensor_specs, write_float_base  # noqa: E402

SIZES = {"full": SHAPES["1b"], "quick": SHAPES["90m"]}
DECODE_TOKENS = 32
LORA_RANK = 32


# --- building the model, the vectors ---------------------------------------------------------------


def write_vectors(base_f32: Path, full_av: Path, lowrank_av: Path, seed: int = 1) -> None:
    """One full-rank AV (Δ = 0.02·std(w)·noise on every tensor, F16) and a rank-32 low-rank AV (matrices)."""
    from gguf import GGUFReader

    from alignvec_gguf import pages
    from alignvec_gguf.avfile import AVInfo, LoraStats, write_av, write_lowrank_av
    from alignvec_gguf.identity import signature
    from tests.support.oracle import tensor_shape

    reader = GGUFReader(base_f32)  # its pages are dropped below: forked children start from our RSS
    pairs = [(t.name, tensor_shape(t)) for t in reader.tensors]
    info = AVInfo("llama", "bench", "benchmark vector", "bench", str(base_f32), "random", signature(pairs), "")
    rng = np.random.default_rng(seed)

    def deltas():  # noqa: ANN202
        for t in reader.tensors:
            w = np.asarray(t.data)
            std = float(w.std()) if w.size > 1 else 1.0
            yield t.name, rng.standard_normal(tensor_shape(t), dtype=np.float32) * np.float32(0.02 * std)

    write_av(full_av, "llama", deltas(), info, dtype="f16")

    def factors():  # noqa: ANN202
        for t in reader.tensors:
            shape = tensor_shape(t)
            if len(shape) == 2 and t.name.startswith("blk."):
                a = rng.standard_normal((LORA_RANK, shape[1]), dtype=np.float32) * np.float32(0.01)
                b = rng.standard_normal((shape[0], LORA_RANK), dtype=np.float32) * np.float32(0.01)
                yield t.name, a, b

    write_lowrank_av(lowrank_av, "llama", factors(), info, LoraStats(LORA_RANK, 0.0, 0.0), alpha=LORA_RANK)
    pages.release([base_f32])


# --- children: every measurement in a fresh process -----------------------------------------------


def child(task: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Runs inside the child process; returns what the parent prints."""
    import resource

    result = _child(task, spec)
    result["peak_rss_mb"] = peak_rss_mb()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # every thread of the child
    return result


def _child(task: str, spec: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    if task == "quantize":
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{spec['ftype']}")
        params.nthread = spec["threads"]
        rc = llama_cpp.llama_model_quantize(spec["src"].encode(), spec["out"].encode(), params)
        assert rc == 0, rc
        return {"seconds": time.perf_counter() - t0}
    if task == "merge":
        from alignvec_gguf import merge

        report = merge(spec["base"], {spec["av"]: spec["lam"]}, spec["out"], requant=spec["requant"])
        return {"seconds": time.perf_counter() - t0, "touched": len(report.touched)}
    if task == "digest":  # the cache remembers the inputs' content digests: later merges skip hashing them
        from alignvec_gguf.cache import MergeCache
        from alignvec_gguf.mix import open_vectors

        MergeCache(spec["cache"]).key(Path(spec["base"]), open_vectors({spec["av"]: spec["lam"]}), spec["requant"])
        return {"seconds": time.perf_counter() - t0}
    if task == "cached_merge":  # what load() waits for on a new mix, the inputs' digests already known
        from alignvec_gguf import cached_merge

        path = cached_merge(spec["base"], {spec["av"]: spec["lam"]}, requant=spec["requant"], cache_dir=spec["cache"])
        return {"seconds": time.perf_counter() - t0, "path": str(path)}
    if task == "numpy":
        return numpy_pipeline(spec, t0)
    if task == "speed":
        return speed(spec)
    if task == "direct":
        from alignvec_gguf import load

        llm = load(spec["base"], {spec["av"]: spec["lam"]}, mode="direct", n_ctx=256, n_threads=spec["threads"])
        seconds = time.perf_counter() - t0
        return {"load_seconds": seconds, "tokens_per_s": decode_speed(llm, tokens=DECODE_TOKENS)}
    raise ValueError(task)


def speed(spec: dict[str, Any]) -> dict[str, Any]:
    """Plain load and decode of a GGUF file, or a cached load() of the mix (spec['mix'])."""
    from alignvec_gguf import load
    from alignvec_gguf.cpu import new_llama

    t0 = time.perf_counter()
    if spec.get("mix"):
        llm = load(
            spec["base"], {spec["av"]: spec["lam"]}, cache_dir=spec["cache"], n_ctx=256, n_threads=spec["threads"]
        )
    else:
        llm = new_llama(spec["path"], n_ctx=256, n_threads=spec["threads"], verbose=False)
    seconds = time.perf_counter() - t0
    if not spec.get("decode"):
        return {"load_seconds": seconds, "tokens_per_s": None}
    clock = time.process_time if spec.get("cpu_clock") else time.perf_counter
    tokens = decode_speed(llm, tokens=spec.get("tokens", DECODE_TOKENS), clock=clock)
    return {"load_seconds": seconds, "tokens_per_s": tokens}


def numpy_pipeline(spec: dict[str, Any], t0: float) -> dict[str, Any]:
    """gguf-py only: dequantize + add + quantize every touched tensor, written with GGUFWriter."""
    from gguf import GGUFReader, GGUFWriter
    from gguf.quants import dequantize, quantize

    from alignvec_gguf import AlignmentVector
    from tests.support.oracle import tensor_bytes, tensor_shape

    reader, av = GGUFReader(spec["base"]), AlignmentVector(spec["av"])
    total = sum(int(t.n_elements) for t in reader.tensors)
    done = 0
    writer = GGUFWriter(spec["out"], "llama")
    for t in reader.tensors:
        shape = tensor_shape(t)
        w = dequantize(
            np.asarray(tensor_bytes(reader, t)).reshape(-1, t.n_bytes // max(1, t.n_elements // shape[-1])),
            t.tensor_type,
        )
        w = w.reshape(shape) + np.float32(spec["lam"]) * av.delta(t.name)
        data = quantize(w, t.tensor_type) if len(shape) > 1 else w
        writer.add_tensor(t.name, data, raw_dtype=t.tensor_type if len(shape) > 1 else None)
        done += int(t.n_elements)
        if time.perf_counter() - t0 > spec["cap"]:
            break
    seconds = time.perf_counter() - t0
    return {"seconds": seconds * total / done, "share_measured": done / total}


def run_child(task: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in a fresh process (this script's ``--child``); adds its wall time and peak RSS."""
    return measure.run_child(Path(__file__), task, spec)


def run_child_rss(task: str, spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_child`; the child reports its own peak RSS (``peak_rss_mb``)."""
    return run_child(task, spec)


# --- the benchmark ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~90M model, under two minutes")
    parser.add_argument("--workdir", help="where the models go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the models")
    parser.add_argument(
        "--size", choices=("1b", "7b"), default="1b", help="7b: a Mistral-7B-shaped model (benchmarks/merge_7b.py)"
    )
    parser.add_argument("--clean", action="store_true", help="7b: delete the cached model and vector when done")
    parser.add_argument(
        "--lean", action="store_true", help="the 7b measurements (benchmarks/merge_7b.py) on the 1b or --quick model"
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], json.loads(args.child[1]))))
        return
    if args.size == "7b" or args.lean:
        import merge_7b  # benchmarks/merge_7b.py, beside this script

        merge_7b.main(args, "90m" if args.quick and args.size != "7b" else args.size)
        return

    from alignvec_gguf import ggml
    from alignvec_gguf.policy import DEFAULT_POLICY

    threads = ggml.default_threads()
    dims = SIZES["quick" if args.quick else "full"]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="alignvec-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    lam = 1.0
    reps = 1 if args.quick else 2
    rows: list[tuple[str, str]] = []
    out: dict[str, Any] = {"model": "quick" if args.quick else "tinyllama-1.1b", "threads": threads}
    try:
        t0 = time.perf_counter()
        f32 = root / "base-f32.gguf"
        params = write_float_base(f32, dims, dtype="f32", pooled=False)
        full_av, lowrank_av = root / "full.avec.gguf", root / "lowrank.avec.gguf"
        write_vectors(f32, full_av, lowrank_av)
        out["params"] = params
        largest = max(int(np.prod(s)) for _, s in tensor_specs(dims)) * 4 / 2**20
        rows.append(
            ("setup", f"{params / 1e9:.2f}B params, F32 base + vectors written in {time.perf_counter() - t0:.0f}s")
        )

        for variant in ("Q4_K_M", "Q8_0"):
            base = root / f"base-{variant}.gguf"
            merged = root / f"merged-{variant}.gguf"
            q = {"src": str(f32), "out": str(base), "ftype": variant, "threads": threads}
            mix = {"base": str(base), "av": str(full_av), "lam": lam}
            # floor and merge alternate, best of `reps` each: other load on the machine hits both alike
            floors, merges = [], []
            for _ in range(reps):
                floors.append(run_child("quantize", q)["seconds"])
                merges.append(run_child_rss("merge", {**mix, "out": str(merged), "requant": DEFAULT_POLICY}))
            floor = min(floors)
            m = min(merges, key=lambda r: r["seconds"])
            same = run_child("merge", {**mix, "out": str(root / "s.gguf"), "requant": "same"})
            key = variant.lower().replace("_", "")
            ratio = m["seconds"] / floor
            rss = max(r["peak_rss_mb"] for r in merges)
            rows.append((f"{variant} floor", f"llama_model_quantize F32 -> {variant}: {floor:.1f}s"))
            rows.append(
                (
                    f"{variant} merge",
                    f"{DEFAULT_POLICY}: {m['seconds']:.1f}s (x{ratio:.2f} floor), peak RSS {rss:.0f} MB; "
                    f"same: {same['seconds']:.1f}s (x{same['seconds'] / floor:.2f})",
                )
            )
            out[f"{key}_merge_vs_quantize_floor"] = round(ratio, 3)
            out[f"{key}_same_policy_vs_quantize_floor"] = round(same["seconds"] / floor, 3)
            out[f"{key}_peak_rss_mb"] = round(rss)
            out[f"{key}_base_size_mb"] = round(base.stat().st_size / 2**20)

            # loads and tokens: base, merged file, cached load(), direct (no file); interleaved, best of each
            spec = {"threads": threads, "decode": True}
            cache = root / f"cache-{variant}"
            hit_spec = {**spec, **mix, "cache": str(cache), "mix": True, "decode": False}
            run_child("speed", hit_spec)  # fills the cache (and remembers the digests)
            base_tps, merged_tps, hits, plains = [], [], [], []
            for _ in range(reps + 1):
                base_tps.append(run_child("speed", {**spec, "path": str(base)})["tokens_per_s"])
                merged_tps.append(run_child("speed", {**spec, "path": str(merged)})["tokens_per_s"])
                hits.append(run_child("speed", hit_spec)["load_seconds"])
                plains.append(run_child("speed", {**spec, "path": str(merged), "decode": False})["load_seconds"])
            hit, plain, btps, mtps = min(hits), min(plains), max(base_tps), max(merged_tps)
            direct = run_child("direct", {**mix, "threads": threads})
            out[f"{key}_cached_load_vs_plain"] = round(hit / plain, 3)
            out[f"{key}_tokens_per_s_vs_base"] = round(mtps / btps, 3)
            out[f"{key}_direct_load_s"] = round(direct["load_seconds"], 2)
            out[f"{key}_cached_load_s"] = round(hit, 2)
            out[f"{key}_direct_tokens_per_s_vs_cached"] = round(direct["tokens_per_s"] / mtps, 3)
            size_mb = merged.stat().st_size / 2**20
            rows.append(
                (f"{variant} load", f"cached load() {hit:.2f}s vs plain Llama() {plain:.2f}s (x{hit / plain:.2f})")
            )
            rows.append((f"{variant} tokens/s", f"base {btps:.1f}, merged {mtps:.1f} (x{mtps / btps:.3f})"))
            rows.append(
                (
                    f"{variant} direct",
                    f"init_from_user: load {direct['load_seconds']:.1f}s (merges every time), "
                    f"{direct['tokens_per_s']:.1f} tok/s, 0 MB on disk; cached file: load {hit:.2f}s, "
                    f"{mtps:.1f} tok/s, {size_mb:.0f} MB",
                )
            )
            if variant == "Q8_0":
                cap = 20.0 if args.quick else 60.0
                npy = run_child("numpy", {**mix, "out": str(root / "n.gguf"), "cap": cap})
                out["numpy_pipeline_vs_merge"] = round(npy["seconds"] / m["seconds"], 2)
                rows.append(
                    (
                        "Q8_0 numpy",
                        f"gguf-py dequantize+quantize: {npy['seconds']:.1f}s ({npy['share_measured']:.0%} measured) "
                        f"= x{npy['seconds'] / m['seconds']:.1f} the merge; Q4_K_M: gguf-py cannot quantize K-quants",
                    )
                )
            for path in (merged, root / "s.gguf", root / "n.gguf"):
                path.unlink(missing_ok=True)
            shutil.rmtree(cache, ignore_errors=True)

        # llama.cpp's own pipeline on the equivalent low-rank adapter, against our merge of the same vector
        # (built from the pinned sdist on first use and cached: tests/llamatools.py; $LLAMA_CPP_BIN overrides)
        from tests.support import llamatools

        try:
            bindir: Path | None = llamatools.ensure(("llama-export-lora", "llama-quantize"))
            unavailable = ""
        except llamatools.ToolsUnavailable as e:
            bindir, unavailable = None, str(e)
        export = bindir / "llama-export-lora" if bindir else Path("llama-export-lora")
        quantize = bindir / "llama-quantize" if bindir else Path("llama-quantize")
        base_q4 = root / "base-Q4_K_M.gguf"
        low = {"base": str(base_q4), "av": str(lowrank_av), "lam": 1.0, "out": str(root / "l.gguf")}
        ours = run_child("merge", {**low, "requant": DEFAULT_POLICY})
        if export.is_file() and quantize.is_file():
            f16 = root / "export-f16.gguf"
            t_export, _ = run_timed(
                [str(export), "-m", str(f32), "--lora", str(lowrank_av), "-o", str(f16), "-t", str(threads)]
            )
            t_quant, _ = run_timed([str(quantize), str(f16), str(root / "export-q4km.gguf"), "Q4_K_M", str(threads)])
            pipeline = t_export + t_quant
            out["export_lora_pipeline_vs_merge"] = round(pipeline / ours["seconds"], 2)
            rows.append(
                (
                    "export-lora",
                    f"llama-export-lora {t_export:.1f}s + llama-quantize {t_quant:.1f}s = {pipeline:.1f}s vs alignvec "
                    f"merge of the same rank-{LORA_RANK} vector {ours['seconds']:.1f}s "
                    f"(x{pipeline / ours['seconds']:.1f})",
                )
            )
        else:
            out["export_lora_pipeline_vs_merge"] = None
            out["export_lora_unavailable"] = f"llama.cpp's llama-export-lora / llama-quantize: {unavailable}"
            rows.append(("export-lora", out["export_lora_unavailable"]))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print(f"{'':16} model: {out['model']}, {threads} threads, policy {DEFAULT_POLICY}, λ = {lam}")
    for name, text in rows:
        print(f"{name:16} {text}")
    summary = {
        "merge_vs_quantize_floor": out["q4km_merge_vs_quantize_floor"],
        "cached_load_vs_plain": out["q4km_cached_load_vs_plain"],
        "tokens_per_s_vs_base": out["q4km_tokens_per_s_vs_base"],
        "peak_rss_mb": out["q4km_peak_rss_mb"],
        "base_size_mb": out["q4km_base_size_mb"],
        "largest_tensor_f32_mb": round(largest),
        "export_lora_pipeline_vs_merge": out["export_lora_pipeline_vs_merge"],
        "numpy_pipeline_vs_merge": out.get("numpy_pipeline_vs_merge"),
        "default_policy": DEFAULT_POLICY,
        **{k: v for k, v in out.items() if k not in ("q4km_merge_vs_quantize_floor",)},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
