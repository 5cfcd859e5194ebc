"""The OpenAI-compatible server over real HTTP on loopback: per-request alignment, listings, bad requests."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from alignvec_gguf.cli import main  # noqa: E402
from alignvec_gguf.server import create_app  # noqa: E402
from tests.support.loopback import serve_app  # noqa: E402

PROMPT = "the patient reports"


def request(url: str, body: Any = None, *, raw: bytes | None = None, timeout: float = 60) -> tuple[int, Any]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
            return r.status, (json.loads(text) if "json" in r.headers.get("Content-Type", "") else text)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def sse_events(text: str) -> list[Any]:
    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.fixture(scope="module")
def server(live):
    """uvicorn in a thread on a socket bound to 127.0.0.1 (an OS-chosen free port)."""
    with serve_app(create_app(live, model_id="tiny")) as url:
        yield url


def test_alignment_and_models_are_listed(server, lowrank_pair):
    status, body = request(f"{server}/v1/alignment")
    assert status == 200
    assert (body["lambda_min"], body["lambda_max"]) == (-1.5, 2.0)
    by_name = {v["name"]: v for v in body["data"]}
    assert list(by_name) == ["medical", "legal"]
    assert by_name["medical"]["rank"] == 16 and by_name["legal"]["rank"] == 8
    assert by_name["medical"]["domain"] == "medical" and by_name["medical"]["path"] == str(lowrank_pair.lowrank_av)
    assert "output_norm.weight" in by_name["medical"]["dropped"] and 0 < by_name["medical"]["rel_error"] < 1
    status, models = request(f"{server}/v1/models")
    assert status == 200 and models["data"][0]["id"] == "tiny"


def test_completions_take_alignment_per_request(server, live):
    texts = {}
    for lam in (1.5, -1.0, 1.5):
        body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "alignment": {"medical": lam}}
        status, out = request(f"{server}/v1/completions", body)
        assert status == 200 and out["model"] == "tiny" and out["alignment"] == {"medical": lam}
        assert texts.setdefault(lam, out["choices"][0]["text"]) == out["choices"][0]["text"]
    assert texts[1.5] != texts[-1.0]
    for lam, text in texts.items():  # what the live model gives in-process
        assert text == live.generate(PROMPT, alignment={"medical": lam}, max_tokens=16)
    status, out = request(f"{server}/v1/completions", {"prompt": PROMPT, "max_tokens": 16, "temperature": 0})
    assert status == 200 and out["choices"][0]["text"] == live.generate(PROMPT, max_tokens=16)


def test_chat_completions_take_alignment(server):
    body = {
        "messages": [{"role": "user", "content": "my knee hurts"}],
        "max_tokens": 8,
        "temperature": 0,
        "alignment": {"medical": 1.0, "legal": -0.5},
    }
    status, out = request(f"{server}/v1/chat/completions", body)
    assert status == 200 and out["choices"][0]["message"]["role"] == "assistant"
    assert out["alignment"] == {"medical": 1.0, "legal": -0.5}


def test_streaming_sends_the_same_text_as_server_sent_events(server):
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "alignment": {"legal": 2.0}}
    status, out = request(f"{server}/v1/completions", body)
    status_s, text = request(f"{server}/v1/completions", {**body, "stream": True})
    assert status == status_s == 200
    chunks = sse_events(text)
    assert "".join(c["choices"][0]["text"] for c in chunks) == out["choices"][0]["text"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    status, text = request(f"{server}/v1/chat/completions", chat)
    assert status == 200 and sse_events(text)


def test_a_client_that_leaves_mid_stream_does_not_block_the_server(server):
    body = {"prompt": PROMPT, "max_tokens": 100, "temperature": 0, "stream": True, "alignment": {"medical": 1}}
    req = urllib.request.Request(f"{server}/v1/completions", json.dumps(body).encode(), {"Content-Type": "x"})
    r = urllib.request.urlopen(req, timeout=30)
    r.readline()
    r.close()  # gone after the first chunk
    status, out = request(f"{server}/v1/completions", {"prompt": PROMPT, "max_tokens": 4}, timeout=30)
    assert status == 200 and out["usage"]["completion_tokens"] >= 1


def test_concurrent_requests_queue_and_all_succeed(server):
    results: list[int] = []

    def client(lam: float) -> None:
        body = {"prompt": PROMPT, "max_tokens": 8, "alignment": {"medical": lam}}
        results.append(request(f"{server}/v1/completions", body)[0])

    threads = [threading.Thread(target=client, args=(lam,)) for lam in (-1.0, 0.0, 0.5, 1.0, 2.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [200] * 5


@pytest.mark.parametrize(
    "path,body,param,needle",
    [
        (
            "completions",
            {"prompt": PROMPT, "alignment": {"surgery": 1}},
            "alignment",
            "unknown alignment vector 'surgery'; this model has: medical, legal",
        ),
        (
            "completions",
            {"prompt": PROMPT, "alignment": {"medical": 2.5}},
            "alignment",
            "outside the allowed range [-1.5, 2]",
        ),
        ("completions", {"prompt": PROMPT, "alignment": {"legal": -3}}, "alignment", "outside the allowed range"),
        ("completions", {"prompt": PROMPT, "alignment": {"medical": "max"}}, "alignment", "must be a number"),
        ("completions", {"prompt": PROMPT, "alignment": [["medical", 1]]}, "alignment", "alignment must be an object"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "alignment": {"x": 1}},
            "alignment",
            "unknown alignment vector 'x'",
        ),
        ("completions", {"alignment": {"medical": 1}}, "prompt", "prompt must be a string"),
        ("completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens", "max_tokens must be between 1 and"),
        ("completions", {"prompt": PROMPT, "max_tokens": "ten"}, "max_tokens", "max_tokens must be int"),
        ("completions", {"prompt": PROMPT, "temperature": True}, "temperature", "temperature must be"),
        ("completions", {"prompt": PROMPT, "n": 2}, "n", "n must be 1"),
        ("completions", {"prompt": PROMPT, "stop": [1, 2]}, "stop", "stop must be a string or a list of strings"),
        ("chat/completions", {"messages": []}, "messages", "messages must be a non-empty list"),
        ("chat/completions", {"messages": [{"role": "user"}]}, "messages", "messages[0] must be"),
        ("completions", [1, 2], None, "must be a JSON object"),
    ],
)
def test_bad_requests_get_400_with_a_clear_message(server, path, body, param, needle):
    status, out = request(f"{server}/v1/{path}", body)
    assert status == 400, out
    assert needle in out["error"]["message"]
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["param"] == param


def test_invalid_json_and_too_long_prompts_get_400(server):
    status, out = request(f"{server}/v1/completions", raw=b"{not json")
    assert status == 400 and "not valid JSON" in out["error"]["message"]
    status, out = request(f"{server}/v1/completions", {"prompt": "the court ruled " * 200, "max_tokens": 4})
    assert status == 400 and "context" in out["error"]["message"]


def test_cli_serve_refuses_bad_vectors_in_one_line(llama_pair, lowrank_pair, capsys, tmp_path):
    base = str(llama_pair.base_gguf)
    for spec, needle in [
        (f"medical={tmp_path / 'missing.avec.gguf'}", "does not exist"),
        ("no-such-file", "expected NAME=PATH"),
        (f"medical={lowrank_pair.full_av}", "full form; live knobs need the low-rank form"),
    ]:
        assert main(["-q", "serve", base, "-v", spec]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    args = ["-q", "serve", base, "-v", f"a={lowrank_pair.lowrank_av}", "-v", f"b={lowrank_pair.second_av}"]
    assert main([*args, "--lambda-min", "1"]) == 2
    assert "include 0" in capsys.readouterr().err


def test_cli_serve_end_to_end(llama_pair, lowrank_pair):
    with socket.socket() as s:  # a free port for the subprocess (it binds by itself)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "alignvec_gguf.cli", "-q", "serve", str(llama_pair.base_gguf)]
    cmd += ["-v", str(lowrank_pair.lowrank_av), "-v", f"legal={lowrank_pair.second_av}", "--port", str(port)]
    cmd += ["--ctx", "128"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        body = None
        for _ in range(300):  # bounded: 30 s
            try:
                status, body = request(f"http://127.0.0.1:{port}/v1/alignment", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.1)
        assert body is not None and [v["name"] for v in body["data"]] == ["medical", "legal"]
        status, out = request(
            f"http://127.0.0.1:{port}/v1/completions",
            {"prompt": PROMPT, "max_tokens": 4, "alignment": {"medical": 1, "legal": -1}},
        )
        assert status == 200 and out["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# Exports for other runtimes (Ollama cannot run here: the Modelfile is checked line by line).


def test_merge_modelfile_points_ollama_at_the_merged_gguf(llama_pair, lowrank_pair, quantized_bases, tmp_path, capsys):
    out = tmp_path / "medical half.gguf"
    args = ["-q", "merge", str(quantized_bases["Q8_0"]), "-v", f"{lowrank_pair.lowrank_av}=0.5", "-o", str(out)]
    assert main([*args, "--modelfile"]) == 0
    modelfile = tmp_path / "medical half.Modelfile"
    assert f"wrote {modelfile}" in capsys.readouterr().out
    lines = modelfile.read_text().splitlines()
    assert 'FROM "./medical half.gguf"' in lines
    assert any(line.startswith("# base: base-Q8_0.gguf; alignment: medical λ=0.5") for line in lines)
    assert all(line.startswith(("#", "FROM")) for line in lines)


def test_write_modelfile_with_adapters_and_parameters(llama_pair, lowrank_pair, tmp_path):
    from alignvec_gguf.errors import InputError
    from alignvec_gguf.export import write_modelfile

    path = write_modelfile(
        llama_pair.base_gguf,
        tmp_path / "tiny.Modelfile",
        adapters=[lowrank_pair.lowrank_av],
        parameters={"temperature": 0.2, "stop": ["</s>", "User:"]},
        system="You answer as a medical expert.",
    )
    lines = path.read_text().splitlines()
    assert f"FROM {llama_pair.base_gguf.resolve()}" in lines  # not beside the Modelfile: absolute
    assert f"ADAPTER {lowrank_pair.lowrank_av.resolve()}" in lines
    assert lines[-4:] == [
        "PARAMETER temperature 0.2",
        "PARAMETER stop </s>",
        "PARAMETER stop User:",
        'SYSTEM """You answer as a medical expert."""',
    ]
    with pytest.raises(InputError, match="is an adapter, not a model"):
        write_modelfile(lowrank_pair.lowrank_av, tmp_path / "x.Modelfile")


def test_the_playground_is_one_self_contained_page(server):
    import re

    with urllib.request.urlopen(f"{server}/", timeout=30) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
        page = r.read().decode()
    # nothing fetched from elsewhere (the user may be offline): no external scripts, styles, fonts or images
    assert not re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page)
    assert "@import" not in page and "url(http" not in page
    assert re.findall(r"""fetch\((["'`])([^"'`]*)""", page) == [('"', "/v1/alignment")]
    status, info = request(f"{server}/v1/alignment")
    assert status == 200 and info["chat_template"] is False  # the tiny model has none: the page prompts plainly


def test_an_internal_value_error_is_a_500_with_a_logged_traceback(server, live, monkeypatch, caplog):
    """Only llama-cpp-python's request errors are 400; a ValueError from a bug is the server's 500, logged."""
    import logging

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("operands could not be broadcast together")  # e.g. a numpy shape bug

    monkeypatch.setattr(live, "create_completion", broken)
    with caplog.at_level(logging.ERROR, logger="alignvec_gguf.server"):
        status, out = request(f"{server}/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert status == 500, out
    assert out["error"]["type"] == "server_error" and "broadcast" in out["error"]["message"]
    logged = [r for r in caplog.records if r.name == "alignvec_gguf.server" and r.exc_info]
    assert logged and logged[0].exc_info[0] is ValueError
    monkeypatch.undo()
    status, out = request(f"{server}/v1/completions", {"prompt": "the court ruled " * 200, "max_tokens": 4})
    assert status == 400 and "context" in out["error"]["message"]  # the request's fault stays 400


def test_request_value_errors_are_told_apart_from_bugs():
    from alignvec_gguf.server import is_request_error

    assert is_request_error(ValueError("Requested tokens (900) exceed context window of 512"))
    assert is_request_error(ValueError("Unsupported role: robot"))
    assert not is_request_error(ValueError("operands could not be broadcast together"))
    assert not is_request_error(ValueError("Model path does not exist: x.gguf"))
