"""Group `ceilings`: the machine's limits, in a torch worker at the suite's thread count.
fp32 and bf16 matmul GFLOP/s (n³ up to 2048³, --quick 1024³, smaller where one product takes
≥ 50 ms) and memory read bandwidth in GB/s (a sum over 512 MiB, far beyond any L3). Best of
5 repeats (--quick 3): a ceiling is what the machine can do."""

from __future__ import annotations

from bench.timing import Settings, Worker


def run(settings: Settings) -> dict:
    """{"fp32_gflops", "bf16_gflops", "read_gbs"} measured now."""
    n = 256 if settings.smoke else 1024 if settings.quick else 2048
    cases = [("fp32_gflops", "matmul", {"dtype": "fp32", "max_n": n}),
             ("bf16_gflops", "matmul", {"dtype": "bf16", "max_n": n}),
             ("read_gbs", "bandwidth", {"mib": 32 if settings.smoke else 512})]
    w = Worker("ceilings", "ceilings", settings)
    out = {}
    try:
        for key, kind, args in cases:
            info = w.prepare(key, kind, **args)
            if "shape" in info:
                out[key.replace("gflops", "shape")] = info["shape"]
            if "library" in info:  # fp32: the faster of MKL and oneDNN here
                out[key.replace("gflops", "library")] = info["library"]
            w.time(key)  # warm-up: first touch of the pages, oneDNN's kernel selection
            rates = [units / seconds for seconds, units in (w.time(key) for _ in range(3 if settings.quick else 5))]
            out[key] = max(rates) / 1e9
    finally:
        out["peak_rss_mb"] = w.close()
    return out
