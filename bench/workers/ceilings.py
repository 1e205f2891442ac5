"""The machine's ceilings, measured with torch at the suite's thread count: fp32 and bf16
matmul FLOP/s and memory read bandwidth. Each case's run returns the work it did (FLOPs or
bytes); the parent keeps the best rate over repeats."""

import time

import torch

from bench.workers.serve import serve, threads


def matmul(dtype: str, max_n: int = 2048, min_seconds: float = 0.05):
    """Square products, doubling n from 256 until one takes min_seconds or n reaches max_n: big
    enough to reach the peak, yet bounded where a dtype has no fast kernel here (bf16 on a
    CPU without AVX-512 runs a scalar fallback at ~1 GFLOP/s)."""
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

    def run():
        torch.mm(a, b, out=out)
        return 2.0 * n ** 3
    return run, {"shape": [n, n, n], "dtype": dtype}


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
