"""The serving engine: one thread owns the model and runs every request the server takes.

    engine = Engine(model, tokenizer, Limits(max_batch=16, max_queue=64))
    req = engine.submit(prompt_ids, GenerationConfig(max_new_tokens=32), logprobs=2)
    for event in req:                 # or `async for event in req.stream()` on an event loop
        print(event.text, end="")     # the last event carries finish_reason "stop" or "length"
    vectors = engine.embed(["a text", "another"]).result()   # (2, d), batched with other callers'
    engine.close()

Requests wait in a bounded queue (`QueueFull` when it is full) and are decoded with
continuous batching (`lmforge.serve.batch`): at every step the engine thread takes the
waiting requests into the running batch while it has free slots (`Limits.max_batch`),
prefills their prompts (from where the prefix cache's copy of an earlier prompt's keys and values
ends: `lmforge.serve.prefix`), and runs one decoding step for every running sequence together.
Each request keeps its own options (greedy or sampling, filters, seed, stop strings,
max_new_tokens): its tokens are those `generate` gives it alone. A sequence that ends
(EOS or stop string: "stop"; max_new_tokens: "length"; `Request.cancel` or
`close(cancel=True)`: "cancelled") frees its slot for the next waiting request at once.
Its events (token id, text piece, log-probabilities, finish reason) come back through the
`Request` (lmforge.serve.request), read sync or async.

Work that is not a token stream runs whole on the same thread between two steps, so the
model is never used by two threads at once: `call(fn)` (beam search, encoder-decoders) and
`embed(texts)`, which joins every embedding request waiting at that moment into one
`lmforge.embed.embed` call. Requests enter the batch first in, first out; calls and
embeddings do not wait behind a request that waits for a free slot.

For /metrics: `stats` counts requests, prompt_tokens, cached_prompt_tokens (taken from the
prefix cache, not computed), completion_tokens, steps (decoding steps) and batch_tokens (the
sum of the batch sizes of those steps); `running` is the
number of sequences in the batch now and `queue_depth` the number of items waiting. Each
`Request` has `submitted`, `first_token_at` and `finished_at` (time.perf_counter()).
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.generate.config import GenerationConfig
from lmforge.generate.state import eos_list, prepare
from lmforge.serve.batch import Batch
from lmforge.serve.prefix import PrefixCache
from lmforge.serve.request import Event, Request

__all__ = ["Engine", "Limits", "Request", "Event", "QueueFull", "EngineClosed"]


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
    prefix_cache_mb: int = 64  # keys/values of recent prompts kept for reuse (lmforge.serve.prefix); 0: none

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_prompt_tokens", "max_new_tokens", "prefix_cache_mb"):
            v = getattr(self, name)
            least = 0 if name == "prefix_cache_mb" else 1
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
                raise ValueError(f"Limits.{name} must be an int >= {least}, got {v!r}")


class Engine:
    """Runs requests on one engine thread; see the module docstring."""

    def __init__(self, model, tokenizer, limits: Limits | None = None, threads: int | None = None):
        """threads: torch's threads on the engine thread (default: torch.get_num_threads() now).
        Every product runs there on an OpenMP team of its own; a second thread with a team (the
        caller's, once it has run a parallel op) on as many cores makes libgomp's threads sleep
        at each barrier instead of spinning, and a decoding step 2-3x slower: `lmforge serve`
        loads the model with torch at one thread and gives the engine the threads."""
        if tokenizer is None:
            raise ValueError("the engine needs a tokenizer saved with the model")
        self.model, self.tokenizer, self.limits = model.eval(), tokenizer, limits or Limits()
        self.eos = eos_list(model, None)
        self._ids = itertools.count(1)
        self._queue: collections.deque = collections.deque()  # Request, _Embed or (fn, Future)
        self._wake = threading.Condition()
        self._closing = self._cancel_all = False
        self.stats = collections.Counter()  # requests, prompt_tokens, completion_tokens, steps, batch_tokens
        self.last_error: str | None = None
        self._threads = threads or torch.get_num_threads()
        self._batch: Batch | None = None
        ready: Future = Future()  # the batch is made on the engine thread (it may measure kernels there)
        self._thread = threading.Thread(target=self._run, args=(ready,), name="lmforge-engine", daemon=True)
        self._thread.start()
        ready.result()

    def _run(self, ready: Future) -> None:
        torch.set_num_threads(self._threads)
        try:
            prefix = PrefixCache(self.limits.prefix_cache_mb << 20) if self.limits.prefix_cache_mb else None
            self._batch = Batch(self.model, self.tokenizer, self.eos, self.limits.max_batch, self.stats, prefix)
        except BaseException as e:  # noqa: BLE001  (raised again by __init__)
            ready.set_exception(e)
            return
        ready.set_result(None)
        self._loop()

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
        prepared = prepare(self.model, [list(prompt_ids)], None, config,  # the same checks as generate
                           tokenizer=self.tokenizer)
        req = Request(next(self._ids), list(prompt_ids), config, logprobs, _prepared=prepared)
        self._enqueue(req)
        return req

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the engine thread between steps (embeddings, beam search, encoder-decoder
        generation); its result or exception arrives in the Future. Queued like a request."""
        future: Future = Future()
        self._enqueue((fn, future))
        return future

    def embed(self, texts: list[str], normalize: bool = True) -> Future:
        """Embed `texts` on the engine thread, as `lmforge.embed.embed` (mean, [CLS] or last-token
        pooling as the model says); the Future gets a (len(texts), d) float32 tensor. Every
        embedding request waiting when this one's turn comes runs in the same call."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of texts, not a single string")
        future: Future = Future()
        self._enqueue(_Embed(list(texts), normalize, future))
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
        """Requests and calls waiting (not yet in the running batch)."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Sequences in the running batch now."""
        return len(self._batch)

    def close(self, cancel: bool = True, timeout: float | None = 30.0) -> None:
        """Stop taking requests; cancel (or with cancel=False finish) the ones queued and running;
        join the thread."""
        with self._wake:
            self._closing = True
            self._cancel_all = cancel
            self._wake.notify()
        self._thread.join(timeout)

    # ---- the engine thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        batch = self._batch
        while True:
            with self._wake:
                while not self._queue and not batch and not self._closing:
                    self._wake.wait()
                if self._closing and self._cancel_all:
                    abandoned, self._queue = list(self._queue), collections.deque()
                else:
                    abandoned = None
                    if not self._queue and not batch:
                        return
                    waiting = len(self._queue)  # what a call queues now waits for the next step
            if abandoned is not None:
                for item in abandoned:
                    _abandon(item)
                self._guard(lambda: batch.advance(cancel_all=True))
                return
            self._take(waiting)
            if batch:
                with torch.inference_mode():
                    self._guard(batch.advance)

    def _guard(self, step: Callable[[], None]) -> None:
        """Run a step of the batch; a bug must not kill the engine thread: it ends the
        running requests with finish reason "error"."""
        try:
            step()
        except Exception as e:  # noqa: BLE001
            self._batch.fail("error")
            self.stats["errors"] += 1
            self.last_error = repr(e)

    def _take(self, n: int) -> None:
        """Handle the first n queued items in order: run calls, run every embedding request
        waiting now as one, and admit requests while the batch has free slots (the first that
        finds none waits, and every request behind it), their prompts prefilled together."""
        with self._wake:
            items, free, held, now = list(self._queue), self._batch.free, False, []
            for item in items[:n]:
                if isinstance(item, Request) and not item.cancelled:
                    held = held or free == 0
                    if held:
                        continue
                    free -= 1
                now.append(item)
            embeds = [x for x in items if isinstance(x, _Embed)]
            now += [x for x in items[n:] if isinstance(x, _Embed)]
            taken = set(map(id, now))
            self._queue = collections.deque(x for x in items if id(x) not in taken)
        admit = []
        for item in now:
            if isinstance(item, Request):
                admit.append(item)
            elif isinstance(item, _Embed):
                if embeds:
                    self._embed(embeds)
                    embeds = []
            else:
                fn, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # noqa: BLE001  (handed to the caller)
                        future.set_exception(e)
        if admit:
            with torch.inference_mode():
                self._admit(admit)

    def _admit(self, reqs: list[Request]) -> None:
        for req in reqs:
            if req.cancelled:
                req._push(Event(finish_reason="cancelled"))
        reqs = [r for r in reqs if not r.done]
        self.stats["requests"] += len(reqs)
        self.stats["prompt_tokens"] += sum(r.prompt_tokens for r in reqs)
        try:
            self._batch.admit([(r, r._prepared) for r in reqs])
        except Exception as e:  # noqa: BLE001  (a prefill failed: these requests only)
            for r in reqs:
                if not r.done and all(s.req is not r for s in self._batch.seqs):
                    r._push(Event(finish_reason="error"))
            self.stats["errors"] += 1
            self.last_error = repr(e)

    def _embed(self, items: list[_Embed]) -> None:
        """One `embed` call for every item with texts; each caller gets its rows. If that call
        fails (one caller's bad text), each item runs alone and gets its own result or error."""
        from lmforge.embed import embed
        items = [it for it in items if it.future.set_running_or_notify_cancel()]
        joined = [it for it in items if it.texts]
        vectors = None
        if len(joined) > 1:
            try:
                vectors = embed(self.model, self.tokenizer, [t for it in joined for t in it.texts], normalize=False)
            except Exception:  # noqa: BLE001  (run them one by one below)
                vectors = None
        if vectors is not None:
            start = 0
            for it in joined:
                rows = vectors[start:start + len(it.texts)]
                start += len(it.texts)
                it.future.set_result(F.normalize(rows, dim=-1) if it.normalize else rows)
            items = [it for it in items if not it.texts]
        for it in items:
            try:
                it.future.set_result(embed(self.model, self.tokenizer, it.texts, normalize=it.normalize))
            except BaseException as e:  # noqa: BLE001  (handed to the caller)
                it.future.set_exception(e)


@dataclass
class _Embed:
    """An embedding request waiting in the queue."""

    texts: list[str]
    normalize: bool
    future: Future


def _abandon(item) -> None:
    if isinstance(item, Request):
        item._push(Event(finish_reason="cancelled"))
    else:
        (item.future if isinstance(item, _Embed) else item[1]).set_exception(
            EngineClosed("the server is shutting down"))
