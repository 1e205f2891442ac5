"""The machine's ceilings, measured with torch at the suite's thread count: fp32 and bf16
matmul FLOP/s and memory read bandwidth. Each case's run returns the work it did (FLOPs or
bytes); the parent keeps the best rate over repeats."""

import time

import torch

from bench.workers.serve import serve, threads
from lmforge.nn.measure import best_time


def matmul(dtype: str, max_n: int = 2048, min_seconds: float = 0.05):
    """Square products, doubling n from 256 until one takes min_seconds or n reaches max_n: big
    enough to reach the peak, yet bounded where a dtype has no fast kernel here (bf16 on a
    CPU without AVX-512 runs a scalar fallback at ~1 GFLOP/s). fp32 is timed with both GEMM
    libraries torch holds, MKL (torch.mm) and oneDNN (its linear op), and the faster is the
    ceiling: on a Zen 4 EPYC MKL's sgemm ran well below oneDNN's, and lmforge trains with
    oneDNN where it measures faster (lmforge.nn.linear.onednn_trains)."""
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    n = 256
    while True:
        a, b = (torch.randn(n, n, generator=g).to(dt) for _ in range(2))
        out = torch.empty(n, n, dtype=dt)
        torch.mm(a, b, out=out)
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        if n >= max_n or time.perf_counter() - t >= min_seconds:
            break
        n *= 2
    products = {"MKL" if dtype == "fp32" else "torch.mm": lambda: torch.mm(a, b, out=out)}
    if dtype == "fp32" and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        bt = b.t().contiguous()  # the linear op takes W (out, in): a W^T = a b
        products["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], "")
    library = min(products, key=lambda name: best_time(products[name], 5))
    product = products[library]

    def run():
        product()
        return 2.0 * n ** 3
    return run, {"shape": [n, n, n], "dtype": dtype, "library": library}


def bandwidth(mib: int = 512):
    # far larger than any L3: every repeat streams the whole tensor from memory
    x = torch.ones(mib * 2 ** 20 // 4, dtype=torch.float32)

    def run():
        x.sum()
        return float(x.numel() * 4)
    return run, {"bytes": x.numel() * 4}


if __name__ == "__main__":
    torch.set_num_threads(threads())
    serve({"matmul": matmul, "bandwidth": bandwidth})
