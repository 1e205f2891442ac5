"""Weight-only int8 quantisation for inference: every linear layer and the LM head keep int8
weights with one scale per output channel,

    W ≈ s ⊙ Q,   s_o = max_i |W_oi| / 127,   Q = round(W / s) ∈ [-127, 127],

and compute y = x (s ⊙ Q)^T + b with activations in bfloat16 (`torch._weight_int8pack_mm`).
Decoding at batch 1 reads every weight once per token, so a quarter of the bytes is most of
the speed (bench/bench_chat.py: SmolLM2-135M 2× the float model's tokens/s). The price:
logits move by a few percent (SmolLM2's next-token logits by 9% relative L2, 5.7% of it
from the int8 weights, the rest from bfloat16 activations; same argmax, same answers in
the tests). The float model is the one to train and save.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.models.heads import LMHead

_PACKED = hasattr(torch, "_weight_int8pack_mm")


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight → int8 Q (out, in) and scales s (out,), W ≈ s[:, None] * Q.
    The scales are kept in bfloat16, the precision the int8 kernel takes them in."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ (scale ⊙ q)^T + bias, in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if _PACKED:
        y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), q, scale).to(x.dtype)
    else:  # no int8 kernel in this torch: dequantise (correct, not faster)
        y = F.linear(x2, (q.to(x.dtype) * scale[:, None].to(x.dtype)))
    if bias is not None:
        y = y + bias
    return y.view(*shape[:-1], q.shape[0])


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (per-output-channel scales) for inference."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_weight(linear.weight)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.q, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8LMHead(nn.Module):
    """The LM head with an int8 copy of its weight (the tied token embedding stays float for lookups)."""

    def __init__(self, head: LMHead, tokens: nn.Embedding):
        super().__init__()
        self.scale = head.scale
        q, s = quantize_weight(tokens.weight if head.weight is None else head.weight)
        self.register_buffer("q", q)
        self.register_buffer("qscale", s)
        self.bias = None if head.bias is None else nn.Parameter(head.bias.detach().clone(), requires_grad=False)

    def forward(self, h: torch.Tensor, tokens: nn.Embedding) -> torch.Tensor:
        return int8_linear(h * self.scale if self.scale != 1.0 else h, self.q, self.qscale, self.bias)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every linear layer (and the LM head) of `model` by its int8 version, in place;
    returns the model, in eval mode. For inference on CPU (or CUDA); not for training."""
    if is_quantized(model):
        raise ValueError("the model is already int8-quantised")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child))
    if isinstance(getattr(model, "lm_head", None), LMHead):
        model.lm_head = Int8LMHead(model.lm_head, model.backbone.tokens)
    return model.eval()


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int8LMHead)) for m in model.modules())
