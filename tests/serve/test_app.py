"""The HTTP server over raw HTTP on loopback: lmforge's /v1/generate, every error in OpenAI's
shape, the API key, the body limit, /metrics, a client that goes away, and shutdown."""

import contextlib
import json
import re
import threading
import time

import httpx
import pytest

import lmforge
from lmforge.generate import GenerationConfig
from lmforge.serve.engine import EngineClosed, Limits
from tests.serve.conftest import live_server

KEY = "s3cret-key"
ERROR_KEYS = {"message", "type", "param", "code"}


def error_of(r, status: int, param=None) -> str:
    """The message of an OpenAI-shaped error response, after checking its status and param."""
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == ERROR_KEYS and isinstance(body["message"], str) and body["message"]
    if param is not None:
        assert body["param"] == param, body
    return body["message"]


def events(text: str) -> list:
    lines = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.fixture(scope="module")
def http(tiny_server):
    with httpx.Client(base_url=tiny_server[0], timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def guarded(tiny_text_model):
    """(client with the key, client without, app): a server with an API key and tight limits."""
    from lmforge.serve import create_app
    app = create_app(tiny_text_model, api_key=KEY, max_body_bytes=4096,
                     limits=Limits(max_batch=1, max_queue=1, max_new_tokens=20))
    with live_server(app) as (url, _):
        with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as keyed, \
                httpx.Client(base_url=url, timeout=120) as anonymous:
            yield keyed, anonymous, app


# ---- lmforge's own /v1/generate
def test_generate_streams_the_same_text_and_options_matter(http, tiny_text_model):
    model, tok = lmforge.load(tiny_text_model)
    opts = dict(max_new_tokens=12, no_repeat_ngram_size=2, repetition_penalty=1.3)
    want = lmforge.api.generate_text(model, tok, "the quick", **opts)
    assert want != lmforge.api.generate_text(model, tok, "the quick", max_new_tokens=12)  # the options matter
    r = http.post("/v1/generate", json={"prompt": "the quick", **opts}).json()
    assert r["text"] == want and r["usage"]["completion_tokens"] == 12 and r["finish_reason"] == "length"
    s = http.post("/v1/generate", json={"prompt": "the quick", **opts, "stream": True})
    assert "".join(e["text"] for e in events(s.text)) == want
    p = http.post("/v1/generate", json={"prompt": "the quick", "max_new_tokens": 12, "prompt_lookup": 3})
    assert p.json()["text"] == lmforge.api.generate_text(model, tok, "the quick", max_new_tokens=12)
    assert "no_repeat_ngram_size" in error_of(http.post("/v1/generate", json={"prompt": "a", "no_repeat_ngram_size": -1}),
                                              400, "no_repeat_ngram_size")


def test_every_generation_option_is_a_generate_field(http):
    from lmforge.generate.config import FIELDS
    from lmforge.serve.openai_schema import SERVER_CHOSEN
    schema = http.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]
    assert set(FIELDS) - set(SERVER_CHOSEN) <= set(schema["properties"])
    assert not set(SERVER_CHOSEN) & set(schema["properties"])  # the server's choice, not a request's


