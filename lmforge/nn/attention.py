"""Multi-head attention (self or cross, MHA/GQA/MQA) and the KV cache.

    Q = X W^Q,  K = Y W^K,  V = Y W^V        (Y = X for self-attention, the encoder memory for cross)
    head_i = softmax(Q_i K_i^T / sqrt(d_k) + M) V_i
    MultiHead = Concat(head_1..head_h) W^O

computed by `F.scaled_dot_product_attention`. M is one additive mask that folds the
causal mask, padding and (T5) relative position bias together. `QKV` holds the projections
q, k, v; while decoding (a KV cache that carries RowBlocks) it computes them as one product.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.nn.layers import apply_rotary
from lmforge.nn.linear import Linear, RowBlocks, linear


class KVCache:
    """Preallocated keys/values for every decoder layer, written at the current position.

    Self-attention: `kv[layer]` of shape (2, B, KV, max_len, hd), keys then values, filled
    up to `pos` (views of one buffer `buf` for all layers). Cross-attention: k/v of the encoder memory, computed once at the first step.
    A cache lives for one generation, so it also keeps the relative position bias table
    decoding slices at every step (`rel_bias`, T5) and the generation's `RowBlocks`
    (`blocks`: the small weights laid out for products of a few rows), if any.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 blocks: RowBlocks | None = None):
        # one buffer for every layer (one copy reorders them all); kv[layer] is a view of it
        self.buf = torch.zeros(n_layers, 2, batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.kv = list(self.buf)
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.rel_bias: torch.Tensor | None = None
        self.pos = 0  # number of positions already written
        self.max_len = max_len
        self.blocks = blocks
        self._spare: torch.Tensor | None = None  # see reorder

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu",
                  blocks: RowBlocks | None = None):
        return cls(cfg.n_decoder_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim, dtype, device, blocks)

    @property
    def batch(self) -> int:
        return self.buf.shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, KV, T, hd) of `layer` at [pos, pos+T); return its keys and values up to pos+T."""
        T = k.shape[-2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        kv = self.kv[layer]
        kv[0, :, :, self.pos:end] = k
        kv[1, :, :, self.pos:end] = v
        return kv[0, :, :, :end], kv[1, :, :, :end]

    def reorder(self, index: torch.Tensor, cross: bool = True) -> None:
        """Select batch rows (beam search): row i becomes old row index[i].

        When the batch size stays, only the positions written so far are copied, into a
        second set of buffers that then swaps with the first: fresh full-size tensors every
        beam step cost more (allocation, page faults) than the decoding step itself.
        cross=False keeps the cross-attention k/v as they are (beams of one source share them).
        """
        if index.numel() == self.batch:
            if self._spare is None:
                self._spare = torch.empty_like(self.buf)
            torch.index_select(self.buf[..., :self.pos, :], 2, index, out=self._spare[..., :self.pos, :])
            self.buf, self._spare = self._spare, self.buf
        else:  # the batch grows or shrinks: new buffers
            self.buf, self._spare = self.buf.index_select(2, index), None
        self.kv = list(self.buf)
        if cross:
            self.cross = [None if c is None else (c[0].index_select(0, index), c[1].index_select(0, index))
                          for c in self.cross]


class QKV(nn.Module):
    """The query, key and value projections `q`, `k`, `v` (their state-dict names), computed
    as one stacked product [W_q; W_k; W_v] when a generation's RowBlocks hold them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inner, self.kv_inner = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q = Linear(cfg.d_model, self.inner, bias=cfg.bias)
        self.k = Linear(cfg.d_model, self.kv_inner, bias=cfg.bias)
        self.v = Linear(cfg.d_model, self.kv_inner, bias=cfg.bias)

    def project(self, x: torch.Tensor, memory: torch.Tensor | None = None, blocks: RowBlocks | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, d) → q (B, T, H*hd) and, from `memory` (B, S, d) or else x, k and v (B, S, KV*hd)."""
        if memory is None and blocks is not None:
            y = blocks(x, self.q, self.k, self.v)
            if y is not None:
                return y.split((self.inner, self.kv_inner, self.kv_inner), dim=-1)
        src = x if memory is None else memory
        return linear(self.q, x, blocks), linear(self.k, src, blocks), linear(self.v, src, blocks)


class Attention(QKV):
    """Self- or cross-attention over the QKV projections: one path for training, prefill and
    decoding (rotary positions and the KV cache written once, whichever way q/k/v were made)."""

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__(cfg)
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.cross = cross
        self.scale = cfg.attn_scale  # None → 1/sqrt(hd) inside SDPA
        self.dropout = cfg.attn_dropout
        self.o = Linear(self.inner, cfg.d_model, bias=cfg.bias)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.hd).transpose(1, 2)  # (B, n, T, hd)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, is_causal: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x (B, T, d); memory (B, S, d) for cross-attention; mask additive, broadcastable
        to (B, H, T, S_k). Returns (B, T, d)."""
        B, T, _ = x.shape
        if rope is not None and self.cross:
            raise ValueError("rotary positions do not apply to cross-attention")
        blocks = cache.blocks if cache is not None else None
        if self.cross and cache is not None and cache.cross[layer] is not None:
            q = self._heads(linear(self.q, x, blocks), self.n_heads)
            k, v = cache.cross[layer]  # encoder memory projected once
        else:
            q, k, v = self.project(x, memory if self.cross else None, blocks)
            q, k, v = self._heads(q, self.n_heads), self._heads(k, self.n_kv), self._heads(v, self.n_kv)
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            if cache is not None:
                if self.cross:
                    cache.cross[layer] = (k, v)
                else:
                    k, v = cache.update(layer, k, v)
        # GQA/MQA: each kv head serves n_heads/n_kv query heads; SDPA broadcasts them itself
        # (no repeat_interleave copy of the whole KV cache at every decoding step)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
            enable_gqa=self.n_kv != self.n_heads)  # (B, H, T, hd)
        return linear(self.o, y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd), blocks)


def additive_mask(q_len: int, k_len: int, *, causal: bool, offset: int = 0,
                  key_padding: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor | None:
    """One additive mask (B|1, H|1, q_len, k_len), or None when nothing is masked.

    causal: query i (absolute position offset+i) sees keys j <= offset+i.
    key_padding: (B, k_len) with 1/True for real tokens, 0/False for padding.
    bias: (1, H, q_len, k_len) relative position bias, added where allowed.
    Masked entries get finfo.min (not -inf) like the reference, so a row with no
    visible key (a left-pad query) stays finite.
    """
    allowed = None
    if causal:
        q = torch.arange(offset, offset + q_len, device=device)[:, None]
        allowed = (torch.arange(k_len, device=device)[None, :] <= q)[None, None]  # (1,1,q,k)
    if key_padding is not None:
        pad = key_padding.bool()[:, None, None, :]  # (B,1,1,k)
        allowed = pad if allowed is None else allowed & pad
    if allowed is None:
        return bias.to(dtype) if bias is not None else None
    zero = bias.to(dtype) if bias is not None else torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device))
