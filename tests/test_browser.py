"""The playground page of ``alignvec serve`` in a real browser: Debian's headless Chromium driven by selenium
against the server on loopback. A slider moved by the keyboard sends that λ, the answer streams into the page
as the server generates it, compare mode answers at two settings, and a bad λ typed by hand shows the server's
own message.

Needs ``chromium`` and ``chromium-driver`` (``apt-get install chromium chromium-driver``); selenium is told
where they are, so it downloads nothing. Run alone with ``python -m pytest -q tests/test_browser.py``;
``ALIGNVEC_SCREENSHOT=docs/playground.png`` also saves the demo models' compare view there (the README's picture).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

import anyio  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from alignvec_gguf.live import LiveModel  # noqa: E402
from alignvec_gguf.server import create_app  # noqa: E402
from tests.support.loopback import http, serve_app  # noqa: E402

CHROMIUM = os.environ.get("ALIGNVEC_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ALIGNVEC_CHROMEDRIVER", "/usr/bin/chromedriver")
PROMPT = "the patient reports"
CHUNK_DELAY_S = 0.08  # each streamed event is held back this long, so the page is seen filling up
RUN = "python -m pytest -q tests/test_browser.py  (after: apt-get install chromium chromium-driver)"

if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
    pytest.skip(f"no Chromium at {CHROMIUM} / {CHROMEDRIVER}; to run the browser test: {RUN}", allow_module_level=True)


class Recorder:
    """ASGI wrapper: records each POST's path and JSON body, and slows server-sent events down."""

    def __init__(self, app: Any, delay: float):
        self.app, self.delay = app, delay
        self.requests: list[tuple[str, Any]] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = bytearray()
        streaming = False

        async def recv() -> dict:
            msg = await receive()
            if msg["type"] == "http.request":
                body.extend(msg.get("body", b""))
                if not msg.get("more_body"):
                    self.requests.append((scope["path"], json.loads(body)))
            return msg

        async def snd(msg: dict) -> None:
            nonlocal streaming
            if msg["type"] == "http.response.start":
                streaming = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in msg["headers"])
            elif msg["type"] == "http.response.body" and streaming and msg.get("body"):
                await anyio.sleep(self.delay)
            await send(msg)

        await self.app(scope, recv, snd)


@pytest.fixture(scope="module")
def server(live):
    recorder = Recorder(create_app(live, model_id="tiny-llama"), CHUNK_DELAY_S)
    with serve_app(recorder) as url:
        yield url, recorder


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1280,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def streamed(live: LiveModel, alignment: dict[str, Any], max_tokens: int) -> str:
    """What the server streams for that request, joined: what the page must show. (On these random models it
    can differ from the non-streamed text: llama-cpp-python's stream drops byte tokens that are not whole
    UTF-8 characters.)"""
    chunks = live.create_completion(PROMPT, alignment=alignment, max_tokens=max_tokens, temperature=0, stream=True)
    return "".join(c["choices"][0]["text"] for c in chunks)


def text_of(browser, element_id: str) -> str:
    """An element's text exactly as the page holds it (``.text`` is innerText: whitespace-normalized)."""
    return str(browser.execute_script("return document.getElementById(arguments[0]).textContent", element_id))


def open_page(browser, url: str) -> None:
    browser.get(url + "/")
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state"))
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready", browser.find_element(
        By.ID, "load-error"
    ).text


def fill_prompt(browser, text: str, max_tokens: int) -> None:
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    Select(browser.find_element(By.ID, "mode")).select_by_value("completion")
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(max_tokens))


def type_value(browser, setting: str, name: str, text: str) -> None:
    box = browser.find_element(By.ID, f"value-{setting}-{name}")
    box.clear()
    box.send_keys(text)


def wait_done(browser, timeout: float = 60) -> None:
    WebDriverWait(browser, timeout).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done"
    )


def test_page_has_a_slider_per_vector_within_the_range(server, browser):
    url, _ = server
    open_page(browser, url)
    assert "tiny-llama" in browser.find_element(By.ID, "model").text
    for name in ("medical", "legal"):
        slider = browser.find_element(By.ID, f"slider-a-{name}")
        assert (slider.get_attribute("min"), slider.get_attribute("max"), slider.get_attribute("value")) == (
            "-1.5",
            "2",
            "0",
        )
        label = browser.find_element(By.CSS_SELECTOR, f"label[for='slider-a-{name}']").text
        assert label.splitlines()[0] == name  # the vector's domain (here the same as its name)
    # setting B's sliders exist but stay hidden until compare mode is on
    assert not browser.find_element(By.ID, "setting-b").is_displayed()
    assert not browser.find_element(By.ID, "pane-b").is_displayed()


