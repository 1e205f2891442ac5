"""HTTP server: generation, chat (OpenAI-style, with server-sent-event streaming) and embeddings.

    lmforge serve MODEL [--host 127.0.0.1] [--port 8000]

Endpoints: GET /health; POST /v1/generate; POST /v1/chat/completions; POST /v1/embeddings.
Generation requests take every `GenerationConfig` option by its name (/v1/generate:
{"prompt": ..., "max_new_tokens": 64, "no_repeat_ngram_size": 3, "truncate": true, ...});
chat also takes OpenAI's max_tokens, and a temperature > 0 there means sampling.
Every request runs on the engine thread (`lmforge.serve.engine`): greedy and sampling
token streams through `Engine.submit`, the rest (beam search, encoder-decoders, embeddings)
through `Engine.call`.
"""


import dataclasses
import json
import time
import typing
import uuid

from lmforge import api
from lmforge.generate.config import FIELDS, GenerationConfig
from lmforge.serve.engine import Engine


def request_model(name: str, defaults: dict | None = None, **extra):
    """A pydantic request model with one field per `GenerationConfig` option (its type, its
    default or `defaults[name]`, its help as the description) plus `extra` fields
    (name=(type, default)). Values are checked by GenerationConfig itself."""
    from pydantic import Field, create_model
    defaults, hints = defaults or {}, typing.get_type_hints(GenerationConfig)
    fields = {}
    for f in dataclasses.fields(GenerationConfig):
        default = defaults.get(f.name, f.default)
        kind = hints[f.name] if default is not None or f.default is None else hints[f.name] | None
        if typing.get_origin(kind) is tuple:
            kind = list[str]
            default = list(default)
        fields[f.name] = (kind, Field(default, description=f.metadata["help"]))
    return create_model(name, **fields, **extra)


def create_app(model_dir: str, int8: bool = False):
    """A FastAPI app serving the model at `model_dir` (int8: quantised weights, see api.load)."""
    try:
        from fastapi import FastAPI, HTTPException
        from fastapi.responses import StreamingResponse
        from pydantic import BaseModel
    except ImportError as e:
        raise ImportError("the server needs FastAPI and uvicorn: pip install 'lmforge[serve]'") from e

    model, tok = api.load(model_dir, int8=int8)
    if tok is None:
        raise ValueError(f"{model_dir}: the server needs a tokenizer next to the model")
    engine = Engine(model, tok)
    app = FastAPI(title="lmforge", version="0.1.0")
    app.state.engine = engine

    GenerateRequest = request_model("GenerateRequest", prompt=(str, ...), stream=(bool, False))
    # OpenAI's chat: max_tokens (256), temperature 0 → greedy, > 0 → sampling (unless strategy says)
    ChatRequest = request_model("ChatRequest", {"max_new_tokens": 256, "temperature": 0.0, "strategy": None},
                                messages=(list[dict], ...), stream=(bool, False), max_tokens=(int | None, None))

    class EmbeddingsRequest(BaseModel):
        input: list[str] | str
        normalize: bool = True

    def generation(r) -> GenerationConfig:
        """The request's GenerationConfig (ValueError → 400 naming the field)."""
        options = {k: getattr(r, k) for k in FIELDS}
        if isinstance(r, ChatRequest):
            if r.max_tokens is not None:
                options["max_new_tokens"] = r.max_tokens
            if options["strategy"] is None:
                options["strategy"] = "sample" if r.temperature > 0 else "greedy"
        return GenerationConfig(**options)

    def run(prompt, stream, config):
        """The text (stream=False) or an iterator of text pieces, made on the engine thread."""
        streamable = config.strategy != "beam" and not config.prompt_lookup and model.cfg.family == "decoder"
        if stream and streamable:
            ids = tok.encode(prompt)
            if not ids:
                raise ValueError("the prompt is empty")
            req = engine.submit(ids, config)
            return (e.text for e in req if e.text)
        text = engine.call(lambda: api.generate_text(model, tok, prompt, config)).result()
        return iter([text]) if stream else text

    def sse(chunks):
        for c in chunks:
            yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    @app.get("/", include_in_schema=False)
    def playground():
        from importlib.resources import files

        from fastapi.responses import HTMLResponse
        return HTMLResponse((files("lmforge.serve") / "static" / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_dir, "family": model.cfg.family, "task": model.cfg.task}

    @app.post("/v1/generate")
    def generate(r: GenerateRequest):
        try:
            if r.stream:
                it = run(r.prompt, True, generation(r))
                return StreamingResponse(sse({"text": d} for d in it), media_type="text/event-stream")
            text = run(r.prompt, False, generation(r))
            return {"text": text}
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None

    @app.post("/v1/chat/completions")
    def chat(r: ChatRequest):
        try:
            prompt = api.chat_prompt(tok, r.messages)
            rid, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())
            if r.stream:
                it = run(prompt, True, generation(r))
                chunks = ({"id": rid, "object": "chat.completion.chunk", "created": created,
                           "choices": [{"index": 0, "delta": {"content": d}}]} for d in it)
                return StreamingResponse(sse(chunks), media_type="text/event-stream")
            text = run(prompt, False, generation(r))
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_dir,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}]}
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None

    @app.post("/v1/embeddings")
    def embeddings(r: EmbeddingsRequest):
        from lmforge.embed import embed
        texts = [r.input] if isinstance(r.input, str) else r.input
        try:
            vecs = engine.call(lambda: embed(model, tok, texts, normalize=r.normalize)).result()
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        return {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": v}
                                           for i, v in enumerate(vecs.tolist())]}

    return app


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, int8: bool = False) -> None:
    import uvicorn
    uvicorn.run(create_app(model_dir, int8=int8), host=host, port=port, log_level="info")
