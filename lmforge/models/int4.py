"""Weight-only int4 for inference on CPU, through torch's kernel
`torch.ops.aten._weight_int4pack_mm_for_cpu`: a weight W (out, in) is kept as 4-bit codes in
groups of `group_size` (32–256) consecutive inputs, each group g with a scale and a zero,

    W[o, i] ≈ (Q[o, i] - 8) · s[o, g] + z[o, g],   g = i // group_size,   Q ∈ {0, ..., 15}

(the kernel's convention). From float: round to nearest over each group's [min, max],
s = (max - min) / 15, z = min + 8 s. llama.cpp's 4-bit blocks (Q4_0, Q4_1, Q4_K) are groups
of 32 in this form already (`lmforge.interop.gguf.int4_groups`) and are used as they are.

Activations, scales and zeros go to the kernel in bfloat16: its fast path on x86 (float32
is ~10x slower on an AVX2 CPU, float16 too). The packed layout depends on the CPU, so it is
made here, at load time, and never saved (its buffers are not in the state dict).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.models.heads import LMHead

GROUP_SIZES = (32, 64, 128, 256)  # what the kernel takes
_N_MULTIPLE = 16  # the packing wants whole tiles of 16 output rows


def quantize_groups(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float weight → Q (out, in) uint8 in 0..15, scales and zeros (out, ceil(in/group_size))
    in float32, W ≈ (Q - 8) · s + z per group (asymmetric, round to nearest). A last, partial
    group is padded with zeros for its min/max only."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size}: the int4 kernel takes {GROUP_SIZES}")
    w = w.detach().float()
    out, inp = w.shape
    pad = -inp % group_size
    wg = F.pad(w, (0, pad)).view(out, -1, group_size)  # (out, groups, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.view(out, -1)[:, :inp].contiguous(), scale, lo + 8 * scale


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int = 32
                      ) -> torch.Tensor:
    """The float32 weight (out, in) of int4 groups: (Q - 8) · s + z."""
    out, inp = q.shape
    qg = F.pad(q.float(), (0, -inp % group_size)).view(out, -1, group_size)
    return ((qg - 8) * scale[..., None] + zero[..., None]).view(out, -1)[:, :inp]


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
                out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ W^T + bias for W packed by `Int4Linear`, in x's dtype (bfloat16 inside)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    k = scales_zeros.shape[0] * group_size  # in, padded to whole groups
    if x2.shape[1] != k:
        x2 = F.pad(x2, (0, k - x2.shape[1]))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, group_size, scales_zeros)
    if y.shape[1] != out_features:  # rows padded to a multiple of 16
        y = y[:, :out_features]
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], out_features)


class Int4Linear(nn.Module):
    """A linear layer with int4 weights (groups along the input) for CPU inference."""

    quantized = "int4"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None = None,
                 group_size: int = 32):
        """q (out, in) uint8 codes 0..15; scale, zero (out, ceil(in / group_size)): see `quantize_groups`."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        want = (self.out_features, -(-self.in_features // group_size))
        if group_size not in GROUP_SIZES or tuple(scale.shape) != want or tuple(zero.shape) != want:
            raise ValueError(f"int4 groups of {group_size} for q {tuple(q.shape)}: scale and zero must be {want}, "
                             f"got {tuple(scale.shape)} and {tuple(zero.shape)}; the kernel takes groups of "
                             f"{GROUP_SIZES}")
        packed, scales_zeros = _pack(q, scale, zero, group_size)
        self.register_buffer("packed", packed, persistent=False)  # CPU-dependent layout: never saved
        self.register_buffer("scales_zeros", scales_zeros, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
        return cls(*quantize_groups(linear.weight, group_size), linear.bias, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.packed, self.scales_zeros, self.group_size, self.out_features, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group_size}"

    @staticmethod
    def stacked(x: torch.Tensor, modules: tuple[Int4Linear, ...]) -> torch.Tensor | None:
        """x [W_1; W_2; ...]^T + [b_1; ...] as one int4 product (a compiled step's q/k/v: its
        freezing stacks the packed weights once), where the packed layout allows it: whole
        tiles of `_STACK_ROWS` output rows, no bias, one group size; else None."""
        if not concat_ok() or any(m.bias is not None or m.group_size != modules[0].group_size
                                  or m.out_features % _STACK_ROWS for m in modules):
            return None
        return _stacked_product(x, modules)


class Int4LMHead(nn.Module):
    """The LM head with an int4 copy of its weight (the tied token embedding stays float for lookups)."""

    quantized = "int4"

    def __init__(self, head: LMHead, linear: Int4Linear):
        super().__init__()
        self.scale = head.scale
        self.linear = linear

    def forward(self, h: torch.Tensor, tokens: nn.Embedding) -> torch.Tensor:
        return self.linear(h * self.scale if self.scale != 1.0 else h)


_STACK_ROWS = 64  # packed weights of whole tiles of this many output rows stack (on this CPU: `concat_ok`)
_concat_ok: bool | None = None


def concat_ok() -> bool:
    """Whether packed weights of whole `_STACK_ROWS`-row tiles can be stacked along the output
    (the packed layout depends on the CPU): measured once, on two random weights."""
    global _concat_ok
    if _concat_ok is None:
        with torch.inference_mode():
            g = torch.Generator().manual_seed(0)
            mods = [Int4Linear(torch.randint(0, 16, (_STACK_ROWS, 64), generator=g, dtype=torch.uint8),
                               torch.rand(_STACK_ROWS, 2, generator=g), torch.rand(_STACK_ROWS, 2, generator=g))
                    for _ in range(2)]
            x = torch.randn(1, 64, generator=g)
            _concat_ok = torch.equal(_stacked_product(x, mods), torch.cat([m(x) for m in mods], -1))
    return _concat_ok


def _stacked_product(x: torch.Tensor, modules) -> torch.Tensor:
    """x [W_1; W_2; ...]^T for bias-free Int4Linear modules of one group size, their packed
    weights stacked along the output (valid where `concat_ok`)."""
    return int4_linear(x, torch.cat([m.packed for m in modules]), torch.cat([m.scales_zeros for m in modules], 1),
                       modules[0].group_size, sum(m.out_features for m in modules), None)


def _pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int):
    """The kernel's operands: packed codes (out', in'/2) uint8 and scales_zeros (groups, out', 2)
    bfloat16, with out padded to a multiple of 16 (zero rows) and in to whole groups."""
    out, inp = q.shape
    pad_n, pad_k = -out % _N_MULTIPLE, -inp % group_size
    q = F.pad(q.to(torch.int32), (0, pad_k, 0, pad_n), value=8)  # code 8: weight = zero (0 in padded rows)
    scale, zero = F.pad(scale.float(), (0, 0, 0, pad_n)), F.pad(zero.float(), (0, 0, 0, pad_n))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)  # innerKTiles: unused on CPU
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, scales_zeros
