"""The serving engine: one thread owns the model and runs every request the server takes.

    engine = Engine(model, tokenizer, Limits(max_batch=16, max_queue=64))
    req = engine.submit(prompt_ids, GenerationConfig(max_new_tokens=32), logprobs=2)
    for event in req:                 # or `async for event in req.stream()` on an event loop
        print(event.text, end="")     # the last event carries finish_reason "stop" or "length"
    engine.close()

Requests wait in a bounded queue (`QueueFull` when it is full) and run on the engine thread;
their events (token id, text piece, log-probabilities, finish reason) come back through the
`Request`, which a sync or async consumer reads and may `cancel()` at any time.
Work that is not a token stream (embeddings, beam search, encoder-decoder generation) runs
whole on the same thread through `call`, so the model is never used by two threads at once.

This version runs one request at a time: the `Engine` interface is the one the batched
scheduler keeps.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from lmforge.generate.config import GenerationConfig
from lmforge.generate.filters import min_new_tokens_filter, sample_next
from lmforge.generate.sampling import is_penalised, penalties
from lmforge.generate.state import DecoderState, eos_list, prepare
from lmforge.generate.stream import Detokenizer


class QueueFull(Exception):
    """The engine's queue holds `Limits.max_queue` waiting requests already (HTTP 429)."""


class EngineClosed(Exception):
    """The engine is shutting down or has stopped (HTTP 503)."""


@dataclass(frozen=True)
class Limits:
    """What the engine accepts. None means the model's context decides."""

    max_batch: int = 16  # sequences decoded together
    max_queue: int = 64  # requests waiting beyond the running batch; more → QueueFull
    max_prompt_tokens: int | None = None
    max_new_tokens: int | None = None

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_prompt_tokens", "max_new_tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"Limits.{name} must be an int >= 1, got {v!r}")


@dataclass
class Event:
    """One step of a request: a new token and the text it completes, or the end."""

    token: int | None = None  # None on an end event that carries no token
    text: str = ""  # the new text (may be "" while a character or a stop string is held back)
    logprob: float | None = None  # log p(token) under the model (raw logits), when asked
    top_logprobs: list[tuple[int, float]] | None = None  # the k most likely (token, log p), when asked
    finish_reason: str | None = None  # "stop", "length" or "cancelled" on the last event


