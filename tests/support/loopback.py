"""Servers on 127.0.0.1 for the tests: an ASGI app in a thread, or a server process, each with bounded waits."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def tiny_live(llama_pair: Any, lowrank_pair: Any, n_ctx: int = 128) -> Any:
    """The servers' LiveModel on the tiny session models: "medical" and "legal" low-rank vectors, λ in [-1.5, 2]."""
    from alignvec_gguf.live import LiveModel

    return LiveModel(
        llama_pair.base_gguf,
        {"medical": lowrank_pair.lowrank_av, "legal": lowrank_pair.second_av},
        lambda_range=(-1.5, 2.0),
        n_ctx=n_ctx,
        n_threads_batch=1,
    )


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (for a process that binds by itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_app(app: Any, timeout: float = 10) -> Iterator[str]:
    """Run the ASGI ``app`` with uvicorn in a thread on an OS-chosen loopback port; yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def http(url: str, body: Any = None, *, timeout: float = 60) -> tuple[int, Any]:
    """POST ``body`` as JSON (GET without one); the status and the decoded JSON (or text) answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def _ready(ready: str | tuple[str, int]) -> bool:
    try:
        if isinstance(ready, tuple):
            with socket.create_connection(ready, timeout=2):
                return True
        return http(ready, timeout=2)[0] == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@contextmanager
def process(
    cmd: Sequence[object], ready: str | tuple[str, int], log: Path, timeout: float = 120
) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` (output to ``log``), wait until it is ready (``ready``: a URL that answers 200, or a
    (host, port) that accepts a connection), and stop it afterwards."""
    with open(log, "w") as out:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT)
    name = Path(str(cmd[0])).name
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}: {tail(log)}")
            if _ready(ready):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} not ready after {timeout:.0f} s: {tail(log)}")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def tail(log: Path, lines: int = 5) -> str:
    """The last lines of a log file, on one line."""
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"