def test_long_prompts_are_refused_or_truncated(http, tiny_text_model):
    long = "the quick brown fox " * 60  # far more than the 128-token context
    assert "truncate" in error_of(http.post("/v1/completions", json={"prompt": long, "max_tokens": 8}), 400, "prompt")
    r = http.post("/v1/completions", json={"prompt": long, "max_tokens": 8, "truncate": True, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 128 - 8
    assert error_of(http.post("/v1/generate", json={"prompt": long, "max_new_tokens": 8}), 400)


# ---- errors
def test_bad_requests_are_openai_errors(http):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    error_of(http.post("/v1/completions", json={"prompt": "a", "top_p": 2.0}), 400, "top_p")
    error_of(http.post("/v1/completions", json={"prompt": "a", "max_tokens": 500}), 400, "max_tokens")
    error_of(http.post("/v1/completions", json={"prompt": "a", "presence_penalty": 0.5}), 400, "presence_penalty")
    assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "presence_penalty": 0.0,
                                              "frequency_penalty": 0, "user": "u1", "logit_bias": {},
                                              "echo": False, "best_of": 1}).status_code == 200
    error_of(http.post("/v1/completions", json={"prompt": "a", "num_beams": 2, "stream": True}), 400, "num_beams")
    error_of(http.post("/v1/completions", json={"prompt": [], "max_tokens": 2}), 400, "prompt")
    error_of(http.post("/v1/completions", json={"prompt": [1, 99999]}), 400, "prompt")
    error_of(http.post("/v1/chat/completions", json={**chat, "messages": []}), 400, "messages")
    error_of(http.post("/v1/chat/completions", json={**chat, "top_logprobs": 2}), 400, "top_logprobs")
    error_of(http.post("/v1/embeddings", json={"input": ["a", " "]}), 400, "input")
    error_of(http.post("/v1/chat/completions", json={"max_tokens": 2}), 422, "messages")
    error_of(http.post("/v1/chat/completions", json={**chat, "n": "many"}), 422, "n")
    error_of(http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    error_of(http.get("/v1/nothing"), 404)
    error_of(http.post("/v1/chat/completions", json={**chat, "model": "other"}), 404, "model")
    assert http.post("/v1/chat/completions", json={**chat, "model": "tiny"}).status_code == 200


def test_beam_search_through_the_api(http, tiny_text_model):
    from lmforge.generate import generate
    model, tok = lmforge.load(tiny_text_model)
    want = generate(model, [tok.encode("the quick")], strategy="beam", num_beams=3, num_return_sequences=2,
                    max_new_tokens=6, tokenizer=tok).texts
    r = http.post("/v1/completions", json={"prompt": "the quick", "num_beams": 3, "n": 2, "max_tokens": 6}).json()
    assert [c["text"] for c in r["choices"]] == want


def test_api_key_and_body_limit(guarded):
    keyed, anonymous, _ = guarded
    assert anonymous.get("/health").status_code == 200 and anonymous.get("/").status_code == 200
    for path in ("/v1/models", "/metrics"):
        assert error_of(anonymous.get(path), 401)
        assert keyed.get(path).status_code == 200
    error_of(anonymous.post("/v1/completions", json={"prompt": "a"}), 401)
    error_of(anonymous.post("/v1/completions", json={"prompt": "a"}, headers={"Authorization": "Bearer wrong"}), 401)
    assert keyed.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
    error_of(keyed.post("/v1/completions", json={"prompt": "a" * 5000}), 413)  # by Content-Length

    def chunked():  # no Content-Length: the server counts what arrives
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"}'
    error_of(keyed.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"}), 413)
    error_of(keyed.post("/v1/completions", json={"prompt": "a", "max_tokens": 21}), 400, "max_tokens")


def test_a_full_queue_is_429(guarded):
    keyed, _, app = guarded
    engine, gate = app.state.engine, threading.Event()
    blocker = engine.call(lambda: gate.wait(60))  # holds the engine thread
    waiting = []
    try:
        _wait_for(lambda: engine.queue_depth == 0)
        t = threading.Thread(target=lambda: waiting.append(
            keyed.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})))
        t.start()
        _wait_for(lambda: engine.queue_depth == 1)  # max_queue=1: that one waits, the next is refused
        error_of(keyed.post("/v1/completions", json={"prompt": "b", "max_tokens": 2}), 429)
    finally:
        gate.set()
    blocker.result(60)
    t.join(60)
    assert waiting[0].status_code == 200


# ---- metrics, disconnects, shutdown
def metric(text: str, series: str) -> float:
    """The value of one series (name with its labels) in a Prometheus exposition; 0 if absent."""
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    return 0.0


