"""A request to the serving engine and its events, read by a sync or async consumer.

The engine thread pushes `Event`s into a `Request` (`_push`); the consumer iterates them
(blocking) or awaits them (`stream()` on an event loop), and may `cancel()` at any time:
the engine then ends the request with finish reason "cancelled" at its next step.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from lmforge.generate.config import GenerationConfig


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
    first_token_at: float | None = None  # perf_counter times, like submitted
    finished_at: float | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    finish_reason: str | None = None  # "stop", "length", "cancelled" (or "error": an engine bug)
    _prepared: object = field(default=None, repr=False)  # the checked prompt (generate.state.Prepared)
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
            self.finished_at = time.perf_counter()
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
