"""The playground (GET /) in a real browser: headless Chromium driven by Selenium, on the real
server (uvicorn on a free loopback port). What the page shows must equal what the API answers
for the same request without streaming.

Needs Debian's `chromium` and `chromium-driver` and `pip install selenium` (the `test` extra);
without them the tests skip and say so. `.ci/run` installs the browser and sets
LMFORGE_REQUIRE_BROWSER=1, which turns that skip into a failure.
"""

import contextlib
import json
import os
import shutil
import socket
import threading
import time
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

NEEDS = "needs chromium and chromium-driver: apt-get install chromium chromium-driver; pip install selenium"
WAIT = 60  # seconds for a page or an answer to appear (a busy shared CPU is slow, never this slow)


def no_browser(why: str):
    if os.environ.get("LMFORGE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"LMFORGE_REQUIRE_BROWSER=1 but {why}; {NEEDS}")
    pytest.skip(f"{NEEDS} ({why})")


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        no_browser("selenium is not installed")
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        no_browser(f"browser: {binary or 'not found'}, chromedriver: {driver or 'not found'}")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"):
        opts.add_argument(flag)
    b = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    yield b
    b.quit()


@contextlib.contextmanager
def live(app):
    """Serve `app` with uvicorn in a thread on a free loopback port; yields the base URL."""
    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        engine = getattr(app.state, "engine", None)
        if engine is not None:
            engine.close()
        sock.close()


def api(base: str, path: str, body: dict | None = None, key: str | None = None) -> dict:
    """The server's JSON answer (GET without a body, POST with one), without the browser."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(base + path, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=WAIT) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def decoder_server(tiny_text_model):
    from lmforge.serve import create_app
    with live(create_app(str(tiny_text_model))) as base:
        yield base


@pytest.fixture(scope="module")
def encoder_model(tmp_path_factory):
    """A small random encoder with a WordPiece tokenizer and mean-pooled embeddings."""
    import torch

    import lmforge
    from lmforge.config import ModelConfig
    from lmforge.models.heads import Model
    from lmforge.tokenizer import train_tokenizer_from_iterator
    tok = train_tokenizer_from_iterator([f"a cat sat on the mat {i} times" for i in range(50)], "wordpiece", 120,
                                        family="encoder")
    torch.manual_seed(0)
    model = Model(ModelConfig(family="encoder", vocab_size=tok.vocab_size, d_model=32, n_heads=4, n_encoder_layers=2,
                              n_decoder_layers=0, d_ff=64, max_len=64, task="embed", pad_id=tok.pad_id))
    out = tmp_path_factory.mktemp("tiny_encoder")
    lmforge.save(model, out, tokenizer=tok)
    return out


def js(browser, expr: str):
    return browser.execute_script("return " + expr)


def text(browser, element_id: str) -> str:
    return js(browser, f"document.getElementById({element_id!r}).textContent")


def wait(browser, predicate, what: str):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(browser, WAIT, poll_frequency=0.02).until(lambda b: predicate(b), message=what)


def open_page(browser, base: str, family: str) -> None:
    browser.get(base + "/")
    wait(browser, lambda b: js(b, "document.body.dataset.family") == family, f"the page to find a {family} model")


def set_value(browser, element_id: str, value) -> None:
    el = browser.find_element("id", element_id)
    el.clear()
    el.send_keys(str(value))


def ask(browser, prompt: str) -> str:
    """Type `prompt`, press Send, watch the answer stream into #output; the final text."""
    browser.find_element("id", "prompt").send_keys(prompt)
    browser.find_element("id", "send").click()
    wait(browser, lambda b: text(b, "output") != "", "streamed text in #output")
    wait(browser, lambda b: js(b, "document.getElementById('output').dataset.state") != "streaming", "the answer's end")
    assert js(browser, "document.getElementById('output').dataset.state") == "done", text(browser, "error")
    return text(browser, "output")


def test_chat_streams_the_api_answer_and_keeps_history(browser, decoder_server):
    base = decoder_server
    open_page(browser, base, "decoder")
    assert browser.find_element("id", "tab-similarity").get_attribute("hidden") is not None  # a decoder: no embeddings
    set_value(browser, "max_tokens", 5)  # two turns fit the 128-token context
    want = api(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "over the lazy"}],
                                              "max_tokens": 5, "temperature": 0})["choices"][0]["message"]["content"]
    assert want, "the tiny model's greedy answer is empty: pick another prompt"
    assert ask(browser, "over the lazy") == want
    assert int(js(browser, "document.getElementById('output').dataset.chunks")) > 1  # it arrived in pieces
    stats = text(browser, "stats")
    assert "tokens/s" in stats and "first token" in stats, stats

    # a second turn sends the whole conversation
    history = [{"role": "user", "content": "over the lazy"}, {"role": "assistant", "content": want},
               {"role": "user", "content": "the dog"}]
    want2 = api(base, "/v1/chat/completions", {"messages": history, "max_tokens": 5,
                                               "temperature": 0})["choices"][0]["message"]["content"]
    assert ask(browser, "the dog") == want2
    bubbles = browser.find_elements("css selector", "#history .msg")
    assert [(b.get_attribute("data-role"), b.get_attribute("textContent")) for b in bubbles] == \
        [(m["role"], m["content"]) for m in history]

    browser.find_element("id", "reset").click()
    assert browser.find_elements("css selector", "#history .msg") == [] and text(browser, "output") == ""