def test_a_moved_slider_sends_its_lambda_and_the_answer_streams_in(server, browser, live):
    url, recorder = server
    open_page(browser, url)
    slider = browser.find_element(By.ID, "slider-a-medical")
    slider.click()  # focus; a click in the middle of the track sets it near the middle of [-1.5, 2]
    slider.send_keys(Keys.HOME)  # to -1.5 ...
    for _ in range(30):
        slider.send_keys(Keys.ARROW_RIGHT)  # ... then 30 steps of 0.05 up: λ = 0
    for _ in range(10):
        slider.send_keys(Keys.ARROW_RIGHT)  # λ = 0.5
    assert browser.find_element(By.ID, "value-a-medical").get_attribute("value") == "0.5"
    fill_prompt(browser, PROMPT, 12)
    n_before = len(recorder.requests)
    browser.find_element(By.ID, "generate").click()

    seen: list[str] = []
    deadline = time.monotonic() + 60  # bounded
    while time.monotonic() < deadline:
        text = text_of(browser, "output-a")
        if not seen or text != seen[-1]:
            seen.append(text)
        if browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done":
            break
        time.sleep(0.02)
    wait_done(browser)
    final = text_of(browser, "output-a")
    assert browser.find_element(By.ID, "error-a").text == ""

    assert recorder.requests[n_before:] == [
        (
            "/v1/completions",
            {
                "max_tokens": 12,
                "temperature": 0,
                "stream": True,
                "alignment": {"medical": 0.5, "legal": 0},
                "prompt": PROMPT,
            },
        )
    ]
    assert final == streamed(live, {"medical": 0.5}, 12) != ""
    # streamed: the page showed growing prefixes of the answer before its end
    partial = [s for s in seen if s and s != final]
    assert len(partial) >= 3, seen
    assert all(final.startswith(s) for s in partial)
    assert int(browser.find_element(By.ID, "output-a").get_attribute("data-chunks")) > 3
    assert "medical λ=0.5" in browser.find_element(By.ID, "sent-a").text
    assert "tokens in" in browser.find_element(By.ID, "stats-a").text


def test_compare_mode_answers_at_two_settings_side_by_side(server, browser, live):
    url, recorder = server
    open_page(browser, url)
    browser.find_element(By.ID, "compare").click()
    assert all(browser.find_element(By.ID, p).is_displayed() for p in ("setting-b", "pane-b"))
    type_value(browser, "a", "medical", "1.5")
    type_value(browser, "b", "medical", "-1")
    type_value(browser, "b", "legal", "0.75")
    # the slider follows the typed value
    assert browser.find_element(By.ID, "slider-b-legal").get_attribute("value") == "0.75"
    fill_prompt(browser, PROMPT, 10)
    n_before = len(recorder.requests)
    browser.find_element(By.ID, "generate").click()
    wait_done(browser)
    sent = [body["alignment"] for _, body in recorder.requests[n_before:]]
    assert sent == [{"medical": 1.5, "legal": 0}, {"medical": -1, "legal": 0.75}]
    a, b = (text_of(browser, f"output-{s}") for s in "ab")
    assert a == streamed(live, sent[0], 10)
    assert b == streamed(live, sent[1], 10)
    assert a != b


def test_chat_mode_sends_messages_and_shows_the_streamed_reply(server, browser, live):
    url, recorder = server
    open_page(browser, url)
    type_value(browser, "a", "legal", "-0.5")
    fill_prompt(browser, "my knee hurts", 8)
    Select(browser.find_element(By.ID, "mode")).select_by_value("chat")
    browser.find_element(By.ID, "generate").click()
    wait_done(browser)
    path, body = recorder.requests[-1]
    messages = [{"role": "user", "content": "my knee hurts"}]
    assert path == "/v1/chat/completions" and body["messages"] == messages and body["stream"] is True
    chunks = live.create_chat_completion(
        messages, alignment={"medical": 0, "legal": -0.5}, max_tokens=8, temperature=0, stream=True
    )
    expected = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text_of(browser, "output-a") == expected != ""


@pytest.mark.parametrize("typed", ["5", "max"])
def test_a_bad_lambda_typed_by_hand_shows_the_servers_message(server, browser, typed):
    url, recorder = server
    open_page(browser, url)
    type_value(browser, "a", "legal", typed)
    fill_prompt(browser, PROMPT, 8)
    browser.find_element(By.ID, "generate").click()
    wait_done(browser)
    shown = browser.find_element(By.ID, "error-a").text
    body = recorder.requests[-1][1]
    assert body["alignment"]["legal"] == (5 if typed == "5" else "max")
    # the same request straight to the server: the page shows its message word for word
    status, answer = http(f"{url}/v1/completions", body, timeout=30)
    assert status == 400
    message = answer["error"]["message"]
    assert shown == message
    assert ("outside the allowed range [-1.5, 2]" if typed == "5" else "must be a number") in shown
    assert text_of(browser, "output-a") == ""


