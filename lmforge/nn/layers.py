"""Building blocks around attention: norms, feed-forward variants and positional encodings.

    RMSNorm, make_norm        RMSNorm or LayerNorm, as the config says
    FeedForward, activation   the MLP (plain or gated: SwiGLU, GeGLU) and its activations
    sinusoidal_table          fixed sinusoidal positions (Vaswani et al. 2017)
    Rotary, apply_rotary      rotary positions (RoPE, Su et al. 2021)
    RelativeBias              T5's learned relative position bias

The linear layers and their GEMM kernels are in `lmforge.nn.linear`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.models import qkernel  # the optional C kernels (setup.py): the tanh-GELU's
from lmforge.nn.linear import Linear, RowBlocks, cast_once, fused_linear, linear


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g  (Zhang & Sennrich 2019; T5's and Llama's norm).

    Computed in float32 like the reference implementations, then cast back.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if _RMS_C and x.device.type == "cpu" and x.shape[-1] % 8 == 0 and torch.is_grad_enabled() \
                    and (x.requires_grad or self.weight.requires_grad) and not torch.compiler.is_compiling():
                return RMSNormFn.apply(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op, same values
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# lmforge/models/rmsnorm.c: AVX2 and FMA, float32
_RMS_C = qkernel.available() and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


class RMSNormFn(torch.autograd.Function):
    """RMSNorm and its gradients by lmforge's C kernel (lmforge/models/rmsnorm.c): one pass over the
    rows forward and one backward, where autograd runs F.rms_norm as a dozen elementwise passes.
    float32, within float32 rounding of F.rms_norm (the squares summed in another order). On a
    2-core Zen 4 EPYC, 16 x 128 x 256 (a T5-like layer's norm), forward and backward: 0.37 ms against
    2.15 for F.rms_norm; T5-like training steps 1.04x in float32 and in bf16 autocast."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = x.contiguous().view(-1, x.shape[-1])
        y, r = torch.empty_like(x2), x2.new_empty(x2.shape[0])
        qkernel._qkernel.rmsnorm_forward(y.data_ptr(), r.data_ptr(), x2.data_ptr(), weight.data_ptr(), *x2.shape,
                                         float(eps))
        ctx.save_for_backward(x2, weight, r)
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x2, weight, r = ctx.saved_tensors
        dy2 = dy.to(torch.float32).contiguous().view(x2.shape)
        dx, dw = torch.empty_like(x2), torch.empty_like(weight)
        qkernel._qkernel.rmsnorm_backward(dx.data_ptr(), dw.data_ptr(), x2.data_ptr(), weight.data_ptr(),
                                          dy2.data_ptr(), r.data_ptr(), *x2.shape)
        return dx.view(dy.shape), dw, None


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


# lmforge.models.gelu.c: a vectorised e^x where torch computes SLEEF's tanhf; used with AVX2 and FMA
_GELU_C = qkernel.available() and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh"); on CPU in float32 or bfloat16, through `GeluTanh`."""
    if _GELU_C and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) \
            and not torch.compiler.is_compiling():
        return GeluTanh.apply(x)
    return F.gelu(x, approximate="tanh")


