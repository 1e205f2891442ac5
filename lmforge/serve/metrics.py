"""The server's numbers for GET /metrics, in Prometheus' text exposition format (version 0.0.4).

    lmforge_requests_total{endpoint,status}       HTTP requests answered
    lmforge_prompt_tokens_total                   prompt tokens of the generations served
    lmforge_completion_tokens_total               tokens generated
    lmforge_finished_total{reason}                generations ended: stop, length, cancelled, error
    lmforge_queue_depth                           requests waiting for the engine
    lmforge_running                               sequences in the engine's running batch
    lmforge_time_to_first_token_seconds           histogram, from submission to the first token
    lmforge_request_duration_seconds              histogram, from submission to the last event
    lmforge_engine_<key>_total                    each of the engine's own counters (Engine.stats)
"""

from __future__ import annotations

import bisect
import collections
import re
import threading

# seconds; Prometheus adds +Inf
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Cumulative buckets, their sum and count, as Prometheus keeps them."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf only
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{_number(bound)}"}} {running}')
        return [*out, f"{name}_sum {_number(self.sum)}", f"{name}_count {self.count}"]


class Metrics:
    """What the app counts; `render(engine)` writes the exposition. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = collections.Counter()  # (endpoint, status) -> n
        self.finished = collections.Counter()  # reason -> n
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram()
        self.duration = Histogram()

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[endpoint, status] += 1

    def generation(self, prompt_tokens: int, completion_tokens: int, reason: str | None,
                   ttft: float | None = None, duration: float | None = None) -> None:
        """One generation ended (a request to the engine, or a beam search run whole)."""
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.finished[reason or "cancelled"] += 1
            if ttft is not None:
                self.ttft.observe(ttft)
            if duration is not None:
                self.duration.observe(duration)

    def render(self, engine) -> str:
        with self._lock:
            out = ["# HELP lmforge_requests_total HTTP requests answered, by endpoint and status.",
                   "# TYPE lmforge_requests_total counter"]
            out += [f'lmforge_requests_total{{endpoint="{_label(e)}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
            out += _scalar("lmforge_prompt_tokens_total", "counter", "Prompt tokens of the generations served.",
                           self.prompt_tokens)
            out += _scalar("lmforge_completion_tokens_total", "counter", "Tokens generated.", self.completion_tokens)
            out += ["# HELP lmforge_finished_total Generations ended, by finish reason.",
                    "# TYPE lmforge_finished_total counter"]
            out += [f'lmforge_finished_total{{reason="{_label(r)}"}} {n}' for r, n in sorted(self.finished.items())]
            out += _scalar("lmforge_queue_depth", "gauge", "Requests waiting for the engine.", engine.queue_depth)
            out += _scalar("lmforge_running", "gauge", "Sequences in the engine's running batch.", engine.running)
            for key, n in sorted(dict(getattr(engine, "stats", {})).items()):  # steps, batch_tokens, ...
                name = "lmforge_engine_" + re.sub(r"[^a-zA-Z0-9_]", "_", str(key)) + "_total"
                out += _scalar(name, "counter", f"The engine's count of {key}.", n)
            for name, h, what in (("lmforge_time_to_first_token_seconds", self.ttft, "submission to first token"),
                                  ("lmforge_request_duration_seconds", self.duration, "submission to last event")):
                out += [f"# HELP {name} Seconds from {what}.", f"# TYPE {name} histogram", *h.lines(name)]
        return "\n".join(out) + "\n"


def _scalar(name: str, kind: str, help_: str, value) -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"]


def _number(x) -> str:
    if x == float("inf"):
        return "+Inf"
    return repr(float(x)) if isinstance(x, float) else str(x)


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