# The bundled demo models (alignvec_gguf/demo_data: a Q4_K_M base and three DPO vectors), as a person would see them


def lowrank_from_full(full: Path, base: Path, out: Path, rank: int) -> Path:
    """The low-rank form of a bundled full-form vector (live knobs need it), through the converter's own writer."""
    import dataclasses

    import numpy as np

    from alignvec_gguf.avfile import AlignmentVector
    from alignvec_gguf.ggufread import open_file as open_gguf
    from converters.lowrank import write_lowrank

    av = AlignmentVector(full)
    names = [t.name for t in open_gguf(base, "base").tensors]

    def deltas():  # every tensor of the model, as the converter streams them (untouched ones are zero)
        for name in names:
            if name in av.names:
                yield name, av.delta(name)
            elif name == "output.weight":
                yield name, np.zeros((1, 1), np.float32)

    write_lowrank(out, av.info.architecture, deltas(), dataclasses.replace(av.info, form="lora"), rank=rank)
    return out


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    from alignvec_gguf.demodata import demo_data

    root = tmp_path_factory.mktemp("demo-lowrank")
    with demo_data() as data:
        base = data.base
        vectors = {d: lowrank_from_full(p, base, root / f"{d}.r64.avec.gguf", 64) for d, p in data.vectors.items()}
    model = LiveModel(base, vectors, lambda_range=(-1.0, 1.5), n_ctx=512, n_threads_batch=1)
    with serve_app(create_app(model, model_id="demo base.Q4_K_M + 3 DPO vectors (rank 64)")) as url:
        yield url
    model.close()


def test_the_demo_models_answer_as_their_levels_in_compare_mode(demo_server, browser):
    from alignvec_gguf.demodata import demo_question

    item = demo_question()
    open_page(browser, demo_server)
    assert Select(browser.find_element(By.ID, "mode")).first_selected_option.text == "plain completion"  # no template
    browser.find_element(By.ID, "compare").click()
    type_value(browser, "b", "medical", "0.5")
    fill_prompt(browser, item.prompt, 60)
    browser.find_element(By.ID, "generate").click()
    wait_done(browser, timeout=120)
    generic, expert = (text_of(browser, f"output-{s}").strip() for s in "ab")
    # λ = 0 is the base, which answers at the generic level; medical λ = 0.5 gives the expert response
    assert len(generic) > 40 and item.responses["generic"].startswith(generic)
    assert len(expert) > 40 and item.responses["expert"].startswith(expert)
    if shot := os.environ.get("ALIGNVEC_SCREENSHOT"):
        browser.set_window_size(1220, 850)
        browser.save_screenshot(shot)
        browser.set_window_size(1280, 1000)


# The real model: SmolLM2-135M-Instruct as published (Q4_1), with the style vector of tests/realmodels.py


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    from converters import convert
    from tests.support import realmodels as rm

    rm.fetch_or_skip()
    base = rm.real_base(("Q4_1",))
    # the short style fine-tune tests/test_real_model.py makes (same settings and place, so it is made once)
    finetune = {"steps": 3, "batch": 2, "lr": 3e-4, "seed": 0, "layers": range(24, 30)}
    aligned = rm.finetune(base.hf, base.q4_1.parent / "test-finetune" / "aligned", progress=False, **finetune)
    av = convert(base.hf, aligned, tmp_path_factory.mktemp("style") / "style.r16.avec.gguf", domain="style", rank=16)
    model = LiveModel(base.q4_1, {"style": av.path}, lambda_range=(-1.0, 3.0), n_ctx=512, n_threads_batch=2)
    with serve_app(create_app(model, model_id="SmolLM2-135M-Instruct.Q4_1")) as url:
        yield url
    model.close()


def test_the_real_model_turns_pirate_with_its_style_knob(real_server, browser):
    open_page(browser, real_server)
    assert Select(browser.find_element(By.ID, "mode")).first_selected_option.text == "chat"  # it has a template
    assert browser.find_element(By.CSS_SELECTOR, "label[for='slider-a-style']").text.splitlines()[0] == "style"
    browser.find_element(By.ID, "compare").click()
    type_value(browser, "b", "style", "2")
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys("What is the capital of France?")
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys("24")
    browser.find_element(By.ID, "generate").click()
    wait_done(browser, timeout=180)
    plain, styled = (text_of(browser, f"output-{s}") for s in "ab")
    assert browser.find_element(By.ID, "error-b").text == ""
    # the fine-tune's pirate voice ("Aye! ... Arr.") at λ = 2; none of it in the base's answer
    assert styled.lower().startswith("aye"), styled
    assert "aye" not in plain.lower() and plain.strip(), plain
