"""Live knobs against merged models: decode speed, the cost of turning the knob, and low-rank fidelity.

Long module: one benchmark whose measurements share their models and servers (the live knob, the merged
files, llama-server's LoRA and RPC anchors), and one JSON line built from all of them.

Builds a tiny but K-quant-sized Llama (transformers, random weights; hidden 1024, 4 layers, every row
a multiple of 256 so Q4_K really applies) and an aligned model whose Δ per matrix is rank 16 plus
Gaussian noise (about 11% of ‖Δ‖²; norms move too), so that the rank of the low-rank form matters.
Converts the base with llama.cpp's converter and quantizer (F32 and Q4_K_M), the AV in the full form
and in the low-rank form at ranks 8, 32 and 128, and measures:

  live_tokens_per_s_vs_merged   decode speed, base Q4_K_M + rank-32 AV as a runtime adapter at λ=1,
                                over the same AV merged into the Q4_K_M base at λ=1 (requant same);
                                tokens per CPU second of this process, best of interleaved rounds,
                                which a busy shared machine disturbs far less than the wall clock
                                (the wall-clock ratio is live_tokens_per_s_vs_merged_wall);
                                live_tokens_per_s_by_rank gives the live speed for every rank, and
                                live_tokens_per_s_vs_merged_f16 the same ratio with the rank-32 pairs
                                stored as F16 (--dtype f16: half the adapter's memory traffic)
  knob_switch_ms_live           a request at a new λ on the live model: set adapter scales, drop the
                                KV cache, evaluate the prompt, one token
  knob_switch_ms_cached_merge   the same request by loading the merged model for that λ from the cache
  knob_switch_ms_new_merge      ... by merging it first (dequantize, add, requantize), then loading
  request_ms_same_lambda        the floor all three share: the same request at an unchanged λ with the
                                KV cache dropped (so knob_switch_ms_live minus this is the switch itself)
  ranks.R                       the rank-R form against the full form at λ=1 on the F32 base:
                                size_ratio (file bytes, both F32), rel_error (Frobenius, over matrices),
                                kl (mean KL(full ‖ rank R) of next-token distributions), shift_share
                                and shift_cosine (the λ-shift of the logits against the full form's),
                                top1 (argmax agreement)
  dropped_only                  the same for the full-rank matrices without the norms that a LoRA
                                cannot carry: the measured effect of alignvec.lora.dropped
  q4_k_m_shift_share_*          the share of the F32 rank-32 logit shift that survives on Q4_K_M, live
                                (the adapter is applied in float) and merged with requant same
  llama_server.*                the anchor: llama.cpp's own llama-server (built from the pinned sdist by
                                tests/llamatools.py, cached) with the same rank-32 AV as a LoRA
                                (--lora-init-without-apply, "lora": [{"id": 0, "scale": λ}] per request),
                                against llama-server serving the merged model: decode tokens/s from the
                                server's own timings (wall clock, best of the same interleaved rounds),
                                lora_tokens_per_s_vs_merged beside live_tokens_per_s_vs_merged_wall;
                                knob_switch_ms (an HTTP request at a new λ, 1 token, as above) and
                                request_ms_same_lambda (unchanged λ, prompt recomputed: its floor)
  rpc.*                         the merged model through llama.cpp's RPC backend on loopback
                                (ggml-rpc-server on 127.0.0.1, llama-server --rpc ... -ngl 99): decode
                                tokens/s and ms per token against the same llama-server without RPC

--size 1b runs benchmarks/live_1b.py instead: one and three rank-32 AVs on a TinyLlama-shaped 1.1B Q4_K_M
(cached under ~/.cache/alignvec/bench), against the merged models and llama-server's own LoRA path in the
same run; its docstring lists what it reports.

Usage: python benchmarks/live.py [--size 48m|1b] [--tokens 128] [--threads N] [--hidden 1024] [--layers 4]
[--repeats 7] [--no-llama-server]. Needs the test extras (pip install -e '.[convert,dev]'); the first run
builds llama.cpp's tools (minutes, once; one line says so where that is impossible). The last line is JSON.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_cpp import Llama  # noqa: E402

from alignvec_gguf import AlignmentVector, cached_merge, merge, write_av  # noqa: E402
from alignvec_gguf.cpu import new_llama  # noqa: E402
from alignvec_gguf.live import LiveModel  # noqa: E402
from converters import convert  # noqa: E402
from tests.support import llamatools  # noqa: E402
from tests.support import tinymodels as tm  # noqa: E402
from tests.support.loopback import free_port, http, process, tail  # noqa: E402
from tests.support.measure import timed, tokens_per_s  # noqa: E402

RANKS = (8, 32, 128)
LIVE_RANK = 32
PROMPT = "the patient reports a persistent headache and"


def sequences(n: int = 4, length: int = 32, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(3, tm.VOCAB, length - 1).tolist()] for _ in range(n)]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def llama_scores(llm: Llama, seqs: list[list[int]]) -> np.ndarray:
    out = []
    for seq in seqs:
        llm.reset()
        llm.eval(seq)
        out.append(np.array(llm.scores[: len(seq)], dtype=np.float32))
    return np.concatenate(out)


def model_scores(path: Path, seqs: list[list[int]], threads: dict[str, Any]) -> np.ndarray:
    llm = new_llama(str(path), n_ctx=128, logits_all=True, verbose=False, **threads)
    try:
        return llama_scores(llm, seqs)
    finally:
        llm.close()


def live_scores(base: Path, av: Path, lam: float, seqs: list[list[int]], threads: dict[str, Any]) -> np.ndarray:
    with LiveModel(base, {"v": av}, n_ctx=128, logits_all=True, **threads) as live:
        with live.using({"v": lam}) as llm:
            return llama_scores(llm, seqs)


def fidelity(ref: np.ndarray, got: np.ndarray, base: np.ndarray) -> dict[str, float]:
    """How ``got`` reproduces ``ref`` (the full form), with the base's logits as the zero of the shift."""
    p_log, q_log = log_softmax(ref.astype(np.float64)), log_softmax(got.astype(np.float64))
    kl = float(np.mean(np.sum(np.exp(p_log) * (p_log - q_log), axis=-1)))
    ref_shift, shift = ref - base, got - base
    share = float((shift * ref_shift).sum() / (ref_shift**2).sum())
    cos = float((shift * ref_shift).sum() / np.linalg.norm(shift) / np.linalg.norm(ref_shift))
    top1 = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
    return {"kl": round(kl, 5), "shift_share": round(share, 4), "shift_cosine": round(cos, 4), "top1": round(top1, 4)}


