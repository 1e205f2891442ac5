"""Run the benchmark suite: every group, or one.

    python -m bench [train|decode|chat|llm|embed|serve|ceilings] [--quick] [--threads N] [--out runs/bench/results.json]

Prints one table; writes the JSON (machine, versions, every rate of every repeat) and a
bar chart of the ratios next to it. The ceilings are measured in every run: the other
groups give each figure as a percentage of them.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time

from bench import ceilings, chat, decode, embed, serving, train
from bench.report import format_table, plot, shown_command
from bench.timing import Settings

GROUPS = {"train": train, "decode": decode, "chat": chat, "embed": embed, "serve": serving}
ALIASES = {"llm": "chat"}
PACKAGES = ["lmforge", "torch", "transformers", "sentence-transformers", "ctranslate2", "llama_cpp_python", "numpy", "httpx"]


# the instruction sets the speed paths depend on: "AMD EPYC" alone names Zen 2 to Zen 5 VMs alike
ISA = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def machine() -> dict:
    cpu, isa, family = "unknown", [], {}
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0].splitlines()  # the first processor's block
        info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first)}
        cpu = info.get("model name", cpu)
        isa = [x for x in ISA if x in info.get("flags", "").split()]
        family = {"family": info.get("cpu family"), "model": info.get("model")}
    except OSError:
        pass
    return {"cpu": cpu, "isa": isa, **family, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_start": list(os.getloadavg())}


def versions() -> dict:
    out = {}
    for p in PACKAGES:
        try:
            out[p.replace("_python", "").replace("_", "-")] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p.replace("_python", "").replace("_", "-")] = None
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("group", nargs="?", default="all", choices=["all", *GROUPS, *ALIASES, "ceilings"])
    ap.add_argument("--quick", action="store_true", help="2 repeats, 1 training step per repeat, 32 chat tokens, "
                    "serve levels 1 and 16 with 4 requests at least: for a check within 10 minutes on 2 cores "
                    "(fewer repeats than a published figure needs)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat: checks the machinery only")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every contender (all cores)")
    ap.add_argument("--repeats", type=int, help="timed repeats after warm-up (default 5; --quick 2)")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between contenders (at least 1)")
    ap.add_argument("--out", default=os.path.join("runs", "bench", "results.json"),
                    help="JSON file (default %(default)s); the chart goes next to it as .png")
    a = ap.parse_args(argv)
    if a.pause < 1.0 and not a.smoke:
        ap.error(f"--pause {a.pause}: at least 1 s between contenders (OpenMP threads spin after a region)")
    repeats = a.repeats or (1 if a.smoke else 2 if a.quick else 5)
    group = ALIASES.get(a.group, a.group)
    logs = tempfile.mkdtemp(prefix="bench-logs-")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        s = Settings(threads=a.threads, repeats=repeats, pause=a.pause, quick=a.quick, smoke=a.smoke,
                     log_dir=logs, tmp=tmp)
        results = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   "command": shown_command("python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])),
                   "machine": machine(), "versions": versions(), "settings": {**vars(s), "warmup": s.warmup},
                   "ceilings": {}, "measurements": [], "errors": {}}
        for k in ("log_dir", "tmp"):
            results["settings"].pop(k)
        print(f"bench: {group}, {repeats} repeats, {a.threads} threads; worker logs in {logs}", file=sys.stderr)
        start = time.perf_counter()
        results["ceilings"] = ceilings.run(s)
        results["seconds"] = {"ceilings": time.perf_counter() - start}
        for name, module in GROUPS.items():
            if group in ("all", name):
                t = time.perf_counter()
                try:
                    results["measurements"] += module.run(s, results["ceilings"])
                except Exception as e:  # a broken group must not cost the others' figures
                    results["errors"][name] = f"{type(e).__name__}: {e}"
                    print(f"bench: group {name} failed: {results['errors'][name]}", file=sys.stderr)
                results["seconds"][name] = time.perf_counter() - t
        results["seconds"]["total"] = time.perf_counter() - start
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    png = os.path.splitext(a.out)[0] + ".png"
    plot(results, png)
    print(format_table(results))
    print(f"\nwrote {a.out} and {png}; README block: python -m bench.report {a.out}")
    return results


if __name__ == "__main__":
    main()
