"""The server: an OpenAI-style HTTP API (`app`) in front of one engine thread (`engine`).

    app.py            create_app (the FastAPI app, lmforge's /v1/generate) and `serve` (uvicorn)
    routes_openai.py  OpenAI's endpoints; openai_schema.py their request fields and response shapes
    runner.py         how a request runs on the engine and streams (server-sent events)
    errors.py         OpenAI's error shape; the API key and body-size checks (Guard)
    metrics.py        Prometheus text for /metrics
    engine.py         Engine: the queue and the engine thread (continuous batching; embeddings joined)
    batch.py          the running batch: a KV slot per sequence, per-request token choice, one step for all
    request.py        Request and Event: what a caller reads, sync or async
    static/           the web playground served at /

`create_app` and `serve` are imported on first use (FastAPI loads only then).
"""

from importlib import import_module

_EXPORTS = {"create_app": "app", "serve": "app", "Engine": "engine", "Limits": "engine"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmforge.serve' has no attribute {name!r}")
    return getattr(import_module(f"lmforge.serve.{_EXPORTS[name]}"), name)
