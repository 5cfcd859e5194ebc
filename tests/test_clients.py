"""Real clients and runtimes: the official ``openai`` Python package against ``alignvec serve`` (completions and
chat, streaming, ``extra_body={"alignment": ...}``, its error types for 400 and 500), and llama-cpp-python's own
OpenAI server (``python -m llama_cpp.server``) serving a merged GGUF. Everything on 127.0.0.1."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import alignvec_gguf as av  # noqa: E402
from alignvec_gguf.server import create_app  # noqa: E402
from tests.support.loopback import free_port, process, serve_app, tiny_live  # noqa: E402

PROMPT = "the patient reports"
CHAT = [{"role": "user", "content": "my knee hurts after running"}]


@pytest.fixture(scope="module")
def live(llama_pair, lowrank_pair):
    model = tiny_live(llama_pair, lowrank_pair, n_ctx=256)
    yield model
    model.close()


@pytest.fixture(scope="module")
def client(live):
    with serve_app(create_app(live, model_id="tiny")) as url:
        # max_retries=0: one request per call, so a 500 is seen once and the request count stays bounded
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_are_listed(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


@pytest.mark.parametrize("alignment", [{"medical": 1.5}, {"medical": -1.0, "legal": 0.5}])
def test_completions_with_extra_body_alignment(client, live, alignment):
    out = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"alignment": alignment}
    )
    assert out.choices[0].text == live.generate(PROMPT, alignment=alignment, max_tokens=12)
    assert out.model == "tiny" and out.usage is not None and out.usage.completion_tokens >= 1
    assert out.model_extra is not None and out.model_extra["alignment"] == alignment  # echoed beside the answer


def test_streamed_completion_is_the_servers_stream(client, live):
    alignment = {"legal": 2.0}
    stream = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True, extra_body={"alignment": alignment}
    )
    pieces = [c.choices[0].text for c in stream]
    assert len(pieces) > 1
    chunks = live.create_completion(PROMPT, alignment=alignment, max_tokens=12, temperature=0, stream=True)
    assert "".join(pieces) == "".join(c["choices"][0]["text"] for c in chunks)


def test_chat_with_alignment_streamed_and_not(client, live):
    alignment = {"medical": 1.0, "legal": -0.5}
    out = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=10, temperature=0, extra_body={"alignment": alignment}
    )
    expected = live.create_chat_completion(CHAT, alignment=alignment, max_tokens=10, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected["choices"][0]["message"]["content"]
    stream = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=10, temperature=0, stream=True, extra_body={"alignment": alignment}
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    chunks = live.create_chat_completion(CHAT, alignment=alignment, max_tokens=10, temperature=0, stream=True)
    assert text == "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    base = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0)
    assert base.choices[0].message.content != out.choices[0].message.content  # the knob reaches the model


@pytest.mark.parametrize(
    "alignment,needle",
    [
        ({"medical": 2.5}, "λ 2.5 for 'medical' is outside the allowed range [-1.5, 2]"),
        ({"surgery": 1}, "unknown alignment vector 'surgery'"),
    ],
)
def test_a_bad_lambda_is_the_clients_bad_request_error(client, alignment, needle):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, extra_body={"alignment": alignment})
    assert e.value.status_code == 400
    assert isinstance(e.value.body, dict) and needle in e.value.body["message"]
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["param"] == "alignment"
    with pytest.raises(openai.BadRequestError, match="outside the allowed range"):  # the streaming call too
        client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=4, stream=True, extra_body={"alignment": {"legal": -3}}
        )


def test_an_internal_error_is_the_clients_500(client, live, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("llama_decode returned -3")

    monkeypatch.setattr(live, "create_completion", broken)
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
    assert e.value.status_code == 500
    assert e.value.body == {
        "message": "internal error: RuntimeError: llama_decode returned -3",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    monkeypatch.undo()
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).choices  # and the server lives on


# llama-cpp-python's own OpenAI-compatible server on a merged file


def test_llama_cpp_python_server_serves_a_merged_file(llama_pair, second_av, tmp_path):
    pytest.importorskip(
        "sse_starlette", reason="needs llama-cpp-python[server]: pip install 'llama-cpp-python[server]'"
    )
    pytest.importorskip("starlette_context", reason="needs llama-cpp-python[server]")
    pytest.importorskip("pydantic_settings", reason="needs llama-cpp-python[server]")
    mix = {llama_pair.av: 0.75, second_av[0]: -0.5}
    merged = tmp_path / "merged.gguf"
    av.merge(llama_pair.base_gguf, mix, merged)
    local = av.load(llama_pair.base_gguf, mix, cache_dir=tmp_path / "cache", n_ctx=256, verbose=False)
    expected = local(PROMPT, max_tokens=16, temperature=0)["choices"][0]["text"]
    expected_stream = "".join(c["choices"][0]["text"] for c in local(PROMPT, max_tokens=16, temperature=0, stream=True))
    base = av.load(llama_pair.base_gguf, {}, n_ctx=256, verbose=False)(PROMPT, max_tokens=16, temperature=0)
    assert expected != base["choices"][0]["text"]  # the mix changes the answer, so the comparison means something
    local.close()

    port = free_port()
    # llama-cpp-python's own server builds its own Llama: guard_process() keeps it off the AMX kernel (README)
    launch = "import runpy, alignvec_gguf.cpu as c; c.guard_process(); "
    launch += "runpy.run_module('llama_cpp.server', run_name='__main__')"
    cmd = [sys.executable, "-c", launch, "--model", str(merged), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--n_ctx", "256", "--model_alias", "merged"]
    with process(cmd, f"http://127.0.0.1:{port}/v1/models", tmp_path / "server.log", timeout=120):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        greedy = {"max_tokens": 16, "temperature": 0, "extra_body": {"repeat_penalty": 1.0}}  # its default: 1.1
        out = client.completions.create(model="merged", prompt=PROMPT, **greedy)
        assert out.choices[0].text == expected
        stream = client.completions.create(model="merged", prompt=PROMPT, stream=True, **greedy)
        assert "".join(c.choices[0].text for c in stream) == expected_stream
