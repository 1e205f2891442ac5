"""How a request runs on the engine: its choices submitted (streamed kinds) or run whole (beam
search, encoder-decoders), waited for or merged into one event stream, and sent as server-sent
events that cancel their requests when the client goes away."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field

from fastapi.responses import StreamingResponse

from lmforge.generate.config import GenerationConfig
from lmforge.serve.engine import Engine, EngineClosed, Event, QueueFull, Request
from lmforge.serve.errors import APIError, bad_value
from lmforge.serve.metrics import Metrics
from lmforge.serve.openai_schema import generation_config, value_error


@dataclass
class Answer:
    """One finished choice."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache gave
    events: list[Event] = field(default_factory=list)  # token events (log-probabilities)


class Server:
    """The model, its tokenizer, the engine and the metrics, and how a request runs on them."""

    def __init__(self, model, tokenizer, engine: Engine, metrics: Metrics, name: str):
        self.model, self.tok, self.engine, self.metrics, self.name = model, tokenizer, engine, metrics, name
        self.created = int(time.time())

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.name:
            raise APIError(404, f"the model {requested!r} does not exist; this server has {self.name!r}",
                           "model", "model_not_found")

    @contextmanager
    def errors(self, r=None):
        """The engine's and the generation code's errors as HTTP errors."""
        try:
            yield
        except QueueFull as e:
            raise APIError(429, str(e), None, "queue_full") from None
        except EngineClosed as e:
            raise APIError(503, str(e), None, "shutting_down") from None
        except ValueError as e:
            raise value_error(e, r) from None

    # ---- preparing
    def encode(self, text: str, param: str) -> list[int]:
        ids = self.tok.encode(text)
        if not ids:
            raise bad_value(f"{param} is empty", param)
        return ids

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = self.model.cfg.vocab_size
        if not ids or any(not 0 <= i < vocab for i in ids):
            raise bad_value(f"{param} must be a non-empty list of token ids in [0, {vocab})", param)
        return ids

    def config(self, r, n_prompt: int, max_tokens: int | None) -> GenerationConfig:
        """The request's GenerationConfig for a prompt of n_prompt tokens; max_tokens None: what
        the context leaves (at most the server's --max-tokens)."""
        cap = self.engine.limits.max_new_tokens
        config = generation_config(r, max_tokens if max_tokens is not None else cap or self.model.cfg.max_len,
                                   r.seed)
        if max_tokens is None:
            from lmforge.generate import fit_to_context
            with self.errors(r):
                config, _ = fit_to_context(self.model, n_prompt, config)
        return config

    def fit(self, ids: list[int], config: GenerationConfig) -> list[int]:
        """The prompt's ids, its first ones dropped when truncate=true and it is too long."""
        cfg = self.model.cfg
        window = cfg.max_len - config.max_new_tokens if cfg.family == "decoder" else cfg.max_len
        return ids[-window:] if config.truncate and 0 < window < len(ids) else ids

    def streamable(self, config: GenerationConfig) -> bool:
        return (self.model.cfg.family == "decoder" and config.strategy != "beam" and not config.prompt_lookup
                and config.num_return_sequences == 1)

    # ---- running
    async def start(self, ids, config, n: int = 1, logprobs: int | None = None, r=None) -> list:
        """n choices: submitted Requests (streamable), else finished Answers (run whole)."""
        ids = self.fit(ids, config)
        if self.streamable(config):
            reqs = []
            try:
                with self.errors(r):
                    for i in range(n):  # choice i samples with seed + i
                        c = config if config.seed is None or i == 0 else config.replace(seed=config.seed + i)
                        reqs.append(self.engine.submit(ids, c, logprobs=logprobs))
            except BaseException:
                cancel(reqs)
                raise
            return reqs
        if logprobs is not None:
            raise bad_value("logprobs are available for greedy and sampling decoding only", "logprobs")
        return await self.whole(ids, config, n, r)

    async def whole(self, ids, config, n, r) -> list[Answer]:
        """Beam search (n best), or an encoder-decoder's generation, run whole on the engine thread."""
        from lmforge.generate import generate
        from lmforge.generate.state import eos_list
        limits = self.engine.limits  # Engine.submit checks these for the streamed kind
        if limits.max_prompt_tokens is not None and len(ids) > limits.max_prompt_tokens:
            raise bad_value(f"the prompt has {len(ids)} tokens; this server takes at most "
                            f"{limits.max_prompt_tokens}", "prompt")
        if limits.max_new_tokens is not None and config.max_new_tokens > limits.max_new_tokens:
            raise bad_value(f"max_tokens={config.max_new_tokens} is over this server's limit of "
                            f"{limits.max_new_tokens}", "max_tokens")
        if config.strategy == "sample" and n > 1:
            config = config.replace(num_return_sequences=n)
        t0 = time.perf_counter()
        with self.errors(r):
            gen = await asyncio.wrap_future(self.engine.call(
                lambda: generate(self.model, [ids], config=config, tokenizer=self.tok)))
        eos, answers = set(eos_list(self.model, None)), []
        for row, text in zip(gen.tolist(), gen.texts):
            # "length" when the budget ran out (a stop string ending on the last token counts as length)
            ended = (row and row[-1] in eos) or len(row) < config.max_new_tokens
            answers.append(Answer(text, "stop" if ended else "length", len(row)))
            self.metrics.generation(len(ids), len(row), answers[-1].finish_reason,
                                    duration=time.perf_counter() - t0)
        return (answers * n)[:n] if len(answers) < n else answers  # greedy: n copies

    async def events(self, req: Request):
        """The request's events; the metrics when it ends (finished, failed or cancelled)."""
        try:
            async with aclosing(req.stream()) as events:
                async for e in events:
                    if e.finish_reason in ("cancelled", "error"):
                        raise (APIError(503, "the server is shutting down", None, "shutting_down")
                               if e.finish_reason == "cancelled" else
                               APIError(500, "the generation failed on the engine", None, "engine_error"))
                    yield e
        finally:
            now = time.perf_counter()
            end = getattr(req, "finished_at", None) or now
            self.metrics.generation(req.prompt_tokens, req.completion_tokens, req.finish_reason,
                                    ttft=None if req.first_token_at is None else req.first_token_at - req.submitted,
                                    duration=end - req.submitted)

    async def collect(self, started) -> Answer:
        if isinstance(started, Answer):
            return started
        answer = Answer()
        async with aclosing(self.events(started)) as events:
            async for e in events:
                answer.text += e.text
                if e.token is not None:
                    answer.events.append(e)
        answer.finish_reason, answer.completion_tokens = started.finish_reason, started.completion_tokens
        answer.cached_tokens = started.cached_tokens
        return answer

    async def finish(self, started: list, client=None) -> list[Answer]:
        """Wait for every choice (the engine thread does the work); if `client` (the HTTP
        request) disconnects first, cancel them."""
        work = asyncio.ensure_future(asyncio.gather(*(self.collect(s) for s in started)))
        gone = asyncio.ensure_future(_disconnect(client)) if client is not None else None
        try:
            await asyncio.wait([t for t in (work, gone) if t is not None], return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                raise APIError(499, "the client closed the connection", None, "client_closed")
            return list(work.result())
        finally:
            cancel(started)
            for t in (work, gone):
                if t is not None and not t.done():
                    t.cancel()

    async def merged(self, started: list):
        """(choice index, Event) from every choice as they come."""
        sources = [self.events(s) if isinstance(s, Request) else _whole_events(s) for s in started]
        if len(sources) == 1:
            async with aclosing(sources[0]) as events:
                async for e in events:
                    yield 0, e
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, source):
            try:
                async with aclosing(source) as events:
                    async for e in events:
                        queue.put_nowait((i, e, None))
            except Exception as e:  # noqa: BLE001  (re-raised by the consumer)
                queue.put_nowait((i, None, e))
            finally:
                queue.put_nowait((i, None, None))
        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(sources)]
        try:
            live = len(tasks)
            while live:
                i, e, error = await queue.get()
                if error is not None:
                    raise error
                if e is None:
                    live -= 1
                else:
                    yield i, e
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def usage(self, prompt_tokens: int, started_or_answers: list, n: int = 1) -> dict:
        """OpenAI's usage of prompts with n choices each (choice 0 of each prompt first, then
        the others): cached_tokens are those of each prompt's first choice."""
        completion = sum(s.completion_tokens for s in started_or_answers)
        cached = sum(s.cached_tokens for s in started_or_answers[::n])
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}


async def _disconnect(client) -> None:
    """Return when the client of the Starlette request `client` disconnects (its body is read)."""
    while (await client.receive())["type"] != "http.disconnect":
        pass


async def _whole_events(answer: Answer):
    yield Event(text=answer.text, finish_reason=answer.finish_reason)


def cancel(started: list) -> None:
    for s in started:
        if isinstance(s, Request) and not s.done:
            s.cancel()


class EventStream(StreamingResponse):
    """Server-sent events; however the response ends (the client gone included), the body is
    closed and the requests behind it cancelled."""

    def __init__(self, chunks, started: list):
        super().__init__(_sse(chunks), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.started = started

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            cancel(self.started)


async def _sse(chunks):
    async with aclosing(chunks) as it:
        try:
            async for c in it:
                yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
    yield "data: [DONE]\n\n"
