"""The load client of group `serve`: concurrent streaming chat requests to an OpenAI-style
server, timed here. Imports httpx and the standard library only (neither torch nor
llama_cpp): the client adds no runtime of its own to the machine the servers share.

Case "load" (url, concurrency, requests, max_tokens, prompts[, api_key]): one run starts
`concurrency` clients at once, each sending its share of `requests` one after another
(greedy, temperature 0, `stream: true` with `stream_options.include_usage`), and answers
the output tokens (`units`), the wall time from the first request sent to the last answer
read, and for each request its time to first token, duration, tokens and finish reason.
A request's tokens are the server's `usage.completion_tokens` when it sends them, else the
chunks that carried text (llama.cpp's server streams one token per chunk).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from bench.workers.serve import serve

DONE = "[DONE]"


def sse_data(line: str) -> dict | str | None:
    """One line of a server-sent-event stream: the JSON of a `data:` line, DONE for
    `data: [DONE]`, None for anything else (blank lines, `: ping` comments, `event:`)."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    return DONE if data == DONE else json.loads(data)


def chunk_text(chunk: dict) -> str:
    """The text a chunk adds: chat (`choices[0].delta.content`) or completions (`choices[0].text`)."""
    choices = chunk.get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or choices[0].get("text") or ""


async def one_request(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> dict:
    """One streamed chat request: its time to first token, duration, tokens and finish reason."""
    start = time.perf_counter()
    first, chunks, usage, finish = None, 0, None, None
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            chunk = sse_data(line)
            if chunk is None:
                continue
            if chunk == DONE:
                break
            if "error" in chunk:
                raise RuntimeError(f"{url}: error in the stream: {chunk['error']}")
            if chunk_text(chunk):
                chunks += 1
                if first is None:
                    first = time.perf_counter()
            for choice in chunk.get("choices") or []:
                finish = choice.get("finish_reason") or finish
            if chunk.get("usage"):
                usage = chunk["usage"].get("completion_tokens")
    end = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{url}: an answer without text (finish_reason {finish!r})")
    return {"ttft": first - start, "seconds": end - start, "tokens": usage if usage is not None else chunks,
            "counted": "usage" if usage is not None else "chunks", "finish": finish}


async def run_load(url: str, concurrency: int, requests: int, max_tokens: int, prompts: list[str],
                   api_key: str | None = None) -> dict:
    """`concurrency` clients sharing `requests` (each at least one); see the module docstring."""
    per_client = max(1, -(-requests // concurrency))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0)) as client:
        async def one_client(i: int) -> list[dict]:
            out = []
            for k in range(per_client):
                prompt = prompts[(i * per_client + k) % len(prompts)]
                body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
                out.append(await one_request(client, url, body, headers))
            return out
        start = time.perf_counter()
        per = await asyncio.gather(*(one_client(i) for i in range(concurrency)))
        wall = time.perf_counter() - start
    done = [r for rs in per for r in rs]
    return {"units": float(sum(r["tokens"] for r in done)), "wall": wall, "requests": done}


def load(url: str, concurrency: int, requests: int, max_tokens: int, prompts: list[str], api_key: str | None = None):
    def run():
        return asyncio.run(run_load(url, concurrency, requests, max_tokens, prompts, api_key))
    return run, {"httpx": httpx.__version__}


if __name__ == "__main__":
    serve({"load": load})
