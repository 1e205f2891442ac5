"""The server on loopback: a real uvicorn in a background thread, on a free port."""

import contextlib
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@contextlib.contextmanager
def live_server(app):
    """Serve `app` on 127.0.0.1 (a free port) until the block ends; yields (base URL, the
    uvicorn.Server)."""
    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="session")
def tiny_server(tiny_text_model):
    """(base URL, app) of the tiny decoder LM served as "tiny" without an API key."""
    from lmforge.serve import create_app
    app = create_app(tiny_text_model, model_name="tiny")
    with live_server(app) as (url, _):
        yield url, app
