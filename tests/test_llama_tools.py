"""llama.cpp's own tools, built from the pinned llama-cpp-python sdist (``tests/support/llamatools.py``), on what
alignvec writes: llama-server serving a merged GGUF, llama-server with low-rank AVs as LoRA adapters and λ per request,
and a merged model spread over llama.cpp's RPC backend. The oracle everywhere is greedy decoding by argmax over
llama-cpp-python's logits in this process. Loopback only; every server gets a few requests and a timeout.

They skip, saying so, until the tools are built: ``python -m tests.support.llamatools`` (once; about 40 minutes on 2
shared cores), or ``ALIGNVEC_LLAMA_TOOLS_BUILD=1`` to let these tests build them.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import alignvec_gguf as av
from alignvec_gguf.live import LiveModel
from tests.support import llamatools
from tests.support.loopback import free_port, http, process, tail

PROMPT = "the patient reports"
N_PREDICT = 16
THREADS = ["-t", "2", "-tb", "2"]


@pytest.fixture(scope="module")
def bindir() -> Path:
    try:
        build = os.environ.get("ALIGNVEC_LLAMA_TOOLS_BUILD") == "1"
        found = llamatools.ensure(("llama-server", "ggml-rpc-server"), build_missing=build)
    except llamatools.ToolsUnavailable as e:
        pytest.skip(str(e))
    rec = llamatools.record()
    if rec:
        print(f"llama.cpp tools in {found}, built in {rec['seconds_total']:.0f} s")  # shown with pytest -s
    return found


def greedy(llm: Any, prompt: str, n: int = N_PREDICT) -> list[int]:
    """Token ids of ``n`` greedy steps (argmax of the logits; stops at end of generation), from the prompt."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    llm.reset()
    llm.eval(llm.tokenize(prompt.encode(), add_bos=True))
    out: list[int] = []
    for _ in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        token = int(np.argmax(logits))
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        out.append(token)
        llm.eval([token])
    llm.reset()
    return out


