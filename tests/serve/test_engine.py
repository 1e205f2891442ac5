"""The serving engine: its requests give what `generate` gives, read sync or async."""

import asyncio
import threading

import pytest

from lmforge.generate import GenerationConfig, generate
from lmforge.serve.engine import Engine, Limits, QueueFull


@pytest.fixture(scope="module")
def loaded(tiny_text_model):
    import lmforge
    return lmforge.load(tiny_text_model)


@pytest.fixture
def engine(loaded):
    e = Engine(*loaded, Limits(max_queue=4))
    yield e
    e.close()


def test_greedy_request_equals_generate(engine, loaded):
    model, tok = loaded
    ids = tok.encode("the quick brown")
    config = GenerationConfig(max_new_tokens=10)
    want = generate(model, [ids], config=config, tokenizer=tok)
    text, events = engine.submit(ids, config, logprobs=2).result()
    assert [e.token for e in events] == want.tolist()[0]
    assert text == want.texts[0]
    assert events[-1].finish_reason in ("stop", "length")
    assert all(e.logprob is not None and len(e.top_logprobs) == 2 for e in events)


def test_async_stream_and_cancel(engine, loaded):
    model, tok = loaded
    ids = tok.encode("the")

    async def main():
        req = engine.submit(ids, GenerationConfig(max_new_tokens=50))
        async for event in req.stream():
            break  # the client went away
        return req

    req = asyncio.run(main())
    assert req.cancelled
    _, events = engine.submit(ids, GenerationConfig(max_new_tokens=3)).result()  # the engine goes on
    assert events[-1].finish_reason in ("stop", "length")


def test_bad_requests_are_refused_at_submit(engine, loaded):
    _, tok = loaded
    with pytest.raises(ValueError, match="logprobs"):
        engine.submit(tok.encode("a"), GenerationConfig(), logprobs=99)
    with pytest.raises(ValueError, match="beam"):
        engine.submit(tok.encode("a"), GenerationConfig(strategy="beam"))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.submit([], GenerationConfig())


def test_full_queue_raises(loaded):
    engine = Engine(*loaded, Limits(max_queue=1))
    try:
        started, release = threading.Event(), threading.Event()
        block = engine.call(lambda: (started.set(), release.wait(10)))
        assert started.wait(10)  # the engine thread is busy; the queue is empty
        engine.submit(loaded[1].encode("a"), GenerationConfig(max_new_tokens=2))
        with pytest.raises(QueueFull):
            engine.submit(loaded[1].encode("a"), GenerationConfig(max_new_tokens=2))
        release.set()
        block.result()
    finally:
        engine.close()