@dataclass
class Request:
    """A submitted generation: read its events (iterate, or `stream()` on an event loop)."""

    id: int
    prompt_ids: list[int]
    config: GenerationConfig
    logprobs: int | None = None  # top log-probs per token (0: just the chosen token's)
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    _events: collections.deque = field(default_factory=collections.deque, repr=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _waiters: list = field(default_factory=list, repr=False)  # (loop, asyncio.Event)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop generating; the engine frees the request's slot at its next step."""
        self._cancel.set()

    # ---- the engine's side
    def _push(self, event: Event) -> None:
        if event.token is not None:
            self.completion_tokens += 1
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, flag in waiters:
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # the consumer's loop has closed
                pass

    # ---- the consumer's side
    def __iter__(self) -> Iterator[Event]:
        """Events until the last one (blocking)."""
        while True:
            with self._cond:
                while not self._events:
                    self._cond.wait()
                event = self._events.popleft()
            yield event
            if event.finish_reason is not None:
                return

    async def stream(self) -> AsyncIterator[Event]:
        """Events until the last one, awaited on the running event loop. Leaving the loop
        early (a client that went away) cancels the request."""
        flag = asyncio.Event()
        waiter = (asyncio.get_running_loop(), flag)
        with self._cond:
            self._waiters.append(waiter)
        try:
            while True:
                flag.clear()
                with self._cond:
                    event = self._events.popleft() if self._events else None
                if event is None:
                    await flag.wait()
                    continue
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            with self._cond:
                self._waiters.remove(waiter)
            if not self.done:
                self.cancel()

    def result(self) -> tuple[str, list[Event]]:
        """Wait for the end: (the whole text, every event)."""
        events = list(self)
        return "".join(e.text for e in events), events


class Engine:
    """Runs requests on one engine thread; see the module docstring."""

    def __init__(self, model, tokenizer, limits: Limits | None = None):
        if tokenizer is None:
            raise ValueError("the engine needs a tokenizer saved with the model")
        self.model, self.tokenizer, self.limits = model.eval(), tokenizer, limits or Limits()
        self.eos = eos_list(model, None)
        self._ids = itertools.count(1)
        self._queue: collections.deque = collections.deque()  # Request or (fn, Future)
        self._wake = threading.Condition()
        self._closing = self._cancel_all = False
        self.stats = collections.Counter()  # requests, prompt_tokens, completion_tokens, steps, ...
        self.running = 0  # sequences in the running batch (for /metrics)
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self._thread.start()

    # ---- submitting
    def submit(self, prompt_ids: list[int], config: GenerationConfig, *, logprobs: int | None = None) -> Request:
        """Queue a greedy or sampling generation from `prompt_ids` (checked here: ValueError
        names the problem). Raises QueueFull or EngineClosed."""
        if config.strategy not in ("greedy", "sample") or config.prompt_lookup:
            raise ValueError(f"the engine streams strategy 'greedy' or 'sample', got {config.strategy!r}; "
                             "run beam search through Engine.call")
        if self.model.cfg.family != "decoder":
            raise ValueError("the engine batches decoder-only models; run encoder-decoders through Engine.call")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= 20):
            raise ValueError(f"logprobs must be an int in [0, 20], got {logprobs!r}")
        lim = self.limits
        if lim.max_prompt_tokens is not None and len(prompt_ids) > lim.max_prompt_tokens:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this server takes at most "
                             f"{lim.max_prompt_tokens}")
        if lim.max_new_tokens is not None and config.max_new_tokens > lim.max_new_tokens:
            raise ValueError(f"max_tokens={config.max_new_tokens} is over this server's limit of "
                             f"{lim.max_new_tokens}")
        prepare(self.model, [list(prompt_ids)], None, config.replace(stop=()))  # the same checks as generate
        req = Request(next(self._ids), list(prompt_ids), config, logprobs)
        self._enqueue(req)
        return req

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the engine thread between steps (embeddings, beam search, encoder-decoder
        generation); its result or exception arrives in the Future. Queued like a request."""
        future: Future = Future()
        self._enqueue((fn, future))
        return future

    def _enqueue(self, item) -> None:
        with self._wake:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if len(self._queue) >= self.limits.max_queue:
                raise QueueFull(f"the queue is full ({self.limits.max_queue} requests waiting); retry later")
            self._queue.append(item)
            self._wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def close(self, cancel: bool = True, timeout: float | None = 30.0) -> None:
        """Stop taking requests; cancel (or finish) the ones queued and running; join the thread."""
        with self._wake:
            self._closing = True
            self._cancel_all = cancel
            self._wake.notify()
        self._thread.join(timeout)

    # ---- the engine thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return
                item = self._queue.popleft()
                if self._closing and self._cancel_all:
                    _abandon(item)
                    continue
            if isinstance(item, Request):
                self.running = 1
                try:
                    self._run(item)
                except Exception as e:  # a bug must not kill the engine thread: end the request
                    item._push(Event(finish_reason="error", text=""))
                    self.stats["errors"] += 1
                    self.last_error = repr(e)
                finally:
                    self.running = 0
            else:
                fn, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # noqa: BLE001  (handed to the caller)
                        future.set_exception(e)

    @torch.inference_mode()
    def _run(self, req: Request) -> None:
        model, config = self.model, req.config
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += req.prompt_tokens
        p = prepare(model, [req.prompt_ids], None, config.replace(stop=()))
        params, do_sample = config.sampling, config.strategy == "sample"
        state, logits = DecoderState.prefill(model, p.ids, p.mask, config.max_new_tokens)
        detok = Detokenizer(self.tokenizer, config.stop)
        hist = p.ids.clone()
        for t in range(config.max_new_tokens):
            if req.cancelled or (self._closing and self._cancel_all):
                req._push(Event(finish_reason="cancelled"))
                return
            if self.eos and t < config.min_new_tokens:
                logits = min_new_tokens_filter(logits, self.eos, t, config.min_new_tokens)
            if do_sample:
                token = sample_next(params.process(logits, hist), p.generator)
            else:
                token = (penalties(logits, hist, params) if is_penalised(params) else logits).argmax(-1)
            tok = int(token[0])
            hist = torch.cat([hist, token.view(1, 1)], 1)
            event = Event(token=tok)
            if req.logprobs is not None:
                logp = logits[0].log_softmax(-1)
                event.logprob = float(logp[tok])
                if req.logprobs:
                    top = logp.topk(req.logprobs)
                    event.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
            self.stats["completion_tokens"] += 1
            if tok in self.eos:
                event.text, event.finish_reason = detok.flush(), "stop"
            else:
                event.text = detok.push(tok)
                if detok.stopped:
                    event.finish_reason = "stop"
                elif t + 1 == config.max_new_tokens:
                    event.text += detok.flush()
                    event.finish_reason = "length"
            req._push(event)
            if event.finish_reason is not None:
                return
            logits = state.step(token)


def _abandon(item) -> None:
    if isinstance(item, Request):
        item._push(Event(finish_reason="cancelled"))
    else:
        item[1].set_exception(EngineClosed("the server is shutting down"))
