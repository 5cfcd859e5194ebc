"""``benchmarks/live.py --size 1b``: live knobs on a model of realistic size, against llama.cpp's own LoRA path.

The base is the random Llama with TinyLlama's shape (hidden 2048, 22 layers, GQA 32/4, FFN 5632, ~1.1B
parameters) quantized by llama.cpp to Q4_K_M, the same model as ``benchmarks/cpu.py --size 1b`` (cached
under ~/.cache/alignvec/bench). Three random rank-32 vectors on every block matrix (|BA| about 3% of
|W|), at λ = (1, 0.5, -0.5); the vectors and the merged models are seeded and kept under
~/.cache/alignvec/bench/live-1b. Measured in one run, interleaved rounds, best of each:

  live_tokens_per_s_vs_merged       {"1": ..., "3": ...}: ``LiveModel`` with one / three AVs over the same
                                    AVs merged into the base (``requant="same"``: the base's own types, so
                                    the merged model decodes with the base's kernels); tokens per CPU
                                    second of this process (``_wall``: by the wall clock)
  live_by_storage                   the same three AVs with their factors stored F32, F16 and Q8_0, and
                                    ``LiveModel(fold=True)`` (one rank-96 adapter, B scaled by each λ) on
                                    the F32 and the Q8_0 files
  live_one_by_storage               the one AV with its factors stored F32 and Q8_0
  llamacpp_lora_tokens_per_s_vs_merged  {"1": ..., "3": ...}: llama.cpp's own path, llama-server with the
                                    same adapters (``--lora ... --lora-init-without-apply``, per-request
                                    ``"lora"`` scales) over llama-server on the merged files, tokens
                                    per CPU second of the server process (a request for n + 1 tokens
                                    less one for 1 token: n decode steps); ``wall``: by its own timings
  knob_switch_ms                    a request at a new λ (prompt, 1 token): live with one and three AVs
                                    (and three folded, Q8_0, which rebuilds its adapter),
                                    llama-server with its adapter, loading the merged model from the
                                    cache, merging it first (default policy); and the same request at an
                                    unchanged λ (the floor all of them share)
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))


from alignvec_gguf import cached_merge, merge  # noqa: E402
from alignvec_gguf.cpu import new_llama  # noqa: E402
from alignvec_gguf.live import LiveModel  # noqa: E402
from tests.support import llamatools, synthetic  # noqa: E402
from tests.support.loopback import free_port, http, process, tail  # noqa: E402
from tests.support.measure import timed, tokens_per_s  # noqa: E402  (benchmarks/live.py's, at 48M)

RANK = 32
LAMBDAS = (1.0, 0.5, -0.5)
PROMPT = "the patient reports a persistent headache and"


class Servers:
    """llama-server processes on loopback, one per (model, adapters) pair."""

    def __init__(self, bindir: Path, threads: int, root: Path):
        self.bindir, self.threads, self.root = bindir, ["-t", str(threads), "-tb", str(threads)], root
        self.stack = contextlib.ExitStack()
        self.urls: dict[str, str] = {}
        self.procs: dict[str, Any] = {}

    def start(self, name: str, model: Path, loras: list[Path]) -> None:
        port = free_port()
        cmd: list[Any] = [self.bindir / "llama-server", "-m", model, "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["-c", "512", "-np", "1", "--no-warmup", *self.threads]
        for lora in loras:
            cmd += ["--lora", lora]
        if loras:
            cmd.append("--lora-init-without-apply")
        url = f"http://127.0.0.1:{port}"
        log = self.root / f"llama-server-{name}.log"
        self.procs[name] = self.stack.enter_context(process(cmd, f"{url}/health", log, timeout=300))
        self.urls[name] = url

    def cpu_seconds(self, name: str) -> float:
        """User + system CPU time of that server process so far (all its threads)."""
        fields = Path(f"/proc/{self.procs[name].pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.stack.close()

    def completion(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        status, out = http(f"{self.urls[name]}/completion", body, timeout=600)
        if status != 200:
            raise RuntimeError(
                f"llama-server ({name}) answered {status}: {out}; log: {tail(self.root / f'llama-server-{name}.log')}"
            )
        return dict(out)

    def decode_tokens_per_s(
        self, name: str, prompt: list[int], n: int, lambdas: tuple[float, ...] = ()
    ) -> tuple[float, float]:
        """Decode speed over ``n`` tokens: per CPU second of the server (a request for n + 1 tokens less one
        for 1, which leaves n decode steps), and per wall second by the server's own timings."""
        body: dict[str, Any] = {"prompt": prompt, "temperature": 0, "top_k": 1, "ignore_eos": True}
        body["cache_prompt"] = False
        if lambdas:
            body["lora"] = [{"id": i, "scale": lam} for i, lam in enumerate(lambdas)]
        c0 = self.cpu_seconds(name)
        self.completion(name, {**body, "n_predict": 1})
        c1 = self.cpu_seconds(name)
        timings = self.completion(name, {**body, "n_predict": n + 1})["timings"]
        c2 = self.cpu_seconds(name)
        cpu = (c2 - c1) - (c1 - c0)
        return n / cpu, float(timings["predicted_n"] - 1) / (float(timings["predicted_ms"]) / 1000)

    def request(self, name: str, lambdas: tuple[float, ...], cache_prompt: bool = True) -> None:
        body = {"prompt": PROMPT, "n_predict": 1, "temperature": 0, "cache_prompt": cache_prompt}
        self.completion(name, {**body, "lora": [{"id": i, "scale": lam} for i, lam in enumerate(lambdas)]})


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.ERROR)
    threads: dict[str, Any] = {"n_threads": args.threads, "n_threads_batch": args.threads}
    root = Path(tempfile.mkdtemp(prefix="alignvec-live1b-"))
    t0 = time.perf_counter()
    # benchmarks/cpu.py's cached TinyLlama-shaped Q4_K_M (its Q4_0 made beside it)
    bases = synthetic.drawn_quantized_bases(Path(args.workdir), "1b", synthetic.SHAPES["1b"], ("Q4_K_M", "Q4_0"))
    base = bases["Q4_K_M"]
    models = Path(args.workdir) / "live-1b"  # the vectors and merges below are seeded: built once, kept
    models.mkdir(parents=True, exist_ok=True)
    dims = synthetic.SHAPES["1b"]
    avs = {dtype: [models / f"v{i + 1}-{dtype}.avec.gguf" for i in range(3)] for dtype in ("f32", "f16", "q8_0")}
    for dtype, paths in avs.items():
        if not all(p.is_file() for p in paths):
            synthetic.write_lowrank_avs(paths, base, dims, rank=RANK, dtype=dtype)
    one, three = avs["f32"][:1], avs["f32"]
    mix1: dict[Any, float] = {one[0]: LAMBDAS[0]}
    mix3: dict[Any, float] = dict(zip(three, LAMBDAS, strict=True))
    merged1, merged3 = models / "merged1.gguf", models / "merged3.gguf"
    for path, mix in ((merged1, mix1), (merged3, mix3)):
        if not path.is_file():
            merge(base, mix, path, requant="same")
    print(
        f"1.1B Q4_K_M base {base.stat().st_size / 2**20:.0f} MiB, three rank-{RANK} AVs "
        f"({one[0].stat().st_size / 2**20:.0f} MiB each in F32) and their merges in {time.perf_counter() - t0:.0f} s"
    )

    names3 = ("v1", "v2", "v3")
    alignment3 = dict(zip(names3, LAMBDAS, strict=True))
    lives: dict[str, tuple[LiveModel, dict[str, float]]] = {
        "live1": (LiveModel(base, {"v1": one[0]}, n_ctx=512, **threads), {"v1": LAMBDAS[0]}),
        "live1_q8_0": (LiveModel(base, {"v1": avs["q8_0"][0]}, n_ctx=512, **threads), {"v1": LAMBDAS[0]}),
        "live3": (LiveModel(base, dict(zip(names3, three, strict=True)), n_ctx=512, **threads), alignment3),
        "live3_f16": (LiveModel(base, dict(zip(names3, avs["f16"], strict=True)), n_ctx=512, **threads), alignment3),
        "live3_q8_0": (LiveModel(base, dict(zip(names3, avs["q8_0"], strict=True)), n_ctx=512, **threads), alignment3),
        "live3_fold": (
            LiveModel(base, dict(zip(names3, three, strict=True)), n_ctx=512, fold=True, **threads),
            alignment3,
        ),
        "live3_fold_q8_0": (
            LiveModel(base, dict(zip(names3, avs["q8_0"], strict=True)), n_ctx=512, fold=True, **threads),
            alignment3,
        ),
    }
    plain = {
        "merged1": new_llama(str(merged1), n_ctx=512, verbose=False, **threads),
        "merged3": new_llama(str(merged3), n_ctx=512, verbose=False, **threads),
    }
    servers: Servers | None = None
    server_note = "skipped (--no-llama-server)"
    if not args.no_llama_server:
        try:
            bindir = llamatools.ensure(("llama-server",))
            servers = Servers(bindir, args.threads, root)
            atexit.register(servers.close)
            servers.start("lora1", base, one)
            servers.start("lora3", base, three)
            servers.start("merged1", merged1, [])
            servers.start("merged3", merged3, [])
            server_note = str(bindir)
        except (llamatools.ToolsUnavailable, AssertionError) as e:
            server_note = f"unavailable: {e}"
            servers = None
        print(f"llama.cpp's llama-server anchor: {server_note}")

    prompt = [1, 5, 17, 42, 99, 200, 7, 3]
    speeds: dict[str, list[tuple[float, float]]] = {}
    server_speeds: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.rounds):  # interleaved, so that a busy moment does not hit one side only
        for key, llm in plain.items():
            speeds.setdefault(key, []).append(tokens_per_s(llm, prompt, args.tokens))
        for key, (live, alignment) in lives.items():
            with live.using(alignment) as llm:
                speeds.setdefault(key, []).append(tokens_per_s(llm, prompt, args.tokens))
        if servers is not None:
            for key, lams in (("lora1", LAMBDAS[:1]), ("lora3", LAMBDAS), ("merged1", ()), ("merged3", ())):
                server_speeds.setdefault(key, []).append(servers.decode_tokens_per_s(key, prompt, args.tokens, lams))
    best = {k: max(c for c, _ in v) for k, v in speeds.items()}
    best_wall = {k: max(w for _, w in v) for k, v in speeds.items()}
    ratio = {"1": best["live1"] / best["merged1"], "3": best["live3"] / best["merged3"]}
    ratio_wall = {"1": best_wall["live1"] / best_wall["merged1"], "3": best_wall["live3"] / best_wall["merged3"]}
    by_storage = {k.removeprefix("live3_"): best[k] / best["merged3"] for k in lives if k.startswith("live3_")}
    by_storage["f32"] = ratio["3"]
    one_by_storage = {"f32": ratio["1"], "q8_0": best["live1_q8_0"] / best["merged1"]}
    print(
        f"decode tokens per CPU second: live, one AV {best['live1']:.1f} against merged {best['merged1']:.1f} "
        f"(x{ratio['1']:.3f}); three AVs {best['live3']:.1f} against {best['merged3']:.1f} (x{ratio['3']:.3f}); "
        f"wall clock x{ratio_wall['1']:.3f} / x{ratio_wall['3']:.3f}"
    )
    print("three AVs by storage, against merged: " + ", ".join(f"{k} x{v:.3f}" for k, v in by_storage.items()))
    print("one AV by storage, against merged: " + ", ".join(f"{k} x{v:.3f}" for k, v in one_by_storage.items()))
    anchor: dict[str, Any] = {"status": server_note}
    if servers is not None:
        bs = {k: max(c for c, _ in v) for k, v in server_speeds.items()}
        bw = {k: max(w for _, w in v) for k, v in server_speeds.items()}
        anchor = {
            "1": round(bs["lora1"] / bs["merged1"], 4),
            "3": round(bs["lora3"] / bs["merged3"], 4),
            "wall": {"1": round(bw["lora1"] / bw["merged1"], 4), "3": round(bw["lora3"] / bw["merged3"], 4)},
            "tokens_per_s": {k: round(v, 1) for k, v in bs.items()},
            "tokens_per_s_wall": {k: round(v, 1) for k, v in bw.items()},
        }
        print(
            f"llama-server, tokens per CPU second of the server: one adapter {bs['lora1']:.1f} against merged "
            f"{bs['merged1']:.1f} (x{anchor['1']:.3f}), three {bs['lora3']:.1f} against {bs['merged3']:.1f} "
            f"(x{anchor['3']:.3f}); by its own wall-clock timings x{bw['lora1'] / bw['merged1']:.3f} / "
            f"x{bw['lora3'] / bw['merged3']:.3f}"
        )

    # --- turning the knob: a request at a new λ ------------------------------------------------------
    new = [0.25 * (i + 1) * (-1) ** i for i in range(args.repeats)]  # a new λ every time
    switch: dict[str, float] = {}
    live1, _ = lives["live1"]
    live3, _ = lives["live3"]
    live1.generate(PROMPT, alignment={"v1": 2.0}, max_tokens=1)  # warm
    it = iter(new)
    switch["live_1"] = timed(lambda: live1.generate(PROMPT, alignment={"v1": next(it)}, max_tokens=1), args.repeats)
    it = iter(new)
    switch["live_3"] = timed(
        lambda: live3.generate(PROMPT, alignment=dict(zip(names3, (next(it), 0.5, -0.5), strict=True)), max_tokens=1),
        args.repeats,
    )

    def same_lambda() -> None:
        with live1.using({"v1": new[-1]}) as llm:
            llm.reset()  # the KV cache dropped, λ unchanged
            llm.create_completion(PROMPT, max_tokens=1, temperature=0.0)

    live3_fold, _ = lives["live3_fold_q8_0"]
    it = iter(new)
    switch["live_3_fold_q8_0"] = timed(
        lambda: live3_fold.generate(
            PROMPT, alignment=dict(zip(names3, (next(it), 0.5, -0.5), strict=True)), max_tokens=1
        ),
        args.repeats,
    )
    switch["same_lambda_live"] = timed(same_lambda, args.repeats)
    for live, _ in lives.values():
        live.close()
    for llm in plain.values():
        llm.close()
    if servers is not None:
        servers.request("lora1", (2.0,))  # warm
        it = iter(new)
        switch["llama_server_1"] = timed(lambda: servers.request("lora1", (next(it),)), args.repeats)
        switch["same_lambda_llama_server"] = timed(lambda: servers.request("lora1", (new[-1],), False), args.repeats)
        servers.close()
    cache = root / "cache"
    few = new[:2]
    for lam in few:
        cached_merge(base, {one[0]: lam}, cache_dir=cache)

    def load_and_request(path: Path) -> None:
        llm = new_llama(str(path), n_ctx=512, verbose=False, **threads)
        llm.create_completion(PROMPT, max_tokens=1, temperature=0.0)
        llm.close()

    it = iter(few)
    switch["cached_merge"] = timed(lambda: load_and_request(cached_merge(base, {one[0]: next(it)}, cache_dir=cache)), 2)
    switch["new_merge"] = timed(lambda: load_and_request(merge(base, {one[0]: 0.9}, root / "fresh.gguf").path), 1)
    print("knob switch (new λ, 1 token), ms: " + ", ".join(f"{k} {v:.0f}" for k, v in switch.items()))

    result = {
        "model": {"size": "1b", "params": synthetic.n_params(dims), "base": "Q4_K_M", "rank": RANK},
        "threads": args.threads,
        "lambdas": LAMBDAS,
        "live_tokens_per_s_vs_merged": {k: round(v, 4) for k, v in ratio.items()},
        "live_tokens_per_s_vs_merged_wall": {k: round(v, 4) for k, v in ratio_wall.items()},
        "llamacpp_lora_tokens_per_s_vs_merged": anchor,
        "live_by_storage_vs_merged": {k: round(v, 4) for k, v in by_storage.items()},
        "live_one_by_storage_vs_merged": {k: round(v, 4) for k, v in one_by_storage.items()},
        "tokens_per_s": {k: round(v, 1) for k, v in best.items()},
        "tokens_per_s_wall": {k: round(v, 1) for k, v in best_wall.items()},
        "knob_switch_ms": {k: round(v, 1) for k, v in switch.items()},
        "load_average": round(os.getloadavg()[0], 2),
    }
    if args.keep:
        print(f"kept {root}", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))
