"""Learning-rate schedules: pure functions of the 0-based update index `step`.

Being pure functions of the step, a schedule needs no state of its own in a checkpoint:
the step count restores it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("cosine", "linear", "constant", "noam")


def _warmup(step: int, lr: float, warmup: int) -> float:
    # nanoGPT's warmup: lr * (step + 1) / (warmup + 1), never exactly 0
    return lr * (step + 1) / (warmup + 1)


def cosine(step: int, lr: float, warmup: int, decay_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup, then a half cosine from `lr` to `min_lr` at `decay_steps`, then `min_lr`
    (nanoGPT's `get_lr`, Loshchilov & Hutter 2017 without restarts)."""
    if step < warmup:
        return _warmup(step, lr, warmup)
    if step > decay_steps:
        return min_lr
    ratio = (step - warmup) / max(1, decay_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def linear(step: int, lr: float, warmup: int, decay_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup, then a straight line from `lr` to `min_lr` at `decay_steps`, then `min_lr`."""
    if step < warmup:
        return _warmup(step, lr, warmup)
    if step > decay_steps:
        return min_lr
    ratio = (step - warmup) / max(1, decay_steps - warmup)
    return lr + ratio * (min_lr - lr)


def constant(step: int, lr: float, warmup: int = 0) -> float:
    """`lr`, after an optional linear warmup."""
    return _warmup(step, lr, warmup) if step < warmup else lr


def noam(step: int, d_model: int, warmup: int, factor: float = 1.0) -> float:
    """"Attention Is All You Need" §5.3: lrate = factor · d_model^-0.5 · min(n^-0.5, n · warmup^-1.5)
    with n = step + 1 the 1-based update number: linear warmup, then inverse square root."""
    n = step + 1
    return factor * d_model ** -0.5 * min(n ** -0.5, n * max(warmup, 1) ** -1.5)


def make_schedule(name: str, lr: float, warmup: int, decay_steps: int, min_lr: float = 0.0,
                  d_model: int | None = None) -> Callable[[int], float]:
    """step -> learning rate for a schedule name. For "noam", `lr` is the paper's factor
    (1.0 in the paper) and `d_model` is required."""
    if name == "cosine":
        return lambda step: cosine(step, lr, warmup, decay_steps, min_lr)
    if name == "linear":
        return lambda step: linear(step, lr, warmup, decay_steps, min_lr)
    if name == "constant":
        return lambda step: constant(step, lr, warmup)
    if name == "noam":
        if d_model is None:
            raise ValueError("the noam schedule needs d_model")
        return lambda step: noam(step, d_model, warmup, lr)
    raise ValueError(f"unknown schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