def test_metrics_are_prometheus_text(http):
    before = http.get("/metrics").text
    r = http.post("/v1/completions", json={"prompt": "the", "max_tokens": 3, "temperature": 0}).json()
    text = http.get("/metrics").text
    assert http.get("/metrics").headers["content-type"].startswith("text/plain")
    key = 'lmforge_requests_total{endpoint="/v1/completions",status="200"}'
    assert metric(text, key) == metric(before, key) + 1
    assert metric(text, "lmforge_completion_tokens_total") - metric(before, "lmforge_completion_tokens_total") == 3
    assert metric(text, "lmforge_prompt_tokens_total") - metric(before, "lmforge_prompt_tokens_total") == \
        r["usage"]["prompt_tokens"]
    for h in ("lmforge_time_to_first_token_seconds", "lmforge_request_duration_seconds"):
        assert f"# TYPE {h} histogram" in text
        assert metric(text, h + '_bucket{le="+Inf"}') == metric(text, h + "_count") >= 1
        assert metric(text, h + "_sum") > 0
    assert "lmforge_queue_depth 0" in text and "lmforge_running " in text
    assert metric(text, "lmforge_engine_completion_tokens_total") >= 3  # the engine's own counters
    sample = re.compile(r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? \S+')
    assert all(sample.fullmatch(line) for line in text.splitlines() if not line.startswith("#"))


@contextlib.contextmanager
def held_at(engine, n: int):
    """Within the block, the engine's n-th forward pass from now waits until the yielded gate
    is set (or 60 s); the gate is set and the hook removed on the way out."""
    gate, calls = threading.Event(), [0]

    def hold(*_):
        calls[0] += 1
        if calls[0] == n:
            gate.wait(60)
    handle = engine.model.backbone.tokens.register_forward_hook(hold)
    try:
        yield gate
    finally:
        gate.set()
        handle.remove()


def test_a_client_that_leaves_cancels_its_request(tiny_server):
    url, app = tiny_server
    engine = app.state.engine
    with held_at(engine, 3) as gate:  # the third forward pass waits until the disconnect has been seen
        with httpx.Client(base_url=url, timeout=120) as http:
            cancelled = metric(http.get("/metrics").text, 'lmforge_finished_total{reason="cancelled"}')
            tokens = engine.stats["completion_tokens"]
            with http.stream("POST", "/v1/completions", json={"prompt": "the", "max_tokens": 100, "temperature": 0,
                                                                "logprobs": 0, "stream": True}) as s:
                next(s.iter_lines())  # the first token's chunk; then the client goes away
            _wait_for(lambda: metric(http.get("/metrics").text,
                                     'lmforge_finished_total{reason="cancelled"}') == cancelled + 1)
            gate.set()
            r = http.post("/v1/completions", json={"prompt": "the", "max_tokens": 3, "temperature": 0})
            assert r.json()["usage"]["completion_tokens"] == 3
            assert engine.stats["completion_tokens"] - tokens < 100  # the first stopped long before its 100


def test_a_client_that_times_out_cancels_its_request(tiny_server):
    url, app = tiny_server
    engine = app.state.engine
    with held_at(engine, 2) as gate:  # the second forward pass waits until the disconnect has been seen
        with httpx.Client(base_url=url, timeout=120) as http:
            cancelled = metric(http.get("/metrics").text, 'lmforge_finished_total{reason="cancelled"}')
            tokens = engine.stats["completion_tokens"]
            with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
                http.post("/v1/chat/completions", timeout=httpx.Timeout(120, read=0.5),
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60})
            _wait_for(lambda: metric(http.get("/metrics").text,
                                     'lmforge_finished_total{reason="cancelled"}') == cancelled + 1)
            gate.set()
            assert http.post("/v1/completions", json={"prompt": "the", "max_tokens": 3}).status_code == 200
            assert engine.stats["completion_tokens"] - tokens < 60


def test_shutdown_finishes_what_runs_then_closes_the_engine(tiny_text_model):
    from fastapi.testclient import TestClient

    from lmforge.serve import create_app
    app = create_app(tiny_text_model)
    engine, gate, done = app.state.engine, threading.Event(), []
    engine.call(lambda: gate.wait(60))  # holds the engine thread: the request below waits in the queue
    with live_server(app) as (url, server):
        t = threading.Thread(target=lambda: done.append(httpx.post(
            url + "/v1/completions", json={"prompt": "a", "max_tokens": 4}, timeout=120)))
        t.start()
        _wait_for(lambda: engine.queue_depth == 1)
        server.should_exit = True  # shutdown begins with the request in flight ...
        _wait_for(lambda: not any(s.is_serving() for s in server.servers))
        gate.set()  # ... and it still gets its whole answer
    t.join(60)
    assert done[0].status_code == 200 and done[0].json()["usage"]["completion_tokens"] == 4
    with pytest.raises(EngineClosed):  # then the lifespan closed the engine
        engine.submit([1, 2], GenerationConfig(max_new_tokens=2))
    error_of(TestClient(app).post("/v1/completions", json={"prompt": "a", "max_tokens": 2}), 503)


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true"
        time.sleep(0.01)


def test_serve_flags_reach_create_app(monkeypatch, tiny_text_model):
    import lmforge.serve.app
    from lmforge.cli import main
    got = {}
    monkeypatch.setattr(lmforge.serve.app, "serve", lambda model, **kw: got.update(kw, model=model))
    monkeypatch.setenv("LMFORGE_API_KEY", "from-env")
    assert main(["serve", str(tiny_text_model), "--model-name", "m", "--max-queue", "3", "--max-tokens", "9",
                 "--max-body-bytes", "100", "--port", "0"]) == 0
    assert got["api_key"] == "from-env" and got["model_name"] == "m" and got["max_body_bytes"] == 100
    assert got["limits"] == Limits(max_queue=3, max_new_tokens=9) and got["host"] == "127.0.0.1"
    main(["serve", str(tiny_text_model), "--api-key", "flag"])
    assert got["api_key"] == "flag" and got["limits"] == Limits()


def test_no_request_reaches_the_filesystem(http, tiny_text_model):
    """Paths and model names that point at files are unknown routes or unknown models, never read."""
    for path in ("/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/static/../app.py", "/index.html",
                 f"/{tiny_text_model}/config.json"):
        assert http.get(path).status_code == 404, path
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for name in ("/etc/passwd", "../tiny", str(tiny_text_model)):
        error_of(http.post("/v1/chat/completions", json={**chat, "model": name}), 404, "model")
        error_of(http.get(f"/v1/models/{name}"), 404)
