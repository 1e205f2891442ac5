"""Multi-head attention (self or cross, MHA/GQA/MQA) and the KV cache.

    Q = X W^Q,  K = Y W^K,  V = Y W^V        (Y = X for self-attention, the encoder memory for cross)
    head_i = softmax(Q_i K_i^T / sqrt(d_k) + M) V_i
    MultiHead = Concat(head_1..head_h) W^O

computed by `F.scaled_dot_product_attention`. M is one additive mask that folds the
causal mask, padding and (T5) relative position bias together.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.nn.layers import Linear, RowBlocks, apply_rotary


class KVCache:
    """Preallocated keys/values for every decoder layer, written at the current position.

    Self-attention: `kv[layer]` of shape (2, B, KV, max_len, hd), keys then values, filled
    up to `pos` (views of one buffer `buf` for all layers). Cross-attention: k/v of the encoder memory, computed once at the first step.
    A cache lives for one generation, so it also keeps the relative position bias table
    decoding slices at every step (`rel_bias`, T5).
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        # one buffer for every layer (one copy reorders them all); kv[layer] is a view of it
        self.buf = torch.zeros(n_layers, 2, batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.kv = list(self.buf)
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.rel_bias: torch.Tensor | None = None
        self.pos = 0  # number of positions already written
        self.max_len = max_len
        self._spare: torch.Tensor | None = None  # see reorder

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        return cls(cfg.n_decoder_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim, dtype, device)

    @property
    def batch(self) -> int:
        return self.buf.shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, KV, T, hd) at [pos, pos+T) and return everything up to pos+T.

        With v=None, k holds both: (2, B, KV, T, hd), written in one copy."""
        T = k.shape[-2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        kv = self.kv[layer]
        if v is None:
            kv[:, :, :, self.pos:end] = k
        else:
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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.cross = cross
        self.scale = cfg.attn_scale  # None → 1/sqrt(hd) inside SDPA
        self.dropout = cfg.attn_dropout
        inner, kv_inner = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q = Linear(cfg.d_model, inner, bias=cfg.bias)
        self.k = Linear(cfg.d_model, kv_inner, bias=cfg.bias)
        self.v = Linear(cfg.d_model, kv_inner, bias=cfg.bias)
        self.o = Linear(inner, cfg.d_model, bias=cfg.bias)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.hd).transpose(1, 2)  # (B, n, T, hd)

    def _fused_qkv(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [W_q; W_k; W_v]^T (+ biases) as one product while decoding (RowBlocks active), or
        None (too large, projections that are not plain `Linear`s such as LoRA, gradients)."""
        blocks = RowBlocks.active()
        if blocks is None or torch.is_grad_enabled() or not x.is_cpu or x.dtype != torch.float32:
            return None
        q, k, v = self.q, self.k, self.v
        if type(q) is not Linear or type(k) is not Linear or type(v) is not Linear:
            return None
        return blocks.linear(x, (q.weight, k.weight, v.weight), (q.bias, k.bias, v.bias))

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, is_causal: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x (B, T, d); memory (B, S, d) for cross-attention; mask additive, broadcastable
        to (B, H, T, S_k). Returns (B, T, d)."""
        B, T, _ = x.shape
        if rope is not None and self.cross:
            raise ValueError("rotary positions do not apply to cross-attention")
        y = None if self.cross or cache is None else self._fused_qkv(x)
        if y is not None:  # decoding: one GEMM, k and v written to the cache in one copy
            inner = self.n_heads * self.hd
            q = y[..., :inner].view(B, T, self.n_heads, self.hd).transpose(1, 2)
            kv = y[..., inner:].view(B, T, 2, self.n_kv, self.hd).permute(2, 0, 3, 1, 4)  # (2, B, KV, T, hd)
            if rope is None:
                k, v = cache.update(layer, kv)
            else:
                q, k = apply_rotary(q, *rope), apply_rotary(kv[0], *rope)
                k, v = cache.update(layer, k, kv[1])
        else:
            q = self._heads(self.q(x), self.n_heads)
            if self.cross and cache is not None and cache.cross[layer] is not None:
                k, v = cache.cross[layer]  # encoder memory projected once
            else:
                src = memory if self.cross else x
                k, v = self._heads(self.k(src), self.n_kv), self._heads(self.v(src), self.n_kv)
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
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


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
