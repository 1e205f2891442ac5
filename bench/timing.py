"""Worker processes and the alternation protocol, shared by every group. Imports only the
standard library: the parent that orchestrates stays neutral (no torch, no OpenMP runtime).

A contender is a (label, worker, case id). Each repeat runs every contender once, in turn,
with `pause` seconds before each (OpenMP threads spin for a while after a parallel region
and would steal the next contender's cores). A ratio is the median of the per-repeat
ratios, so a burst of load on the machine moves one repeat, not the figure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field


@dataclass
class Settings:
    threads: int
    repeats: int = 5
    warmup: int = 1
    pause: float = 1.0
    quick: bool = False
    smoke: bool = False
    log_dir: str = "."
    tmp: str = "."


def installed(module: str) -> bool:
    """Is `module` importable here? (found without importing it)"""
    return importlib.util.find_spec(module) is not None


class WorkerError(RuntimeError):
    pass


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: bench/ and lmforge/


def process_env(settings: Settings) -> dict[str, str]:
    """The environment of every process the suite starts: the same thread count for every
    runtime (OpenMP, MKL, OpenBLAS; BENCH_THREADS for the rest), offline, and this checkout's
    packages first on the path."""
    n = str(settings.threads)
    env = dict(os.environ, BENCH_THREADS=n, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n,
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def log_path(settings: Settings, kind: str, label: str, obj: object) -> str:
    safe = "".join(c if c.isalnum() else "-" for c in label)
    return os.path.join(settings.log_dir, f"{kind}-{safe}-{os.getpid()}-{id(obj)}.log")


class Worker:
    """A `python -m bench.workers.<module>` process, spoken to in JSON lines."""

    def __init__(self, module: str, label: str, settings: Settings):
        self.label = label
        self.log = log_path(settings, module, label, self)
        self._err = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", f"bench.workers.{module}"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     env=process_env(settings), cwd=ROOT)
        self.peak_rss_mb: float | None = None

    def request(self, op: str, **kw) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"{self.label} worker exited: {self.stderr_tail()}")
        ans = json.loads(line)
        if not ans.pop("ok"):
            raise WorkerError(f"{self.label}: {ans['error']}")
        return ans

    def stderr_tail(self, n: int = 3) -> str:
        self._err.flush()
        with open(self.log) as f:
            lines = [x.strip() for x in f if x.strip()]
        return " | ".join(lines[-n:]) or "(no output)"

    def prepare(self, case_id: str, kind: str, **args) -> dict:
        return self.request("prepare", id=case_id, kind=kind, args=args)

    def time(self, case_id: str) -> tuple[float, float]:
        ans = self.request("time", id=case_id)
        return ans["seconds"], ans["units"]

    def measure(self, case_id: str) -> dict:
        """One repeat of a case whose run answers a dict of figures: that dict (and seconds)."""
        return self.request("time", id=case_id)

    def close(self) -> float | None:
        """End the process; returns (and keeps) its peak resident memory in MB."""
        if self.proc.poll() is None:
            try:
                self.peak_rss_mb = self.request("quit")["peak_rss_mb"]
            except (WorkerError, OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._err.close()
        return self.peak_rss_mb


def flops_share(flops_per_unit, ceiling_gflops):
    """rate (units/s) -> % of the fp32 matmul ceiling that flops_per_unit x rate is; None
    when either is unknown."""
    if not flops_per_unit or not ceiling_gflops:
        return None
    return lambda rate: 100 * flops_per_unit * rate / (ceiling_gflops * 1e9)


def median_ratio(subject: list[float], reference: list[float]) -> float:
    """Median over repeats of subject rate / reference rate, repeat by repeat."""
    if not subject or len(subject) != len(reference):
        raise ValueError(f"need equal, non-empty lists of rates, got {len(subject)} and {len(reference)}")
    return statistics.median(s / r for s, r in zip(subject, reference))


@dataclass
class Contender:
    label: str
    worker: Worker
    case_id: str
    # rate (units/s) -> percentage of the machine limit (MFU, bandwidth); None: no such figure
    limit_pct: object = None
    info: dict = field(default_factory=dict)


def alternate(contenders: list[Contender], settings: Settings) -> dict[str, list[float]]:
    """Warm up each contender, then `repeats` rounds of every contender in turn; rates per repeat."""
    for _ in range(settings.warmup):
        for c in contenders:
            c.worker.time(c.case_id)
    rates: dict[str, list[float]] = {c.label: [] for c in contenders}
    for _ in range(settings.repeats):
        for c in contenders:
            time.sleep(settings.pause)
            seconds, units = c.worker.time(c.case_id)
            rates[c.label].append(units / seconds)
    return rates


def compare(settings: Settings, group: str, model: str, case: str, unit: str, subjects: list[str],
            contenders: list[Contender], limit: str = "", missing: dict | None = None, **extra) -> dict:
    """Time the contenders alternately and return one measurement: median rates, for each
    subject the median of its per-repeat ratios to each reference, and each rate as a
    percentage of its limit (`limit` names it)."""
    rates = alternate(contenders, settings) if contenders else {}
    out = {"group": group, "model": model, "case": case, "unit": unit, "subjects": subjects,
           "repeats": settings.repeats, "limit": limit, "contenders": {}, "ratios": {},
           "missing": dict(missing or {}), **extra}
    for c in contenders:
        rate = statistics.median(rates[c.label])
        out["contenders"][c.label] = {
            "rate": rate, "rates": rates[c.label], "worker": c.worker.label,
            "limit_pct": c.limit_pct(rate) if callable(c.limit_pct) else None, "peak_rss_mb": None,
            # a compiled contender's compile run; which decoding step lmforge ran
            **{k: c.info[k] for k in ("first_call_s", "step") if k in c.info}}
    for s in subjects:
        for ref in rates:
            if s in rates and ref not in subjects:
                out["ratios"][f"{s} / {ref}"] = median_ratio(rates[s], rates[ref])
    print(f"  {group} | {model} | {case}: " + ", ".join(
        f"{k} {v['rate']:,.1f}" for k, v in out["contenders"].items()) + f" {unit}", file=sys.stderr, flush=True)
    return out


def attach_rss(measurements: list[dict], workers: list[Worker]) -> None:
    """Fill each contender's peak resident memory from its (closed) worker."""
    rss = {w.label: w.peak_rss_mb for w in workers}
    for m in measurements:
        for c in m["contenders"].values():
            c["peak_rss_mb"] = rss.get(c["worker"])


