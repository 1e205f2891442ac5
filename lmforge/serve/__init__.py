"""The server: an OpenAI-style HTTP API (`app`) in front of one engine thread (`engine`).

    app.py      the FastAPI app and `serve` (uvicorn)
    engine.py   Engine: the queue, the engine thread, requests and their events
    static/     the web playground served at /

`create_app` and `serve` are imported on first use (FastAPI loads only then).
"""

from importlib import import_module

_EXPORTS = {"create_app": "app", "serve": "app", "Engine": "engine", "Limits": "engine"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmforge.serve' has no attribute {name!r}")
    return getattr(import_module(f"lmforge.serve.{_EXPORTS[name]}"), name)