def without_dropped(full: Path, out: Path) -> Path:
    """The full form minus what a LoRA cannot carry (1-D tensors): isolates the dropped tensors' effect."""
    av = AlignmentVector(full)
    keep = [n for n in av.names if len(av.shape(n)) >= 2]
    write_av(out, av.info.architecture, ((n, av.delta(n)) for n in keep), av.info)
    return out


class LlamaServers:
    """llama.cpp's own servers on loopback for the anchor: llama-server with the AV as a LoRA adapter (λ per
    request), llama-server on the merged model, and the merged model again through ggml-rpc-server."""

    def __init__(self, bindir: Path, base: Path, av: Path, merged: Path, threads: int, root: Path):
        self.bindir, self.base, self.av, self.merged, self.root = bindir, base, av, merged, root
        self.threads = ["-t", str(threads), "-tb", str(threads)]
        self.rpc_threads = str(threads)
        self.stack = contextlib.ExitStack()
        self.urls: dict[str, str] = {}

    def __enter__(self) -> LlamaServers:
        rpc_port = free_port()
        rpc = [self.bindir / "ggml-rpc-server", "-H", "127.0.0.1", "-p", str(rpc_port), "-t", self.rpc_threads]
        self.stack.enter_context(process(rpc, ("127.0.0.1", rpc_port), self.root / "rpc-server.log", timeout=60))
        lora = ["--lora", str(self.av), "--lora-init-without-apply"]
        for name, model, extra in [
            ("lora", self.base, lora),
            ("merged", self.merged, []),
            ("rpc", self.merged, ["--rpc", f"127.0.0.1:{rpc_port}", "-ngl", "99"]),
        ]:
            port = free_port()
            cmd = [self.bindir / "llama-server", "-m", model, "--host", "127.0.0.1", "--port", str(port)]
            cmd += ["-c", "512", "-np", "1", "--no-warmup", *self.threads, *extra]
            url = f"http://127.0.0.1:{port}"
            self.stack.enter_context(process(cmd, f"{url}/health", self.root / f"llama-server-{name}.log"))
            self.urls[name] = url
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def completion(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        status, out = http(f"{self.urls[name]}/completion", body, timeout=300)
        if status != 200:
            log = self.root / f"llama-server-{name}.log"
            raise RuntimeError(f"llama-server ({name}) answered {status}: {out}; log: {tail(log)}")
        return dict(out)

    def decode_tokens_per_s(self, name: str, prompt: list[int], n: int, lam: float | None = None) -> float:
        """Decode speed by the server's own timings (the prompt excluded), over exactly ``n`` tokens."""
        body: dict[str, Any] = {"prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1, "ignore_eos": True}
        body["cache_prompt"] = False
        if lam is not None:
            body["lora"] = [{"id": 0, "scale": lam}]
        timings = self.completion(name, body)["timings"]
        return float(timings["predicted_n"]) / (float(timings["predicted_ms"]) / 1000)

    def request(self, lam: float, cache_prompt: bool = True) -> None:
        body = {"prompt": PROMPT, "n_predict": 1, "temperature": 0, "lora": [{"id": 0, "scale": lam}]}
        self.completion("lora", {**body, "cache_prompt": cache_prompt})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per decode-speed run")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="llama.cpp threads, for decoding and for prompts alike (default 1: on a busy machine ggml's "
        "thread barriers turn a 10-token prompt from milliseconds into seconds)",
    )
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (a multiple of 256)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7, help="knob switches timed per method (best of)")
    parser.add_argument("--keep", action="store_true", help="keep the models and vectors (printed directory)")
    parser.add_argument("--rounds", type=int, default=5, help="decode-speed rounds, interleaved (best of)")
    parser.add_argument("--no-llama-server", action="store_true", help="skip llama.cpp's llama-server anchor")
    parser.add_argument("--size", choices=("48m", "1b"), default="48m", help="1b: benchmarks/live_1b.py")
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "alignvec" / "bench"), help="1b: model cache")
    args = parser.parse_args()
    if args.size == "1b":
        import live_1b

        if args.repeats == parser.get_default("repeats"):
            args.repeats = 3
        if args.rounds == parser.get_default("rounds"):
            args.rounds = 3
        live_1b.main(args)
        return
    logging.basicConfig(level=logging.ERROR)  # the merges' requantization warnings are expected here
    threads: dict[str, Any] = {"n_threads": args.threads, "n_threads_batch": args.threads}
    root = Path(tempfile.mkdtemp(prefix="alignvec-live-"))
    src = tm.llama_cpp_source(Path(__file__).resolve().parent.parent / ".cache")

    # --- models: base, aligned with a low-rank-plus-noise Δ, GGUFs, AVs -------------------------------
    start = time.perf_counter()
    tok = tm.train_tokenizer(root / "tok")
    config = tm.llama_config(
        hidden=args.hidden,
        intermediate_size=(11 * args.hidden // 4) // 256 * 256,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    base = tm.make_model(config, 0)
    aligned = tm.lowrank_perturbed(base, 1, rank=16, scale=0.15, noise=0.35)
    base_dir = tm.save(base, None, root / "base", tok)
    aligned_dir = tm.save(base, aligned, root / "aligned", tok)
    f32 = tm.hf_to_gguf(src, base_dir, root / "base-f32.gguf")
    q4 = tm.quantize_gguf(f32, root / "base-Q4_K_M.gguf", "MOSTLY_Q4_K_M")
    full = convert(base_dir, aligned_dir, root / "full.avec.gguf", name="v").path
    lowrank = {r: convert(base_dir, aligned_dir, root / f"r{r}.avec.gguf", name="v", rank=r) for r in RANKS}
    params = sum(p.numel() for p in base.parameters())
    print(f"built a {params / 1e6:.1f} M-parameter Llama (hidden {args.hidden}, {args.layers} layers) and its AVs "
          f"in {time.perf_counter() - start:.0f}s; Q4_K_M base {q4.stat().st_size / 2**20:.1f} MiB")  # fmt: skip

    # --- fidelity of each rank against the full form, at λ = 1 on the F32 base ------------------------
    seqs = sequences()
    base_logits = model_scores(f32, seqs, threads)
    ref = model_scores(merge(f32, {full: 1.0}, root / "m-full.gguf").path, seqs, threads)
    ranks: dict[str, dict[str, float]] = {}
    for r, report in lowrank.items():
        assert report.lowrank is not None
        got = live_scores(f32, report.path, 1.0, seqs, threads)
        ranks[str(r)] = {
            "size_ratio": round(report.path.stat().st_size / full.stat().st_size, 4),
            "rel_error": round(report.lowrank.rel_error, 4),
            **fidelity(ref, got, base_logits),
        }
        print(f"rank {r:3}: size x{ranks[str(r)]['size_ratio']:.3f} of the full form, {ranks[str(r)]}")
    nodrop = without_dropped(full, root / "full-no-norms.avec.gguf")
    nodrop_logits = model_scores(merge(f32, {nodrop: 1.0}, root / "m-nd.gguf").path, seqs, threads)
    dropped_only = fidelity(ref, nodrop_logits, base_logits)
    print(f"full-rank matrices without the dropped norms: {dropped_only}")
    knob_kl = fidelity(ref, base_logits, ref)["kl"]  # the shift terms are moot here: only the KL is kept
    print(f"(for scale, the base itself against the full form at λ=1: kl {knob_kl})")

    # --- the knob on Q4_K_M: live (adapter in float) against merged (requantized) -----------------------
    av = lowrank[LIVE_RANK].path
    f32_live = live_scores(f32, av, 1.0, seqs, threads)
    q4_base = model_scores(q4, seqs, threads)
    q4_live = live_scores(q4, av, 1.0, seqs, threads)
    q4_merged_path = merge(q4, {av: 1.0}, root / "m-q4.gguf").path
    q4_merged = model_scores(q4_merged_path, seqs, threads)
    ref_shift = f32_live - base_logits
    share_live = float(((q4_live - q4_base) * ref_shift).sum() / (ref_shift**2).sum())
    share_merged = float(((q4_merged - q4_base) * ref_shift).sum() / (ref_shift**2).sum())
    print(f"Q4_K_M, rank {LIVE_RANK}: share of the F32 λ-shift kept live {share_live:.3f}, merged {share_merged:.3f}")

    # --- decode speed: live adapter against the merged model ------------------------------------------
    prompt = [1, 5, 17, 42, 99, 200, 7, 3]
    f16 = convert(base_dir, aligned_dir, root / f"r{LIVE_RANK}-f16.avec.gguf", name="v", rank=LIVE_RANK, dtype="f16")
    lives: dict[int | str, LiveModel] = {r: LiveModel(q4, {"v": lowrank[r].path}, n_ctx=512, **threads) for r in RANKS}
    lives["f16"] = LiveModel(q4, {"v": f16.path}, n_ctx=512, **threads)
    merged_llm = new_llama(str(q4_merged_path), n_ctx=512, verbose=False, **threads)
    servers: LlamaServers | None = None
    server_note = "skipped (--no-llama-server)"
    if not args.no_llama_server:
        try:
            t0 = time.perf_counter()
            bindir = llamatools.ensure(("llama-server", "ggml-rpc-server"))
            built = llamatools.record() or {}
            server_note = f"{bindir} (built in {built.get('seconds_total', float('nan')):.0f} s once; this run waited "
            server_note += f"{time.perf_counter() - t0:.0f} s)"
            servers = LlamaServers(bindir, q4, lowrank[LIVE_RANK].path, q4_merged_path, args.threads, root)
            atexit.register(servers.__exit__)  # stopped below; this is for a run that fails on the way
            servers.__enter__()
        except (llamatools.ToolsUnavailable, AssertionError) as e:
            server_note = f"unavailable: {e}"
            servers = None
        print(f"llama.cpp's llama-server anchor: {server_note}")
    server_speeds: dict[str, list[float]] = {}
    speeds: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.rounds):  # interleaved, so that a busy moment does not hit one side only
        if servers is not None:
            server_speeds.setdefault("lora", []).append(servers.decode_tokens_per_s("lora", prompt, args.tokens, 1.0))
            server_speeds.setdefault("merged", []).append(servers.decode_tokens_per_s("merged", prompt, args.tokens))
            server_speeds.setdefault("rpc", []).append(servers.decode_tokens_per_s("rpc", prompt, args.tokens))
        speeds.setdefault("merged", []).append(tokens_per_s(merged_llm, prompt, args.tokens))
        for key, live in lives.items():
            with live.using({"v": 1.0}) as llm:
                speeds.setdefault(f"r{key}", []).append(tokens_per_s(llm, prompt, args.tokens))
        with lives[LIVE_RANK].using({}) as llm:
            speeds.setdefault("base", []).append(tokens_per_s(llm, prompt, args.tokens))
    merged_llm.close()
    for live in lives.values():
        live.close()
    best = {k: max(cpu for cpu, _ in v) for k, v in speeds.items()}
    best_wall = {k: max(wall for _, wall in v) for k, v in speeds.items()}
    live_tps, merged_tps, base_tps = best[f"r{LIVE_RANK}"], best["merged"], best["base"]
    ratio_wall = best_wall[f"r{LIVE_RANK}"] / best_wall["merged"]
    ratio = live_tps / merged_tps
    by_rank = ", ".join(f"rank {r} {best[f'r{r}']:.1f}" for r in RANKS)
    print(
        f"decode tokens per CPU second on Q4_K_M: live {live_tps:.1f}, merged {merged_tps:.1f} (x{ratio:.3f}), "
        f"base {base_tps:.1f}; wall clock x{ratio_wall:.3f}"
    )
    ratio_f16 = best["rf16"] / merged_tps
    print(f"live decode tokens/s by rank: {by_rank}; rank {LIVE_RANK} stored as F16: x{ratio_f16:.3f} of merged")

    # --- turning the knob: a request at a new λ --------------------------------------------------------
    lambdas = [0.25 * (i + 1) * (-1) ** i for i in range(args.repeats)]  # a new λ every time
    cache = root / "cache"

    def request(llm: Llama) -> None:
        llm.create_completion(PROMPT, max_tokens=1, temperature=0.0)

    with LiveModel(q4, {"v": av}, n_ctx=512, **threads) as live:
        live.generate(PROMPT, alignment={"v": 2.0}, max_tokens=1)  # warm
        it = iter(lambdas)
        switch_live = timed(lambda: live.generate(PROMPT, alignment={"v": next(it)}, max_tokens=1), args.repeats)

        def same_lambda() -> None:
            with live.using({"v": lambdas[-1]}) as llm:
                llm.reset()  # the KV cache dropped, λ unchanged
                request(llm)

        floor = timed(same_lambda, args.repeats)
    for lam in lambdas:  # the cache holds every mix already
        cached_merge(q4, {av: lam}, cache_dir=cache)

    def load_and_request(path: Path) -> None:
        llm = new_llama(str(path), n_ctx=512, verbose=False, **threads)
        request(llm)
        llm.close()

    it = iter(lambdas)
    switch_cached = timed(lambda: load_and_request(cached_merge(q4, {av: next(it)}, cache_dir=cache)), args.repeats)
    it = iter(lambdas)
    fresh = root / "fresh"
    switch_new = timed(
        lambda: load_and_request(merge(q4, {av: next(it)}, fresh.with_suffix(".gguf")).path), args.repeats
    )
    print(f"knob switch (new λ, 1 token): live {switch_live:.1f} ms, cached merge {switch_cached:.1f} ms, "
          f"new merge {switch_new:.1f} ms; the same request at an unchanged λ: {floor:.1f} ms")  # fmt: skip

    anchor: dict[str, Any] = {"status": server_note}
    rpc: dict[str, Any] = {"status": server_note}
    if servers is not None:
        try:
            servers.request(2.0)  # warm
            it = iter(lambdas)
            server_switch = timed(lambda: servers.request(next(it)), args.repeats)
            server_floor = timed(lambda: servers.request(lambdas[-1], cache_prompt=False), args.repeats)
        finally:
            servers.__exit__()
        best_server = {k: max(v) for k, v in server_speeds.items()}
        anchor = {
            "lora_tokens_per_s": round(best_server["lora"], 1),
            "merged_tokens_per_s": round(best_server["merged"], 1),
            "lora_tokens_per_s_vs_merged": round(best_server["lora"] / best_server["merged"], 4),
            "knob_switch_ms": round(server_switch, 2),
            "request_ms_same_lambda": round(server_floor, 2),
        }
        rpc = {
            "tokens_per_s": round(best_server["rpc"], 1),
            "local_tokens_per_s": round(best_server["merged"], 1),
            "ms_per_token": round(1000 / best_server["rpc"], 2),
            "local_ms_per_token": round(1000 / best_server["merged"], 2),
            "added_ms_per_token": round(1000 / best_server["rpc"] - 1000 / best_server["merged"], 2),
        }
        print(
            f"llama-server, rank-{LIVE_RANK} LoRA with λ per request: {anchor['lora_tokens_per_s']} tokens/s against "
            f"{anchor['merged_tokens_per_s']} merged (x{anchor['lora_tokens_per_s_vs_merged']:.3f}; alignvec's live "
            f"x{ratio_wall:.3f} by the same wall clock: {best_wall[f'r{LIVE_RANK}']:.1f} against "
            f"{best_wall['merged']:.1f}); knob switch {server_switch:.1f} ms over HTTP, "
            f"{server_floor:.1f} ms at an unchanged λ"
        )
        print(
            f"RPC on loopback: {rpc['tokens_per_s']} tokens/s against {rpc['local_tokens_per_s']} local "
            f"({rpc['ms_per_token']} against {rpc['local_ms_per_token']} ms per token: +{rpc['added_ms_per_token']} ms)"
        )

    result = {
        "model": {"params_m": round(params / 1e6, 1), "hidden": args.hidden, "layers": args.layers, "base": "Q4_K_M"},
        "live_rank": LIVE_RANK,
        "live_tokens_per_s_vs_merged": round(ratio, 4),
        "live_tokens_per_s_vs_merged_wall": round(ratio_wall, 4),
        "live_tokens_per_s_vs_merged_f16": round(ratio_f16, 4),
        "live_tokens_per_s": round(live_tps, 1),
        "merged_tokens_per_s": round(merged_tps, 1),
        "base_tokens_per_s": round(base_tps, 1),
        "live_tokens_per_s_wall": round(best_wall[f"r{LIVE_RANK}"], 1),  # the clock llama-server's timings use
        "merged_tokens_per_s_wall": round(best_wall["merged"], 1),
        "knob_switch_ms_live": round(switch_live, 2),
        "knob_switch_ms_cached_merge": round(switch_cached, 2),
        "knob_switch_ms_new_merge": round(switch_new, 2),
        "request_ms_same_lambda": round(floor, 2),
        "live_tokens_per_s_by_rank": {str(r): round(best[f"r{r}"], 1) for r in RANKS},
        "ranks": ranks,
        "dropped_only": dropped_only,
        "base_vs_full_kl": knob_kl,
        "q4_k_m_shift_share_live": round(share_live, 4),
        "q4_k_m_shift_share_merged_same": round(share_merged, 4),
        "llama_server": anchor,
        "rpc": rpc,
    }
    if args.keep:
        print(f"kept {root}", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
