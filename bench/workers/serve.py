"""The request loop every worker runs: JSON lines in on stdin, JSON lines out.

Requests: {"op": "prepare", "id": ..., "kind": ..., "args": {...}} sets up a case (loads the
model, builds the inputs) and answers the handler's info; {"op": "time", "id": ...} runs the
case once and answers {"seconds", "units"} (a case whose run returns a dict answers its keys too,
`units` among them); {"op": "quit"} answers the peak resident memory
and ends. Imports only the standard library: a reference worker stays free of torch.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from typing import Callable

# handler(**args) -> (run, info): run() does one repeat of the work and returns the units done
# (or a dict of figures with "units" among them)
Handler = Callable[..., tuple[Callable[[], float | dict], dict]]


def threads() -> int:
    """The thread count the parent gave every contender."""
    return int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def serve(handlers: dict[str, Handler]) -> None:
    """Answer requests until "quit" or end of input. Libraries that print to stdout (llama.cpp,
    progress bars) would corrupt the protocol, so fd 1 is pointed at stderr and replies go to
    a private copy of the original stdout."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    cases: dict[str, Callable[[], float]] = {}

    def reply(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")

    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "prepare":
                run, info = handlers[req["kind"]](**req.get("args", {}))
                cases[req["id"]] = run
                reply({"ok": True, **info})
            elif req["op"] == "time":
                t = time.perf_counter()
                done = cases[req["id"]]()
                done = done if isinstance(done, dict) else {"units": done}  # a dict: units and more figures
                reply({"ok": True, "seconds": time.perf_counter() - t, **done})
            elif req["op"] == "quit":
                reply({"ok": True, "peak_rss_mb": peak_rss_mb()})
                return
            else:
                reply({"ok": False, "error": f"unknown op {req['op']!r}"})
        except Exception as e:  # report and keep serving: one failing case must not end the run
            traceback.print_exc()
            reply({"ok": False, "error": f"{type(e).__name__}: {e}"})