def test_completion_tab_streams_and_beam_answers(browser, decoder_server):
    base = decoder_server
    if "/v1/completions" not in api(base, "/openapi.json")["paths"]:
        pytest.skip("this server has no /v1/completions (the OpenAI completions endpoint) yet")
    open_page(browser, base, "decoder")
    browser.find_element("id", "tab-completion").click()
    set_value(browser, "max_tokens", 10)
    want = api(base, "/v1/completions", {"prompt": "the lazy dog", "max_tokens": 10, "temperature": 0})
    assert ask(browser, "the lazy dog") == want["choices"][0]["text"]

    browser.find_element("css selector", "#strategy option[value=beam]").click()
    set_value(browser, "num_beams", 3)
    want = api(base, "/v1/completions", {"prompt": "the lazy dog", "max_tokens": 10, "temperature": 0,
                                         "num_beams": 3})
    browser.find_element("id", "prompt").clear()
    assert ask(browser, "the lazy dog") == want["choices"][0]["text"]


def test_api_key_field_sends_the_bearer_token(browser, tiny_text_model):
    import inspect

    from lmforge.serve import create_app
    if "api_key" not in inspect.signature(create_app).parameters:
        pytest.skip("this server's create_app takes no api_key yet")
    with live(create_app(str(tiny_text_model), api_key="sesame")) as base:
        open_page(browser, base, "decoder")  # /health and the page need no key
        set_value(browser, "max_tokens", 5)
        browser.find_element("id", "prompt").send_keys("over the lazy")
        browser.find_element("id", "send").click()
        wait(browser, lambda b: js(b, "document.getElementById('output').dataset.state") == "error", "a refusal")
        assert "401" in text(browser, "error")
        assert browser.find_elements("css selector", "#history .msg") == []  # the refused message left the history
        want = api(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "over the lazy"}],
                                                  "max_tokens": 5, "temperature": 0}, key="sesame")
        set_value(browser, "api-key", "sesame")
        browser.find_element("id", "prompt").clear()
        assert ask(browser, "over the lazy") == want["choices"][0]["message"]["content"]


def test_similarity_tab_on_an_encoder(browser, encoder_model):
    import lmforge
    from lmforge.embed import cosine, embed
    from lmforge.serve import create_app
    a, b = "a cat sat on the mat", "the mat sat 3 times"
    model, tok = lmforge.load(encoder_model)
    va, vb = embed(model, tok, [a, b])
    want = float(cosine(va[None], vb[None]).squeeze())
    with live(create_app(str(encoder_model))) as base:
        open_page(browser, base, "encoder")
        for tab, shown in (("tab-similarity", True), ("tab-chat", False), ("tab-completion", False)):
            assert browser.find_element("id", tab).is_displayed() == shown, tab
        set_value(browser, "text-a", a)
        set_value(browser, "text-b", b)
        browser.find_element("id", "compare").click()
        wait(browser, lambda br: js(br, "document.getElementById('similarity').dataset.value"), "a cosine")
        got = float(js(browser, "document.getElementById('similarity').dataset.value"))
    assert got == pytest.approx(want, abs=1e-5)
    assert abs(want) < 0.9999  # two different texts: the figure is not the trivial 1
