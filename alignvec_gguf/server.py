"""An OpenAI-compatible HTTP server with live alignment knobs: ``alignvec serve``.

Requests to ``/v1/completions`` and ``/v1/chat/completions`` are those of the OpenAI API (the subset
llama-cpp-python implements) plus an optional ``"alignment": {"medical": 0.5, "legal": -1}``; names
not given are at λ = 0. ``GET /v1/alignment`` lists the vectors and the allowed λ range. Unknown
vector names, λ out of range and malformed requests get a 400 with an OpenAI-style error body
``{"error": {"message": ..., "type": "invalid_request_error", "param": ...}}``; an unexpected failure is a
500 with ``"type": "server_error"``. ``GET /`` is the playground: one static page (``static/playground.html``,
nothing fetched from elsewhere) with a slider per vector, streamed answers and a side-by-side comparison.

The server holds one :class:`~alignvec_gguf.live.LiveModel`; requests are served one at a time
(llama.cpp's context runs one sequence), so concurrent requests queue. It binds 127.0.0.1 unless
told otherwise. Needs the ``serve`` extra: ``pip install 'alignvec-gguf[serve]'`` (FastAPI, uvicorn).
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from ._version import __version__
from .errors import AlignVecError, InputError
from .live import LiveModel

log = logging.getLogger(__name__)

# Sampling options passed through to llama-cpp-python, with the JSON types they accept.
_NUMBER = (int, float)
SAMPLING: dict[str, tuple[type, ...]] = {
    "max_tokens": (int,),
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "top_k": (int,),
    "min_p": _NUMBER,
    "seed": (int,),
    "repeat_penalty": _NUMBER,
    "presence_penalty": _NUMBER,
    "frequency_penalty": _NUMBER,
    "stop": (str, list),
    "stream": (bool,),
}
DEFAULT_MAX_TOKENS = 256
PLAYGROUND = resources.files(__package__) / "static" / "playground.html"


class BadRequest(InputError):
    """A request the server refuses with 400; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _sampling(body: dict[str, Any], max_tokens_limit: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for key, types in SAMPLING.items():
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) and bool not in types:
            raise BadRequest(f"{key} must be {' or '.join(t.__name__ for t in types)}, got {value!r}", key)
        if not isinstance(value, types):
            raise BadRequest(f"{key} must be {' or '.join(t.__name__ for t in types)}, got {value!r}", key)
        if isinstance(value, float) and not math.isfinite(value):
            raise BadRequest(f"{key} must be finite, got {value!r}", key)
        if key == "stop" and isinstance(value, list) and not all(isinstance(s, str) for s in value):
            raise BadRequest("stop must be a string or a list of strings", key)
        kwargs[key] = value
    max_tokens = kwargs.setdefault("max_tokens", min(DEFAULT_MAX_TOKENS, max_tokens_limit))
    if not 1 <= max_tokens <= max_tokens_limit:
        raise BadRequest(f"max_tokens must be between 1 and {max_tokens_limit}, got {max_tokens}", "max_tokens")
    if body.get("n", 1) != 1:
        raise BadRequest("n must be 1: this server returns one choice per request", "n")
    return kwargs


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest('messages must be a non-empty list of {"role": ..., "content": ...}', "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRequest(f'messages[{i}] must be {{"role": str, "content": str}}', "messages")
    return messages


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string", "prompt")
    return prompt


# llama-cpp-python's ValueErrors that a request causes (llama.py, llama_chat_format.py); any other ValueError
# is an internal error. Matched on the message: llama-cpp-python raises them without a type of their own.
_REQUEST_VALUE_ERRORS = re.compile(
    r"Requested tokens \(\d+\) exceed (context window|batch size)|logprobs is not supported|Unsupported role"
    r"|Tool choice '.*' not found"
)


def is_request_error(exc: ValueError) -> bool:
    """Whether a ValueError from llama-cpp-python is the request's fault (400) rather than a bug (500).

    Those are a prompt longer than the context and the few checks of a request's fields, and an error a
    model's chat template raises itself (``raise_exception``: e.g. roles that do not alternate).
    """
    if _REQUEST_VALUE_ERRORS.search(str(exc)):
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (
        tb is not None
        and tb.tb_frame.f_code.co_name == "raise_exception"
        and "llama_cpp" in tb.tb_frame.f_code.co_filename
    )


class _InternalErrors:
    """A bug or a llama.cpp failure is the client's 500 with an OpenAI-style body. Caught here, inside
    Starlette's outermost error middleware, which would answer and then re-raise, and so drop the
    connection: the client's next request on it would fail."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as exc:
            if started:  # headers are out: nothing left to answer with
                raise
            log.error("request to %s failed", scope.get("path"), exc_info=exc)
            body = {"message": f"internal error: {type(exc).__name__}: {exc}", "type": "server_error"}
            await JSONResponse({"error": {**body, "param": None, "code": None}}, 500)(scope, receive, send)


def create_app(live: LiveModel, *, model_id: str | None = None, max_tokens_limit: int = 4096) -> FastAPI:
    """The FastAPI application serving ``live``. ``model_id`` names it in responses (default: the base file)."""
    model_name = model_id or live.base.name.removesuffix(".gguf")
    chat_template = bool(live.llm.metadata.get("tokenizer.chat_template"))
    app = FastAPI(title="alignvec", version=__version__)

    def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)

    @app.exception_handler(AlignVecError)
    async def _alignvec_error(request: Request, exc: AlignVecError) -> JSONResponse:
        return error(400, str(exc), exc.param if isinstance(exc, BadRequest) else None)

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError) -> JSONResponse:
        if not is_request_error(exc):
            raise exc  # a bug: _InternalErrors answers 500 and logs the traceback
        return error(400, str(exc))

    app.add_middleware(_InternalErrors)

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        alignment = body.get("alignment")
        if alignment is not None and not isinstance(alignment, dict):
            raise BadRequest('alignment must be an object of vector names to λ, e.g. {"medical": 0.5}', "alignment")
        try:
            live.check(alignment)  # unknown names, λ out of range: 400 before any work
        except InputError as e:
            raise BadRequest(str(e), "alignment") from None
        return body

    def respond(result: Any, alignment: dict[str, float] | None, stream: bool) -> Any:
        if not stream:
            result["model"] = model_name
            result["alignment"] = alignment or {}
            return result
        return StreamingResponse(_sse(result, model_name), media_type="text/event-stream")

    async def _sse(chunks: Iterator[dict[str, Any]], name: str) -> AsyncIterator[str]:
        done: dict[str, Any] = {}
        try:
            while True:
                # not abandoned on cancellation: a disconnect waits for the chunk in flight, then closes below
                chunk = await anyio.to_thread.run_sync(next, chunks, done)
                if chunk is done:
                    break
                chunk["model"] = name
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        except Exception as e:  # headers are sent: report in the stream
            log.exception("stream failed")
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # releases the model

    @app.get("/", response_class=HTMLResponse)
    def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "alignvec"}]}

    @app.get("/v1/alignment")
    def alignment() -> dict[str, Any]:
        lo, hi = live.lambda_range
        return {
            "object": "list",
            "model": model_name,
            "lambda_min": lo,
            "lambda_max": hi,
            "chat_template": chat_template,  # the playground prompts as chat only where the model has a template
            "data": live.describe(),
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await body_of(request)
        prompt, kwargs = _prompt(body), _sampling(body, max_tokens_limit)
        result = await anyio.to_thread.run_sync(
            lambda: live.create_completion(prompt, alignment=body.get("alignment"), **kwargs)
        )
        return respond(result, body.get("alignment"), bool(kwargs.get("stream")))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await body_of(request)
        messages, kwargs = _messages(body), _sampling(body, max_tokens_limit)
        result = await anyio.to_thread.run_sync(
            lambda: live.create_chat_completion(messages, alignment=body.get("alignment"), **kwargs)
        )
        return respond(result, body.get("alignment"), bool(kwargs.get("stream")))

    return app


def run_server(
    live: LiveModel,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    model_id: str | None = None,
    sock: socket.socket | None = None,
) -> None:
    """Serve ``live`` with uvicorn until interrupted (or on an already bound ``sock``)."""
    import uvicorn

    app = create_app(live, model_id=model_id)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning")
    server = uvicorn.Server(config)
    log.info("serving %s on http://%s:%d/v1 (vectors: %s)", live.base.name, host, port, ", ".join(live.names))
    server.run(sockets=[sock] if sock is not None else None)
