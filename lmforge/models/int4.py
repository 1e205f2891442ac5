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

A CPU without bfloat16 instructions runs that kernel slowly, so lmforge has its own
(`lmforge.models.qkernel`: int16 activations, AVX2), for products of up to `native_rows()`
rows (decoding); more rows (a prompt) go to the float product of the weight it unpacks.
Which of the two kernels the layers use (the int8 LM head's too) is measured once per
process (`native_rows`).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.models import qkernel
from lmforge.models.heads import LMHead
from lmforge.nn.packed import best_time

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


_native_rows: int | None = None
_ROW_STEPS = (1, 2, 4, 8, 16, 32, 64)


def native_rows() -> int:
    """The most rows an int4 product takes through lmforge's kernel (`qkernel`); 0: it is not
    used, torch's kernel serves every product. Measured once per process on a 1024 x 1024
    weight (the best of 5 runs): at 1 row against torch's kernel, then at 2, 4, ... 64 rows
    against the float product of the unpacked weight. LMFORGE_Q4=torch or =native sets it
    (native: up to 16 rows) without measuring."""
    global _native_rows
    if _native_rows is None:
        how = os.environ.get("LMFORGE_Q4", "")
        if how not in ("", "torch", "native"):
            raise ValueError(f"LMFORGE_Q4={how!r}: use 'torch' or 'native' (or leave it unset to measure)")
        if how == "torch" or not qkernel.available():
            if how == "native":
                raise RuntimeError("LMFORGE_Q4=native, but lmforge.models._qkernel was not built here "
                                   "(pip builds it where a C compiler is)")
            _native_rows = 0
        elif how == "native":
            _native_rows = 16
        else:
            _native_rows = _measure_native_rows()
    return _native_rows


def _measure_native_rows() -> int:
    """`native_rows` measured here (about 0.1 s)."""
    g = torch.Generator().manual_seed(0)
    q, scale, zero = quantize_groups(torch.randn(1024, 1024, generator=g), 32)
    w = qkernel.pack4(q, scale, zero, 32)
    packed, scales_zeros = _pack(q, scale, zero, 32)
    with torch.inference_mode():
        x = torch.randn(1, 1024, generator=g)
        if best_time(lambda: qkernel.matmul(x, w, 1024)) \
                >= best_time(lambda: int4_linear(x, packed, scales_zeros, 32, 1024, None)):
            return 0
        rows = 1
        for n in _ROW_STEPS[1:]:
            x = torch.randn(n, 1024, generator=g)
            if best_time(lambda: qkernel.matmul(x, w, 1024)) \
                    >= best_time(lambda: F.linear(x, qkernel.dequantize(w, 1024, 1024))):
                break
            rows = n
    return rows


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
        packed = scales_zeros = native = None  # the kernel's layouts depend on the CPU: never saved
        if native_rows():
            native = qkernel.pack4(q, scale, zero, group_size)
        else:
            packed, scales_zeros = _pack(q, scale, zero, group_size)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_zeros", scales_zeros, persistent=False)
        self.register_buffer("native", native, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
        return cls(*quantize_groups(linear.weight, group_size), linear.bias, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return qkernel.linear(x, self.native, self.in_features, self.out_features, self.bias, native_rows())
        return int4_linear(x, self.packed, self.scales_zeros, self.group_size, self.out_features, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group_size}"

    @staticmethod
    def stacked(x: torch.Tensor, modules: tuple[Int4Linear, ...]) -> torch.Tensor | None:
        """x [W_1; W_2; ...]^T + [b_1; ...] as one int4 product (a compiled step's q/k/v: its
        freezing stacks the packed weights once), where the packed layout allows it: whole
        tiles of `_STACK_ROWS` output rows, no bias, one group size; else None. With lmforge's
        kernel: each but the last of whole groups of 4 rows, all with a bias or none."""
        if all(m.native is not None for m in modules):
            stacks, bias = stacked_bias(modules)
            if not stacks or any(m.out_features % qkernel.ROWS for m in modules[:-1]):
                return None
            return qkernel.linear(x, torch.cat([m.native for m in modules]), modules[0].in_features,
                                  sum(m.out_features for m in modules), bias, native_rows())
        if any(m.native is not None or m.bias is not None or m.group_size != modules[0].group_size
               or m.out_features % _STACK_ROWS for m in modules) or not concat_ok():
            return None
        return _stacked_product(x, [(m.packed, m.scales_zeros) for m in modules], modules[0].group_size,
                                sum(m.out_features for m in modules))


def stacked_bias(modules) -> tuple[bool, torch.Tensor | None]:
    """Whether the modules' biases stack (all have one, or none has) and, if so, the stacked one."""
    biases = [m.bias for m in modules]
    if all(b is None for b in biases):
        return True, None
    if any(b is None for b in biases):
        return False, None
    return True, torch.cat(biases)


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
            packs = [_pack(torch.randint(0, 16, (_STACK_ROWS, 64), generator=g, dtype=torch.uint8),
                           torch.rand(_STACK_ROWS, 2, generator=g), torch.rand(_STACK_ROWS, 2, generator=g), 32)
                     for _ in range(2)]
            x = torch.randn(1, 64, generator=g)
            alone = [int4_linear(x, *p, 32, _STACK_ROWS, None) for p in packs]
            _concat_ok = torch.equal(_stacked_product(x, packs, 32, 2 * _STACK_ROWS), torch.cat(alone, -1))
    return _concat_ok


def _stacked_product(x: torch.Tensor, packs: list[tuple[torch.Tensor, torch.Tensor]], group_size: int,
                     out_features: int) -> torch.Tensor:
    """x [W_1; W_2; ...]^T for torch-packed weights (packed, scales_zeros) of one group size,
    stacked along the output (valid where `concat_ok`)."""
    return int4_linear(x, torch.cat([p for p, _ in packs]), torch.cat([sz for _, sz in packs], 1), group_size,
                       out_features, None)


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
