"""Building blocks: norms, feed-forward variants and positional encodings."""

from __future__ import annotations

import math
import os
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig


# oneDNN's fp32 GEMM is ~2x faster than MKL's on AMD CPUs (bench/README.md), forward and
# backward. Off with LMFORGE_ONEDNN=0; any other device or dtype uses F.linear.
_ONEDNN = (os.environ.get("LMFORGE_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()
           and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _dnn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class _DNNLinear(torch.autograd.Function):
    """y = x W^T + b with oneDNN; backward: dx = dy W, dW = dy^T x, db = sum dy."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _dnn(x, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])  # (N, out), (N, in)
        dx = _dnn(dy2, w.t().contiguous(), None).view(x.shape) if ctx.needs_input_grad[0] else None
        dw = _dnn(dy2.t().contiguous(), x2.t().contiguous(), None) if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def fast_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through oneDNN on CPU in float32."""
    if not (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
        return F.linear(x, w, b)  # autocast and torch.compile see the ordinary op
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return _DNNLinear.apply(x, w, b)
    blocks = getattr(_ACTIVE, "blocks", None)
    if blocks is not None:
        y = blocks.linear(x, (w,), (b,))
        if y is not None:
            return y
    return _dnn(x, w, b)


_ACTIVE = threading.local()  # the RowBlocks of the decoding step running in this thread, if any
# products of rows x W with rows * W.numel() up to this go through RowBlocks (0: never)
_ROW_BLOCKS_MAX = int(os.environ.get("LMFORGE_ROW_BLOCKS", 1 << 21))


class RowBlocks:
    """Small weights laid out for GEMMs of a few rows (decoding: one token per sequence).

    oneDNN spends ~11 µs setting up each call, more than a 256x256 product of one row takes.
    Here a weight W (out, in), or several stacked ([W_q; W_k; W_v]: one product instead of
    three), is copied once into P column blocks of W^T, (P, in, out/P), and y = x W^T + b
    runs as one batched MKL GEMM over the blocks (P = threads, a block each). `fast_linear`
    uses it for products of rows * W.numel() <= LMFORGE_ROW_BLOCKS (default 2^21 elements)
    while it is active (`with blocks:`, in each decoding step). A model keeps its blocks
    (`RowBlocks.of`): one extra copy of its small weights, remade after an in-place update.
    Values differ from oneDNN's in the last bits only (another summation order).
    """

    def __init__(self, max_elements: int = _ROW_BLOCKS_MAX):
        self.max_elements, self.parts = max_elements, torch.get_num_threads()
        self._blocks: dict[int | tuple[int, ...], tuple] = {}  # id(W) or ids of stacked Ws → entry

    @staticmethod
    def of(model: nn.Module) -> RowBlocks:
        """The blocks kept with `model` (made on first use), checked against its parameters:
        blocks of replaced or updated-in-place weights are dropped, to be made anew."""
        blocks = model.__dict__.get("_row_blocks")
        if blocks is None:
            blocks = model.__dict__["_row_blocks"] = RowBlocks()
        blocks.check({id(p): p._version for p in model.parameters()})
        return blocks

    def check(self, versions: dict[int, int]) -> None:
        """Keep the blocks whose source tensors are in `versions` (id → version) unchanged."""
        self._blocks = {k: e for k, e in self._blocks.items()
                        if all(versions.get(id(t)) == v for t, v in zip(e[0], e[1]))}

    @staticmethod
    def active() -> RowBlocks | None:
        return getattr(_ACTIVE, "blocks", None)

    def __enter__(self) -> RowBlocks:
        if not hasattr(_ACTIVE, "outer"):
            _ACTIVE.outer = []
        _ACTIVE.outer.append(RowBlocks.active())
        _ACTIVE.blocks = self
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.blocks = _ACTIVE.outer.pop()

    def linear(self, x: torch.Tensor, ws: tuple[torch.Tensor, ...],
               bs: tuple[torch.Tensor | None, ...]) -> torch.Tensor | None:
        """x [W_1; W_2; ...]^T + [b_1; b_2; ...], or None when the product is too large here.

        Blocks are made on first use and then found by the weights' ids: while they are
        active the weights must not change (`RowBlocks.of` checks them once per generation)."""
        key = id(ws[0]) if len(ws) == 1 else tuple(map(id, ws))
        entry = self._blocks.get(key)
        if entry is None:
            entry = self._blocks[key] = self._make(ws, bs)
        wb, bb, (P, inp, cols) = entry[2], entry[3], entry[4]
        rows = x.numel() // inp
        if rows * P * cols * inp > self.max_elements:
            return None
        x3 = x.reshape(1, rows, inp).expand(P, rows, inp)
        y = torch.bmm(x3, wb) if bb is None else torch.baddbmm(bb, x3, wb)  # (P, rows, out/P)
        y = y.view(rows, P * cols) if rows == 1 else y.transpose(0, 1).reshape(rows, P * cols)
        return y.view(*x.shape[:-1], P * cols)

    def _make(self, ws, bs) -> tuple:
        """(sources, their versions, blocks of [W...]^T or None, bias blocks or None, (P, in, out/P))."""
        out, inp = sum(w.shape[0] for w in ws), ws[0].shape[1]
        P = self.parts if out % self.parts == 0 else 1
        wb = bb = None  # too large even for one row: no copy, only the shape
        if out * inp <= self.max_elements:
            w = torch.cat([w.detach() for w in ws]) if len(ws) > 1 else ws[0].detach()
            wb = w.view(P, out // P, inp).transpose(1, 2).contiguous()
            bb = None if bs[0] is None else torch.cat([b.detach() for b in bs]).view(P, 1, out // P)
        sources = tuple(t for t in ws + bs if t is not None)
        return sources, tuple(0 if t.is_inference() else t._version for t in sources), wb, bb, (P, inp, out // P)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) computed with `fast_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_linear(x, self.weight, self.bias)


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
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op, same values
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


_ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swiglu": F.silu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "geglu": lambda x: F.gelu(x, approximate="tanh")}


def activation(name: str):
    return _ACT[name]


class FeedForward(nn.Module):
    """FFN(x) = W_down act(W_up x)  or, gated (GLU variants, Shazeer 2020),
    W_down (act(W_gate x) * W_up x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = activation(cfg.activation)
        self.up = Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.gate = Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if cfg.gated else None
        self.down = Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
        return self.down(self.drop(h) if self.training else h)


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
    def from_table(table: torch.Tensor, q_len: int, k_len: int, offset: int = 0) -> torch.Tensor:
        """The (1, H, q_len, k_len) bias of `forward`, cut from `table(n)` (offset + q_len <= n)."""
        n = (table.shape[1] + 1) // 2
        if q_len == 1:  # one query row: a slice, no gather
            start = n - 1 - offset
            return table[None, :, None, start:start + k_len]
        rel = torch.arange(k_len, device=table.device)[None, :] - torch.arange(offset, offset + q_len,
                                                                               device=table.device)[:, None]
        return table[:, rel + n - 1][None]

    def forward(self, q_len: int, k_len: int, offset: int = 0) -> torch.Tensor:
        """→ (1, H, q_len, k_len) additive bias; queries sit at offset..offset+q_len-1."""
        dev = self.weight.device
        q = torch.arange(offset, offset + q_len, device=dev)[:, None]
        k = torch.arange(k_len, device=dev)[None, :]
        values = F.embedding(self.bucket(k - q), self.weight)  # (q, k, H)
        return values.permute(2, 0, 1)[None]
