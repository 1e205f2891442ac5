"""The HTTP server: OpenAI's API (completions, chat, embeddings, models) and lmforge's own
/v1/generate, in front of one `Engine`.

    lmforge serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--model-name NAME]

    POST /v1/completions         prompt (text, texts or token ids) → text; SSE with stream=true
    POST /v1/chat/completions    messages → the assistant's reply; SSE with stream=true
    POST /v1/embeddings          input → vectors (encoding_format float or base64)
    GET  /v1/models              the one model, by its short name
    POST /v1/generate            lmforge's own: every GenerationConfig option by its name
    GET  /health, GET /metrics   liveness; Prometheus text
    GET  /                       the playground page (static/index.html)

Field meanings and the policy for fields it cannot honour: `openai_schema`. Errors, the API
key and the body limit: `errors`. Greedy and sampling decoder generations stream from the
engine (`Engine.submit`); beam search and encoder-decoders run whole on the engine thread
(`Engine.call`). Handlers never block the event loop, and a client that goes away (streaming
or waiting for a whole answer) cancels its requests.
"""

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

import torch

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, PlainTextResponse
except ImportError as e:
    raise ImportError("the server needs FastAPI and uvicorn: pip install 'lmforge[serve]'") from e

from lmforge import api
from lmforge.generate.config import FIELDS, GenerationConfig
from lmforge.serve.engine import Engine, Limits
from lmforge.serve.errors import Guard, bad_value, install_handlers
from lmforge.serve.metrics import Metrics
from lmforge.serve.openai_schema import SERVER_CHOSEN, generate_request_model
from lmforge.serve.routes_openai import add_openai_routes
from lmforge.serve.runner import EventStream, Server

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
             "/v1/embeddings", "/v1/generate")


def default_model_name(model_dir) -> str:
    """The name the API calls the model: the directory's (or file's) name without its suffix."""
    path = Path(str(model_dir).rstrip("/\\"))
    return (path.stem if path.suffix in (".gguf", ".safetensors", ".bin", ".pt") else path.name) or "model"


def create_app(model_dir, *, model_name: str | None = None, api_key: str | None = None,
               limits: Limits | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               quantize: str | None = None, int8: bool = False, shutdown_timeout: float = 30.0):
    """A FastAPI app serving the model at `model_dir` (see the module docstring).

    model_name: what /v1/models calls it and requests must name, if they name one (default:
    the directory's name). api_key: every endpoint but /health and / needs
    `Authorization: Bearer <api_key>` (None: no key). limits: the engine's batch, queue, prompt
    and max_tokens limits. max_body_bytes: larger request bodies are a 413. quantize: "int8" or
    "int4" weights (int8=True: "int8"; see api.load). On shutdown the engine finishes what it runs, for up to
    shutdown_timeout seconds."""
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be an int >= 1, got {max_body_bytes!r}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this thread serves HTTP; the engine's thread gets the threads (see Engine)
    model, tok = api.load(model_dir, quantize=quantize, int8=int8)
    if tok is None:
        raise ValueError(f"{model_dir}: the server needs a tokenizer next to the model")
    engine, metrics = Engine(model, tok, limits, threads=threads), Metrics()
    s = Server(model, tok, engine, metrics, model_name or default_model_name(model_dir))

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.close, cancel=False, timeout=shutdown_timeout)

    app = FastAPI(title="lmforge", version="0.1.0", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.server = engine, metrics, s
    install_handlers(app)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics, endpoints=ENDPOINTS)

    @app.get("/", include_in_schema=False)
    def playground():
        from importlib.resources import files
        return HTMLResponse((files("lmforge.serve") / "static" / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    def health():
        return {"status": "ok", "model": s.name, "family": model.cfg.family, "task": model.cfg.task}

    @app.get("/metrics")
    def prometheus():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4; charset=utf-8")

    GenerateRequest = generate_request_model()

    @app.post("/v1/generate")
    async def generate(r: GenerateRequest, client: Request):
        with s.errors(r):
            config = GenerationConfig(**{k: getattr(r, k) for k in FIELDS if k not in SERVER_CHOSEN})
        if r.stream and config.strategy == "beam":
            raise bad_value("beam search does not stream; send stream=false", "stream")
        ids = s.encode(r.prompt, "prompt")
        started = await s.start(ids, config, r=r)
        n_prompt = len(s.fit(ids, config))
        if r.stream:
            async def chunks():
                async for _, e in s.merged(started):
                    if e.text or e.finish_reason:
                        yield {"text": e.text, "finish_reason": e.finish_reason}
            return EventStream(chunks(), started)
        answers = await s.finish(started, client)
        out = {"text": answers[0].text, "finish_reason": answers[0].finish_reason,
               "usage": s.usage(n_prompt, answers)}
        if len(answers) > 1:
            out["texts"] = [a.text for a in answers]
        return out

    add_openai_routes(app, s)
    return app


def serve(model_dir, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Run `create_app(model_dir, **options)` with uvicorn on host:port."""
    import uvicorn
    uvicorn.run(create_app(model_dir, **options), host=host, port=port, log_level="info")