@contextlib.contextmanager
def llama_server(bindir: Path, model: Path, log: Path, *args: str) -> Iterator[str]:
    """llama-server on 127.0.0.1 with ``model``; yields its base URL once /health answers."""
    port = free_port()
    cmd = [str(bindir / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-c", "256", "-np", "1", "--no-warmup", *THREADS, *args]
    with process(cmd, f"http://127.0.0.1:{port}/health", log, timeout=120):
        yield f"http://127.0.0.1:{port}"


def completion_tokens(url: str, log: Path, **extra: Any) -> list[int]:
    body = {"prompt": PROMPT, "n_predict": N_PREDICT, "temperature": 0, "top_k": 1, "return_tokens": True, **extra}
    status, out = http(f"{url}/completion", body, timeout=60)
    assert status == 200, f"{out}; server log: {tail(log)}"
    return list(out["tokens"])


@pytest.fixture(scope="module")
def mix(llama_pair, second_av) -> dict[Path, float]:
    return {llama_pair.av: 0.75, second_av[0]: -0.5}


@pytest.fixture(scope="module")
def merged_mix(llama_pair, mix, tmp_path_factory) -> tuple[Path, list[int]]:
    """The mix merged into a file, and the greedy tokens ``alignvec_gguf.load()`` of the same mix gives."""
    root = tmp_path_factory.mktemp("merged")
    path = root / "merged.gguf"
    av.merge(llama_pair.base_gguf, mix, path)
    llm = av.load(llama_pair.base_gguf, mix, cache_dir=root / "cache", n_ctx=256, verbose=False)
    expected = greedy(llm, PROMPT)
    llm.close()
    return path, expected


def test_llama_server_serves_a_merged_gguf_like_load(bindir, llama_pair, merged_mix, tmp_path):
    merged, expected = merged_mix
    base = av.load(llama_pair.base_gguf, {}, n_ctx=256, verbose=False)
    assert greedy(base, PROMPT) != expected  # the mix changes the answer, so equality below means something
    base.close()
    log = tmp_path / "llama-server.log"
    with llama_server(bindir, merged, log, "-v") as url:  # -v: the log says what the build has
        assert completion_tokens(url, log) == expected
        status, props = http(f"{url}/props")
        assert status == 200 and Path(props["model_path"]).name == "merged.gguf"
    # built without native tuning: explicit AVX2 and no AMX kernel (it crashes on Intel AMX CPUs)
    features = next(line for line in log.read_text(errors="replace").splitlines() if "system_info:" in line)
    assert "AVX2 = 1" in features and "AMX" not in features, features


# The README's commands: llama-server -m base --lora A --lora B --lora-init-without-apply, "lora" per request
SETTINGS = [(1.5, 0.0), (-1.0, 0.5), (0.0, 0.0), (1.5, 0.0)]  # the last one returns to the first


def test_llama_server_lora_scale_per_request_is_live_and_merged(bindir, llama_pair, lowrank_pair, tmp_path):
    medical, legal = lowrank_pair.lowrank_av, lowrank_pair.second_av
    live = LiveModel(llama_pair.base_gguf, {"medical": medical, "legal": legal}, n_ctx=256, n_threads_batch=2)
    expected = {}
    try:
        for lm, ll in [*SETTINGS, (1.0, 1.0)]:
            with live.using({"medical": lm, "legal": ll}) as llm:
                expected[(lm, ll)] = greedy(llm, PROMPT)
    finally:
        live.close()
    assert len({tuple(t) for t in expected.values()}) == 4  # four settings, four answers
    for (lm, ll), tokens in list(expected.items())[:2]:  # the merged model at those λ agrees with the live one
        merged = av.load(llama_pair.base_gguf, {medical: lm, legal: ll}, cache_dir=tmp_path / "c", n_ctx=256)
        assert greedy(merged, PROMPT) == tokens
        merged.close()

    log = tmp_path / "llama-server-lora.log"
    args = ["--lora", f"{medical},{legal}", "--lora-init-without-apply"]  # comma-separated: repeating is deprecated
    with llama_server(bindir, llama_pair.base_gguf, log, *args) as url:
        status, adapters = http(f"{url}/lora-adapters")
        assert status == 200
        # ids follow the order in --lora; the listed scale is the one a request without "lora" gets
        assert [(a["id"], Path(a["path"]).name, a["scale"]) for a in adapters] == [
            (0, medical.name, 1.0),
            (1, legal.name, 1.0),
        ]
        for lm, ll in SETTINGS:  # 4 requests
            lora = [{"id": 0, "scale": lm}, {"id": 1, "scale": ll}]
            assert completion_tokens(url, log, lora=lora) == expected[(lm, ll)], (lm, ll)
        # an adapter left out of "lora" is at 0
        assert completion_tokens(url, log, lora=[{"id": 0, "scale": 1.5}]) == expected[(1.5, 0.0)]
        # a request without "lora" gets every adapter at 1 (not the base), on a fresh prompt ...
        assert completion_tokens(url, log, cache_prompt=False) == expected[(1.0, 1.0)]
        # ... but after a request with "lora" it reuses that request's cached prompt, computed at the other λ:
        # the README says to send "lora" with every request. (If this fails, llama.cpp fixed it: update the README.)
        assert completion_tokens(url, log, lora=[{"id": 0, "scale": 1.5}]) == expected[(1.5, 0.0)]
        assert completion_tokens(url, log) not in (expected[(1.0, 1.0)], expected[(1.5, 0.0)])


def test_llama_server_lora_scaled_fixes_lambda_at_startup(bindir, llama_pair, lowrank_pair, tmp_path):
    medical = lowrank_pair.lowrank_av
    with LiveModel(llama_pair.base_gguf, {"medical": medical}, n_ctx=256, n_threads_batch=2) as live:
        with live.using({"medical": 0.5}) as llm:
            expected = greedy(llm, PROMPT)
        with live.using({}) as llm:
            assert greedy(llm, PROMPT) != expected
    log = tmp_path / "llama-server-scaled.log"
    with llama_server(bindir, llama_pair.base_gguf, log, "--lora-scaled", f"{medical}:0.5") as url:
        assert completion_tokens(url, log) == expected  # a request without "lora" gets the startup scale


def test_rpc_server_on_loopback_serves_a_merged_model_like_local(bindir, merged_mix, tmp_path):
    merged, expected = merged_mix
    rpc_port = free_port()
    rpc_cmd = [str(bindir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(rpc_port), "-t", "2"]
    rpc_log, log = tmp_path / "rpc-server.log", tmp_path / "llama-server-rpc.log"
    with process(rpc_cmd, ("127.0.0.1", rpc_port), rpc_log, timeout=60) as rpc:
        with llama_server(bindir, merged, log, "--rpc", f"127.0.0.1:{rpc_port}", "-ngl", "99", "-v") as url:
            assert completion_tokens(url, log) == expected
        text = log.read_text(errors="replace")
        # every layer and the weights went to the RPC device (llama-server's verbose log says where)
        assert re.search(r"offloaded (\d+)/\1 layers", text), tail(log)
        assert f"RPC0[127.0.0.1:{rpc_port}] model buffer size" in text, tail(log)
        assert rpc.poll() is None and "Accepted client connection" in rpc_log.read_text(), tail(rpc_log)
