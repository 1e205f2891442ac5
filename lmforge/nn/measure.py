"""Speed paths that depend on the CPU, chosen at run time by measurement.

The same code can be fast on one x86 CPU and slow on another: oneDNN's packed weights pay on
some builds and not others (`lmforge.nn.packed`), and bfloat16 matrix products run on
dedicated instructions (AVX512-BF16, AMX) where the CPU has them, and through a slow
fallback where it does not (on a 2-core AVX2 EPYC: torch's bfloat16 matmul at 1.3 GFLOP/s
against 160 in float32, and bfloat16 sentence embeddings 5.8x slower than float32). So a
path is not assumed: `best_time` times it here, on the model's own shapes, once per process.
"""

from __future__ import annotations

import statistics
import time

import torch

_BF16: dict[tuple, bool] = {}  # (device type, d_in, d_out, rows) -> whether bfloat16 pays, measured once


def probe(*shape: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Random inputs for a measurement, drawn from a generator of their own: measuring must not
    move the global RNG, or a run that measured at its start and one resumed in a new process
    (which measures again) would draw different dropout masks and samples afterwards."""
    return torch.randn(*shape, generator=_PROBES).to(dtype=dtype, device=device)


_PROBES = torch.Generator().manual_seed(0)


def bucket(n: int) -> int:
    """n rounded up to a power of two (1 for n <= 1): the sizes a measurement is keyed on, so
    that batches of nearby lengths share one measurement."""
    return 1 << max(n - 1, 0).bit_length()


def best_time(fn, repeats: int = 5) -> float:
    """The shortest of `repeats` timed runs of fn(), after one untimed run."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def median_ratio(a, b, rounds: int) -> float:
    """The median over `rounds` alternating runs of (time of a()) / (time of b()), after a round
    that warms both up: a burst of load on the machine slows both sides of a round alike, where
    timing all of a's runs and then all of b's would put it on one side."""
    ratios = []
    for i in range(rounds + 1):
        t0 = time.perf_counter()
        a()
        t1 = time.perf_counter()
        b()
        if i:
            ratios.append((t1 - t0) / (time.perf_counter() - t1))
    return statistics.median(ratios)


def bf16_pays(d_in: int, d_out: int, rows: int, device: torch.device | str = "cpu", repeats: int = 3) -> bool:
    """Whether a (rows, d_in) x (d_in, d_out) product under bfloat16 autocast runs at least 1.25x
    as fast as in float32 here (measured once per process and shape)."""
    device = torch.device(device)
    key = (device.type, d_in, d_out, rows)
    if key not in _BF16:
        w, x = probe(d_out, d_in, device=device), probe(rows, d_in, device=device)

        def product(bf16: bool):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return torch.nn.functional.linear(x, w)
        with torch.inference_mode():
            fp32 = best_time(lambda: product(False), repeats)
            half = best_time(lambda: product(True), 1)
            if half < fp32 / 1.25:  # worth a closer look (a slow fallback is ruled out after one run)
                half = best_time(lambda: product(True), repeats)
        _BF16[key] = half < fp32 / 1.25
    return _BF16[key]
