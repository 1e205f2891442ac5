"""LoRA: low-rank adapters on frozen linear layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation").

    h = W x + (alpha / r) · B A dropout(x),   A (r, in), B (out, r)

A starts as Kaiming-uniform noise and B at zero, so an adapted model computes exactly
what it did before training. `merge_lora` folds B A into W and puts the plain linear
layer back, so the state dict (and HF export) is that of an ordinary model again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from lmforge.nn.linear import fast_linear

# Short names → the module-name suffixes they match. "q" alone adapts self- and cross-attention.
TARGETS = ("q", "k", "v", "o", "attn.q", "attn.k", "attn.v", "attn.o", "cross.q", "cross.k", "cross.v",
           "cross.o", "ff.up", "ff.gate", "ff.down")
# Task heads are trained with the adapters: they start fresh for a new task.
HEAD_MODULES = ("classifier", "qa_head", "backbone.pooler")


class LoRALinear(nn.Module):
    """A frozen nn.Linear (`base`) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r={r} must be >= 1")
        self.base, self.r, self.scaling = base, r, alpha / r
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype,
                                               device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype,
                                               device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear's weight (and PEFT)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + fast_linear(fast_linear(self.drop(x), self.lora_a), self.lora_b) * self.scaling

    def merged(self) -> nn.Linear:
        """The base layer with W ← W + (alpha/r) B A."""
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scaling
        return self.base


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets: Sequence[str] = ("attn.q", "attn.v"), train_modules: Sequence[str] = HEAD_MODULES) -> nn.Module:
    """Wrap every nn.Linear whose name ends with one of `targets` (q, k, v, o, attn.q, cross.v,
    ff.up, ff.gate, ff.down, ...) in a LoRALinear, in place; freeze everything except the
    adapters and the modules named in `train_modules` (the task heads). Returns the model."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; choose from {', '.join(TARGETS)}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters (merge_lora first)")
    wanted = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not wanted:
        raise ValueError(f"no linear layer of the model matches LoRA targets {list(targets)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in wanted:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, r, alpha, dropout))
    for name, module in model.named_modules():
        if name in train_modules:
            for p in module.parameters():
                p.requires_grad_(True)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain linear layer back, in place;
    every parameter becomes trainable again, as in a freshly loaded model. Returns the model."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_parameters(model: nn.Module) -> dict[str, int]:
    """{trainable, total} parameter counts (after apply_lora: adapters + heads vs everything)."""
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters())}
