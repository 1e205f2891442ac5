"""OpenAI's endpoints: /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/models.

Responses carry `usage` (prompt tokens counted once per prompt, with
`prompt_tokens_details.cached_tokens` those the prefix cache gave; completion tokens summed
over the choices) and each choice a `finish_reason`: "stop" (EOS or a stop string) or
"length" (max_tokens). Streams are server-sent events, `data: {...}` then `data: [DONE]`;
each choice's last chunk carries its finish_reason, and with
stream_options.include_usage a last chunk has empty `choices` and the `usage`.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid

from starlette.requests import Request as HTTPRequest

from lmforge import api
from lmforge.serve.errors import bad_value
from lmforge.serve.openai_schema import (ChatRequest, CompletionRequest, EmbeddingsRequest, chat_logprobs,
                                         check_extras, completion_logprobs, message_text)
from lmforge.serve.runner import EventStream, Server, cancel


def add_openai_routes(app, s: Server) -> None:
    """Register the OpenAI endpoints of the server `s` on `app`."""
    tok = s.tok

    def head(prefix: str, kind: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
                "model": s.name}

    def card() -> dict:
        return {"id": s.name, "object": "model", "created": s.created, "owned_by": "lmforge"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{name}")
    def model(name: str):
        s.check_model(name)
        return card()

    def prompts(prompt, param: str = "prompt") -> list[tuple[str, list[int]]]:
        """(text, ids) of each prompt: a string, strings, token ids, or lists of token ids."""
        if isinstance(prompt, str):
            return [(prompt, s.encode(prompt, param))]
        if not prompt:
            raise bad_value(f"{param} is an empty list", param)
        if all(isinstance(p, int) for p in prompt):
            return [(tok.decode(prompt), s.check_ids(prompt, param))]
        return [(p, s.encode(p, f"{param}[{i}]")) if isinstance(p, str)
                else (tok.decode(p), s.check_ids(p, f"{param}[{i}]")) for i, p in enumerate(prompt)]

    def include_usage(r) -> bool:
        return bool(r.stream and r.stream_options and r.stream_options.include_usage)

    def no_beam_stream(r, config) -> None:
        if r.stream and config.strategy == "beam":
            raise bad_value("beam search (num_beams > 1) does not stream; send stream=false", "num_beams")

    @app.post("/v1/completions")
    async def completions(r: CompletionRequest, client: HTTPRequest):
        s.check_model(r.model)
        check_extras(r)
        started, offsets, n_prompt = [], [], 0  # offsets: each choice's prompt length (text_offset)
        try:
            for text, ids in prompts(r.prompt):
                config = s.config(r, len(ids), r.max_tokens)
                no_beam_stream(r, config)
                got = await s.start(ids, config, r.n, r.logprobs, r)
                started += got
                offsets += [len(text)] * len(got)
                n_prompt += len(s.fit(ids, config))
        except BaseException:
            cancel(started)
            raise
        out = head("cmpl", "text_completion")
        if r.stream:
            async def chunks():
                offset = list(offsets)
                async for i, e in s.merged(started):
                    lp = None
                    if r.logprobs is not None and e.token is not None:
                        lp = completion_logprobs(tok, [e], offset[i])
                        offset[i] += len(lp["tokens"][0])
                    if e.text or lp or e.finish_reason:
                        yield {**out, "choices": [{"index": i, "text": e.text, "logprobs": lp,
                                                   "finish_reason": e.finish_reason}]}
                if include_usage(r):
                    yield {**out, "choices": [], "usage": s.usage(n_prompt, started, r.n)}
            return EventStream(chunks(), started)
        answers = await s.finish(started, client)
        choices = [{"index": i, "text": a.text, "finish_reason": a.finish_reason,
                    "logprobs": None if r.logprobs is None else completion_logprobs(tok, a.events, offsets[i])}
                   for i, a in enumerate(answers)]
        return {**out, "choices": choices, "usage": s.usage(n_prompt, answers, r.n)}

    @app.post("/v1/chat/completions")
    async def chat(r: ChatRequest, client: HTTPRequest):
        from jinja2 import TemplateError
        s.check_model(r.model)
        check_extras(r)
        messages = message_text(r.messages)
        if r.top_logprobs is not None and not r.logprobs:
            raise bad_value("top_logprobs needs logprobs=true", "top_logprobs")
        logprobs = (r.top_logprobs or 0) if r.logprobs else None
        try:
            prompt = api.chat_prompt(tok, messages)
        except (ValueError, TemplateError) as e:
            raise bad_value(f"messages: {e}", "messages") from None
        ids = s.encode(prompt, "messages")
        config = s.config(r, len(ids), r.max_completion_tokens if r.max_completion_tokens is not None
                          else r.max_tokens)
        no_beam_stream(r, config)
        started = await s.start(ids, config, r.n, logprobs, r)
        n_prompt = len(s.fit(ids, config))
        if r.stream:
            out = head("chatcmpl", "chat.completion.chunk")

            async def chunks():
                for i in range(len(started)):
                    yield {**out, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]}
                async for i, e in s.merged(started):
                    lp = chat_logprobs(tok, [e]) if logprobs is not None and e.token is not None else None
                    if e.text or lp or e.finish_reason:
                        yield {**out, "choices": [{"index": i, "delta": {"content": e.text} if e.text else {},
                                                   "logprobs": lp, "finish_reason": e.finish_reason}]}
                if include_usage(r):
                    yield {**out, "choices": [], "usage": s.usage(n_prompt, started, r.n)}
            return EventStream(chunks(), started)
        answers = await s.finish(started, client)
        choices = [{"index": i, "message": {"role": "assistant", "content": a.text}, "finish_reason": a.finish_reason,
                    "logprobs": None if logprobs is None else chat_logprobs(tok, a.events)}
                   for i, a in enumerate(answers)]
        return {**head("chatcmpl", "chat.completion"), "choices": choices, "usage": s.usage(n_prompt, answers, r.n)}

    @app.post("/v1/embeddings")
    async def embeddings(r: EmbeddingsRequest):
        import numpy as np

        from lmforge.embed import embed
        s.check_model(r.model)
        check_extras(r)
        texts = prompts(r.input, "input")
        if r.dimensions is not None and r.dimensions != s.model.cfg.d_model:
            raise bad_value(f"dimensions={r.dimensions}: this model's vectors have {s.model.cfg.d_model}",
                            "dimensions")
        strings = [t for t, _ in texts]
        engine_embed = getattr(s.engine, "embed", None)  # the batched engine's own, where it has one
        with s.errors(r):
            future = (engine_embed(strings, r.normalize) if engine_embed is not None else
                      s.engine.call(lambda: embed(s.model, tok, strings, normalize=r.normalize)))
        try:
            vectors = await asyncio.wrap_future(future)
        except ValueError as e:
            raise bad_value(str(e).replace("texts", "input"), "input") from None
        vectors = vectors.tolist() if hasattr(vectors, "tolist") else vectors
        if r.encoding_format == "base64":  # little-endian float32, as OpenAI sends them
            vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
        n = sum(len(ids) for _, ids in texts)
        return {"object": "list", "model": s.name, "usage": {"prompt_tokens": n, "total_tokens": n},
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]}