class Lineup:
    """The workers of one group, started once and closed together (their peak resident memory
    is read at close). A contender whose library is missing or whose case fails is left out
    and named in `missing`, with the reason."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.workers: dict[str, Worker] = {}
        self.missing: dict[str, str] = {}

    def start(self, label: str, module: str, needs: str) -> None:
        if not installed(needs):
            self.missing[label] = f"{needs} is not installed (pip install lmforge[bench])"
            return
        self.workers[label] = Worker(module, label, self.settings)

    def prepare(self, worker: str, label: str, case_id: str, kind: str, **args) -> Contender | None:
        w = self.workers.get(worker)
        if w is None:
            self.missing.setdefault(label, self.missing.get(worker, "not started"))
            return None
        try:
            return Contender(label, w, case_id, info=w.prepare(case_id, kind, **args))
        except WorkerError as e:
            self.missing[label] = str(e)
            print(f"  {label}: {e}", file=sys.stderr)
            return None

    def missing_of(self, labels) -> dict[str, str]:
        return {k: self.missing[k] for k in labels if k in self.missing}

    def close(self, measurements: list[dict]) -> None:
        for w in self.workers.values():
            w.close()
        attach_rss(measurements, list(self.workers.values()))


def save_checkpoints(settings: Settings, specs: dict[str, tuple[str, dict]], prefix: str, **kw) -> dict[str, str]:
    """Save a random seeded HF model per {name: (family, config)} under settings.tmp, from one
    setup worker (not a contender: its memory is not anyone's); returns {name: directory}."""
    w = Worker("hf", f"setup {prefix}", settings)
    dirs = {}
    try:
        for name, (family, config) in specs.items():
            dirs[name] = os.path.join(settings.tmp, f"{prefix}-{name}")
            w.prepare(name, "save", family=family, config=config, dir=dirs[name], **kw)
    finally:
        w.close()
    return dirs