class GeluTanh(torch.autograd.Function):
    """tanh-GELU and its gradient by lmforge's C kernel (lmforge/models/gelu.c): y = x / (1 + e^-z),
    z = 2 sqrt(2/pi) (x + 0.044715 x^3), which is 0.5 x (1 + tanh(z / 2)); within 1e-6 of torch's
    in float32, the same bfloat16 values to rounding. 2,048 x 1,536 elements on a 2-core Zen 4
    EPYC: forward 3.1 -> 1.4 ms, backward 3.5 -> 1.9 ms."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        ctx.save_for_backward(x)
        return _gelu_kernel(x, None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return _gelu_kernel(x, dy.to(x.dtype).contiguous())


def _gelu_kernel(x: torch.Tensor, dy: torch.Tensor | None) -> torch.Tensor:
    out = torch.empty_like(x)
    qkernel._qkernel.gelu_tanh(out.data_ptr(), x.data_ptr(), 0 if dy is None else dy.data_ptr(), x.numel(),
                       int(x.dtype == torch.bfloat16))
    return out


_ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swiglu": F.silu, "gelu_tanh": gelu_tanh, "geglu": gelu_tanh}


def activation(name: str):
    return _ACT[name]


class FeedForward(nn.Module):
    """FFN(x) = W_down act(W_up x)  or, gated (GLU variants, Shazeer 2020),
    W_down (act(W_gate x) * W_up x). Without gradients, a plain FFN's W_up product and its
    activation run as one oneDNN product where they can (`fused_linear`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act_name = cfg.activation
        self.act = activation(cfg.activation)
        self.up = Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.gate = Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if cfg.gated else None
        self.down = Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, blocks: RowBlocks | None = None) -> torch.Tensor:
        """x (B, T, d) → (B, T, d); `blocks`: a generation's RowBlocks (decoding)."""
        if self.gate is not None and getattr(blocks, "stack_gate", False):  # [W_gate; W_up] as one product
            y = blocks(x, self.gate, self.up)
            if y is not None:
                gate, up = y.chunk(2, dim=-1)
                return linear(self.down, self.act(gate) * up, blocks)
        h = None
        if self.gate is None and blocks is None and type(self.up) is Linear:
            h = fused_linear(x, self.up.weight, self.up.bias, self.act_name, self.act)
        if h is None:
            x = cast_once(x) if self.gate is not None else x  # gate and up share one cast under autocast
            up = linear(self.up, x, blocks)
            h = self.act(linear(self.gate, x, blocks)) * up if self.gate is not None else self.act(up)
        return linear(self.down, self.drop(h) if self.training else h, blocks)


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """(n_pos, dim) table of "Attention Is All You Need" §3.5:
    PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...).
    Stored as [sin | cos] halves (the tensor2tensor/Marian layout): the same
    encoding with the dimensions permuted."""
    inv = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv[None, :]  # (n_pos, dim/2)
    return torch.cat([ang.sin(), ang.cos()], dim=-1).float()


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021) in the rotate-half layout of HF Llama."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) → cos, sin of shape (B, 1, T, head_dim) in float32."""
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd): x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class RelativeBias(nn.Module):
    """T5's learned relative position bias (Raffel et al. 2020, §2.1): one scalar per
    (bucket, head); buckets are exact for small distances and logarithmic up to
    `max_distance`. Bidirectional in the encoder, causal in the decoder."""

    no_weight_decay = True  # a lookup table like an embedding: the training loop leaves it undecayed

    def __init__(self, n_buckets: int, max_distance: int, n_heads: int, bidirectional: bool):
        super().__init__()
        self.n_buckets, self.max_distance, self.bidirectional = n_buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.zeros(n_buckets, n_heads))

    def bucket(self, rel: torch.Tensor) -> torch.Tensor:
        """rel = key_pos - query_pos (int64) → bucket ids."""
        n = self.n_buckets
        out = torch.zeros_like(rel)
        if self.bidirectional:
            n //= 2
            out = out + (rel > 0).long() * n  # keys to the right get the upper half
            dist = rel.abs()
        else:
            dist = (-rel).clamp(min=0)  # only the past counts
        exact = n // 2
        # log-spaced buckets for distances in [exact, max_distance)
        far = exact + (torch.log(dist.float().clamp(min=1) / exact) / math.log(self.max_distance / exact)
                       * (n - exact)).long()
        far = far.clamp(max=n - 1)
        return out + torch.where(dist < exact, dist, far)

    def table(self, n: int) -> torch.Tensor:
        """(H, 2n-1) bias of every relative distance -(n-1)..n-1 (column n-1+rel)."""
        rel = torch.arange(-(n - 1), n, device=self.weight.device)
        return F.embedding(self.bucket(rel), self.weight).t().contiguous()

    @staticmethod
    def from_table(table: torch.Tensor, q_len: int, k_len: int, offset: int | torch.Tensor = 0) -> torch.Tensor:
        """The (1, H, q_len, k_len) bias of `forward`, cut from `table(n)` (offset + q_len <= n)."""
        n = (table.shape[1] + 1) // 2
        if q_len == 1 and isinstance(offset, int):  # one query row: a slice, no gather
            start = n - 1 - offset
            return table[None, :, None, start:start + k_len]
        # offset may be a 0-d tensor (a compiled step, `StaticKV`)
        queries = offset + torch.arange(q_len, device=table.device)
        rel = torch.arange(k_len, device=table.device)[None, :] - queries[:, None]
        return table[:, rel + n - 1][None]

    def forward(self, q_len: int, k_len: int, offset: int = 0) -> torch.Tensor:
        """→ (1, H, q_len, k_len) additive bias; queries sit at offset..offset+q_len-1."""
        dev = self.weight.device
        q = torch.arange(offset, offset + q_len, device=dev)[:, None]
        k = torch.arange(k_len, device=dev)[None, :]
        values = F.embedding(self.bucket(k - q), self.weight)  # (q, k, H)
        # laid out (H, q, k): masks built from it and the scores it is added to then share one
        # layout (heads innermost, a bf16 add over T5-like scores ran 10x slower)
        return values.permute(2, 0, 1).contiguous()[None]
