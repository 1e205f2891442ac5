"""The server under load and faults (#16), as a user runs it: `lmforge serve` in its own process.

One run, bounded in count and time, on loopback: 200 concurrent streaming clients against a
queue of 64, clients that disconnect mid-stream, slow readers, oversized bodies. Every
request is answered correctly (its text equals its single-request answer) or with 429/503 in
OpenAI's error shape; run twice, the server's resident memory after the second round is within
10% of what it was after the first (no leak) and it keeps serving; SIGTERM with a stream in flight finishes that stream and the server shuts down cleanly.
The figures of the run are printed (pytest -s) for RELIABILITY.md.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

PROMPTS = ["the quick", "the lazy dog", "brown fox jumps", "over the", "the quick brown fox jumps over"]
MAX_TOKENS = 8


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.fixture
def server(tiny_text_model):
    """`lmforge serve` on a free loopback port in its own process: (base URL, Popen)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-c", "import sys; from lmforge.cli import main; sys.exit(main())", "serve",
           str(tiny_text_model), "--port", str(port), "--model-name", "tiny", "--max-batch", "16",
           "--max-queue", "64", "--max-body-bytes", str(64 << 10)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    try:
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _body(prompt: str, stream: bool = True) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}


async def _stream(client, url, prompt, *, read_delay=0.0, stop_after=None) -> tuple[int, str | None, dict]:
    """One streaming completion: (status, its text or None when cut short, the error body or last chunk)."""
    async with client.stream("POST", url + "/v1/completions", json=_body(prompt)) as r:
        if r.status_code != 200:
            return r.status_code, None, json.loads(await r.aread())
        text, chunks, last = "", 0, {}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            last = json.loads(line[6:])
            text += "".join(c.get("text", "") for c in last["choices"])
            chunks += 1
            if stop_after is not None and chunks >= stop_after:
                return 200, None, last  # leaves the block: the connection is closed mid-stream
            if read_delay:
                await asyncio.sleep(read_delay)
        return 200, text, last


def _is_error(status: int, body: dict) -> bool:
    return status in (429, 503) and set(body.get("error", {})) >= {"message", "type", "code"}


async def _load(url: str) -> list:
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        # a flood beyond the queue, with oversized bodies among it
        flood = [_stream(client, url, PROMPTS[i % len(PROMPTS)]) for i in range(200)]
        big = {"model": "tiny", "prompt": "x" * (128 << 10), "max_tokens": 1}
        flood += [client.post(url + "/v1/completions", json=big) for _ in range(10)]
        first = await asyncio.gather(*flood)
        # then, within the queue: clients that go away after one chunk, slow readers, and others
        mixed = [_stream(client, url, PROMPTS[i % len(PROMPTS)], stop_after=1) for i in range(20)]
        mixed += [_stream(client, url, PROMPTS[i % len(PROMPTS)], read_delay=0.2) for i in range(5)]
        mixed += [_stream(client, url, PROMPTS[i % len(PROMPTS)]) for i in range(20)]
        return first + await asyncio.gather(*mixed)


def _check_round(url: str, want: dict, results: list) -> dict:
    """Check one round of `_load`, wait until the engine has drained; its figures."""
    figures = {"served": 0, "refused": 0, "disconnected": 0, "slow": 0, "oversized": 0}
    streams, oversized = results[:200], results[200:210]
    gone, slow, others = results[210:230], results[230:235], results[235:]
    for i, (status, text, body) in enumerate(streams + others + slow):
        if status == 200:
            assert text == want[PROMPTS[i % len(PROMPTS)]], f"request {i} got {text!r}"
            assert body["choices"][0]["finish_reason"] in ("stop", "length")
            figures["served"] += 1
        else:
            assert _is_error(status, body), f"request {i}: {status} {body}"
            figures["refused"] += 1
    assert figures["served"] >= 64 and figures["refused"] >= 1  # the queue bounded the flood, and served
    assert all(s == 200 for s, _, _ in slow + others), "within the queue every client is served"
    figures["slow"] = len(slow)
    figures["disconnected"] = sum(1 for s, t, _ in gone if s == 200 and t is None)
    assert figures["disconnected"] == len(gone)
    for r in oversized:
        assert r.status_code == 413 and r.json()["error"]["code"], r.text
    figures["oversized"] = len(oversized)

    # every cancelled or finished request has left: the queue and the batch are empty again
    deadline = time.monotonic() + 60
    while True:
        metrics = httpx.get(url + "/metrics", timeout=10).text
        gauges = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith(("lmforge_queue_depth", "lmforge_running"))}
        if gauges and not any(gauges.values()):
            break
        assert time.monotonic() < deadline, f"the engine did not drain: {gauges}"
        time.sleep(0.5)
    for p in PROMPTS:  # it keeps serving, with the same answers
        r = httpx.post(url + "/v1/completions", json=_body(p, stream=False), timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want[p]
    return figures


def test_server_holds_under_load_and_faults(server):
    url, proc = server
    want = {p: httpx.post(url + "/v1/completions", json=_body(p, stream=False), timeout=60).json()["choices"][0]["text"]
            for p in PROMPTS}
    # The same load twice. The first brings the server's thread pool, allocator arenas and
    # buffers to the size this load needs (how far depends on the machine's timing: CI saw
    # +12-18% over a server warmed by sequential requests); the second must not grow it
    # further: a leak would grow it again with every round.
    first = _check_round(url, want, asyncio.run(_load(url)))
    baseline = _rss_kib(proc.pid)
    figures = _check_round(url, want, asyncio.run(_load(url)))
    after = _rss_kib(proc.pid)
    figures.update(first_round=first, baseline_rss_mib=round(baseline / 1024, 1),
                   after_rss_mib=round(after / 1024, 1))
    print(f"\nserver under load and faults: {figures}")
    assert after <= 1.10 * baseline, f"resident memory {after} KiB after the second round, {baseline} KiB after the first"

    # graceful shutdown: SIGTERM while a stream runs; the stream ends properly, the app shuts down
    async def last_stream():
        async with httpx.AsyncClient(timeout=120) as client:
            task = asyncio.create_task(_stream(client, url, PROMPTS[0], read_delay=0.3))
            await asyncio.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            return await task

    status, text, _ = asyncio.run(last_stream())
    assert status == 200 and text == want[PROMPTS[0]]
    # uvicorn re-raises the SIGTERM it caught once its graceful shutdown is done
    assert proc.wait(60) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in proc.stderr.read()
