"""Weight-only quantisation for inference: `quantize(model, "int8" | "int4")`.

int4 (`lmforge.models.int4`, CPU): the linear layers keep 4-bit weights in groups of 32 inputs,
each with a scale and a zero, through torch's int4 CPU kernel; from a GGUF file, llama.cpp's
own 4-bit blocks as they are. The LM head gets int8 weights (below) unless it too was 4-bit.

int8: every linear layer and the LM head keep int8 weights with one scale per output channel,

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
from lmforge.models import qkernel
from lmforge.models.int4 import Int4Linear, Int4LMHead, native_rows, quantize_groups, stacked_bias

KINDS = ("int4", "int8")
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

    quantized = "int8"

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_weight(linear.weight)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.q, self.scale, self.bias)

    @staticmethod
    def stacked(x: torch.Tensor, modules: tuple[Int8Linear, ...]) -> torch.Tensor | None:
        """x [W_1; W_2; ...]^T + [b_1; ...] as one int8 product (a compiled step's q/k/v: its
        freezing stacks the weights once); None when only some have a bias."""
        stacks, bias = stacked_bias(modules)
        if not stacks:
            return None
        return int8_linear(x, torch.cat([m.q for m in modules]), torch.cat([m.scale for m in modules]), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8LMHead(nn.Module):
    """The LM head with an int8 copy of its weight (the tied token embedding stays float for
    lookups). Where lmforge's kernels run (`native_rows`), the copy is packed for them
    (`qkernel.pack8`, int16 activations) in place of torch's int8 kernel."""

    quantized = "int8"

    def __init__(self, head: LMHead, tokens: nn.Embedding):
        super().__init__()
        self.scale = head.scale
        w = tokens.weight if head.weight is None else head.weight
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        q, s = quantize_weight(w)
        native = qkernel.pack8(q, s) if native_rows() and w.device.type == "cpu" else None  # a CPU kernel
        self.register_buffer("q", None if native is not None else q)
        self.register_buffer("qscale", None if native is not None else s)
        self.register_buffer("native", native, persistent=False)  # made at load time: never saved
        self.bias = None if head.bias is None else nn.Parameter(head.bias.detach().clone(), requires_grad=False)

    def forward(self, h: torch.Tensor, tokens: nn.Embedding) -> torch.Tensor:
        h = h * self.scale if self.scale != 1.0 else h
        if self.native is not None:
            return qkernel.linear(h, self.native, self.in_features, self.out_features, self.bias, native_rows())
        return int8_linear(h, self.q, self.qscale, self.bias)


def quantize_kind(quantize: str | None = None, int8: bool = False) -> str | None:
    """The quantisation asked for by `quantize` ("int4", "int8" or None) and its alias int8=True."""
    if quantize is not None and quantize not in KINDS:
        raise ValueError(f"quantize={quantize!r}: expected one of {KINDS} or None")
    if int8 and quantize not in (None, "int8"):
        raise ValueError(f"int8=True contradicts quantize={quantize!r} (int8=True is quantize='int8')")
    return "int8" if int8 else quantize


def quantize(model: nn.Module, kind: str, exact: dict | None = None) -> nn.Module:
    """`quantize_int4` or `quantize_int8` by name; `exact` is for int4 only."""
    if kind == "int4":
        return quantize_int4(model, exact=exact)
    if kind == "int8":
        return quantize_int8(model)
    raise ValueError(f"quantize={kind!r}: expected one of {KINDS}")


def _replace(model: nn.Module, make_linear, make_head) -> nn.Module:
    """Every nn.Linear of `model` → make_linear(name, linear), the LM head → make_head(head), in place."""
    if kind := is_quantized(model):
        raise ValueError(f"the model is already {kind}-quantised")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, make_linear(f"{name}.{child_name}" if name else child_name, child))
    if isinstance(getattr(model, "lm_head", None), LMHead):
        model.lm_head = make_head(model.lm_head)
    return model.eval()


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every linear layer (and the LM head) of `model` by its int8 version, in place;
    returns the model, in eval mode. For inference on CPU (or CUDA); not for training."""
    return _replace(model, lambda name, linear: Int8Linear(linear),
                    lambda head: Int8LMHead(head, model.backbone.tokens))


def quantize_int4(model: nn.Module, group_size: int = 32, exact: dict | None = None) -> nn.Module:
    """Replace every linear layer of `model` by its int4 version (groups of `group_size` inputs)
    and the LM head by its int8 one, in place; returns the model, in eval mode. `exact` maps
    module names ("backbone.decoder.layers.0.attn.q"; "backbone.tokens" for a tied head) to
    int4 groups (q, scale, zero) already made, e.g. a GGUF file's 4-bit blocks: those are used
    as they are, the LM head's too. CPU only (torch's int4 kernel for CPU).

    The head stays int8 unless given in 4 bits, as llama.cpp keeps it at 6 or 8 bits: it is
    the most sensitive matrix. SmolLM2-135M's next-token logits move by 15% relative L2 with
    an int4 head (groups of 32, from its Q8_0 weights) and by 2.6% with an int8 head."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"quantize='int4' runs on CPU only (torch's int4 CPU kernel); the model is on {device}")
    exact = exact or {}

    def make(name: str, w: torch.Tensor, bias: torch.Tensor | None) -> Int4Linear:
        if name in exact:
            q, scale, zero = exact[name]
            return Int4Linear(q, scale, zero, bias, group_size=-(-q.shape[1] // scale.shape[1]))
        return Int4Linear(*quantize_groups(w, group_size), bias, group_size)

    def head(h: LMHead) -> nn.Module:
        name = "backbone.tokens" if h.weight is None else "lm_head"
        return Int4LMHead(h, make(name, None, h.bias)) if name in exact else Int8LMHead(h, model.backbone.tokens)
    return _replace(model, lambda name, linear: make(name, linear.weight, linear.bias), head)


def is_quantized(model: nn.Module) -> str | None:
    """"int4" when `model` holds int4 layers (its head may be int8), "int8" when only int8 ones, else None."""
    kinds = {getattr(m, "quantized", None) for m in model.modules()}
    return next((k for k in KINDS if k in kinds), None)
