"""The Transformer backbone: encoder, decoder and encoder-decoder from the same blocks.

Encoder-decoder models follow The Annotated Transformer's shape: `encode(src)`
once, then `decode(tgt, memory)` (step by step with a KV cache when generating).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lmforge.config import ModelConfig
from lmforge.nn.attention import Attention, KVCache, StaticKV, Unpadded, additive_mask
from lmforge.nn.layers import FeedForward, RelativeBias, Rotary, make_norm, sinusoidal_table
from lmforge.nn.linear import Linear


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Block(nn.Module):
    """Self-attention (+ cross-attention) + feed-forward, each in a residual branch.

    pre-norm:  x = x + f(norm(x))      (GPT-2, Llama, T5)
    post-norm: x = norm(x + f(x))      (the paper, BERT, BART, Marian)
    """

    def __init__(self, cfg: ModelConfig, cross: bool):
        super().__init__()
        self.pre = cfg.norm_placement == "pre"
        self.attn, self.attn_norm = Attention(cfg), make_norm(cfg)
        self.cross = Attention(cfg, cross=True) if cross else None
        self.cross_norm = make_norm(cfg) if cross else None
        self.ff, self.ff_norm = FeedForward(cfg), make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def _residual(self, x, norm, f):
        drop = self.drop if self.training else _identity  # no module call per branch when decoding
        if self.pre:
            return x + drop(f(norm(x)))
        return norm(x + drop(f(x)))

    def forward(self, x, mask=None, is_causal=False, rope=None, memory=None, memory_mask=None,
                cache: KVCache | None = None, layer: int = 0, unpadded: Unpadded | None = None):
        x = self._residual(x, self.attn_norm,
                           lambda h: self.attn(h, mask=mask, is_causal=is_causal, rope=rope,
                                               cache=cache, layer=layer, unpadded=unpadded))
        if self.cross is not None:
            x = self._residual(x, self.cross_norm,
                               lambda h: self.cross(h, memory=memory, mask=memory_mask,
                                                    cache=cache, layer=layer))
        if cache is None or cache.blocks is None:
            return self._residual(x, self.ff_norm, self.ff)
        return self._residual(x, self.ff_norm, lambda h: self.ff(h, cache.blocks))


class Stack(nn.Module):
    """A stack of blocks with its own positional encoding, embedding norm and final norm.

    The token embedding is owned by the backbone and shared between stacks.
    """

    def __init__(self, cfg: ModelConfig, n_layers: int, causal: bool, cross: bool):
        super().__init__()
        self.cfg, self.causal = cfg, causal
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.embed_scale else 1.0
        self.positions = self.rope = self.rel_bias = None
        if cfg.position == "learned":
            self.positions = nn.Embedding(cfg.max_len + cfg.pos_offset, cfg.d_model)
        elif cfg.position == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_table(cfg.max_len, cfg.d_model), persistent=False)
        elif cfg.position == "rope":
            self.rope = Rotary(cfg.head_dim, cfg.rope_theta)
        elif cfg.position == "relative":
            self.rel_bias = RelativeBias(cfg.rel_buckets, cfg.rel_max_distance, cfg.n_heads,
                                         bidirectional=not causal)
        self.types = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size and not causal \
            and not cross else None
        self.embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, cross) for _ in range(n_layers))
        self.norm = make_norm(cfg) if cfg.norm_placement == "pre" else None

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, unpad: bool = False) -> torch.Tensor:
        """x (B, T, d) token embeddings → hidden states (B, T, d).

        attention_mask (B, T_total) marks real tokens (1) and padding (0); with a cache
        T_total covers the cached positions too. position_ids (B, T) default to
        offset + arange(T) where offset is the number of cached positions. A `StaticKV` cache
        (a compiled step) needs both: the mask over all its columns, and the positions.
        unpad: the layers run on the real tokens only (`Unpadded`; self-attention stacks
        without a cache), and padding positions come out as zeros.
        """
        B, T, _ = x.shape
        static = isinstance(cache, StaticKV)  # a compiled step: positions and mask given, all columns seen
        offset = (cache.max_len - T if static else cache.pos) if cache is not None else 0
        if offset + T > self.cfg.max_len and self.rope is None and self.rel_bias is None:
            raise ValueError(f"sequence of {offset + T} positions exceeds the model's max_len={self.cfg.max_len}")
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        if position_ids is None and (self.positions is not None or hasattr(self, "sinusoid")):
            # the same positions for every row: a slice of the table, broadcast over the batch
            table = self.positions.weight if self.positions is not None else self.sinusoid
            start = offset + (self.cfg.pos_offset if self.positions is not None else 0)
            x = x + table[start:start + T].to(x.dtype)
        elif self.positions is not None:
            x = x + self.positions(position_ids + self.cfg.pos_offset)
        elif hasattr(self, "sinusoid"):
            x = x + self.sinusoid[position_ids].to(x.dtype)
        if position_ids is None and (self.types is not None or self.rope is not None):
            position_ids = torch.arange(offset, offset + T, device=x.device)[None].expand(B, T)
        if self.types is not None:
            tt = token_type_ids if token_type_ids is not None else torch.zeros_like(position_ids)
            x = x + self.types(tt)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if self.training:
            x = self.drop(x)

        k_len = offset + T
        bias = None
        if self.rel_bias is not None:
            if cache is None:
                bias = self.rel_bias(T, k_len, offset)
            else:  # decoding: slices of one table over every distance, computed once per generation
                if cache.rel_bias is None:
                    cache.rel_bias = self.rel_bias.table(cache.max_len)
                bias = self.rel_bias.from_table(cache.rel_bias, T, k_len, cache.at if static else offset)
        simple_causal = self.causal and attention_mask is None and bias is None and offset == 0
        if T == 1 and attention_mask is None:  # one new token, nothing padded: it sees every key
            mask = None if bias is None else bias.to(x.dtype)
        elif simple_causal:
            mask = None
        else:
            mask = additive_mask(T, k_len, causal=self.causal, offset=offset, key_padding=attention_mask,
                                 bias=bias, dtype=x.dtype, device=x.device)
        mem_mask = None
        if memory is not None and memory_mask is not None:
            mem_mask = additive_mask(T, memory.shape[1], causal=False, key_padding=memory_mask,
                                     dtype=x.dtype, device=x.device)
        rope = self.rope(position_ids) if self.rope is not None else None
        unpadded = None
        if unpad and attention_mask is not None and memory is None and cache is None:
            unpadded = Unpadded(attention_mask, alone=not self.causal and bias is None)
            x = unpadded.pack(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask=mask, is_causal=simple_causal, rope=rope, memory=memory,
                      memory_mask=mem_mask, cache=cache, layer=i, unpadded=unpadded)
        if cache is not None and not static:
            cache.pos += T
        x = self.norm(x) if self.norm is not None else x
        return unpadded.unpack(x) if unpadded is not None else x


class Transformer(nn.Module):
    """Token embeddings + encoder and/or decoder stacks (+ BERT's pooler)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, cfg.n_encoder_layers, causal=False, cross=False) \
            if cfg.n_encoder_layers else None
        self.decoder = Stack(cfg, cfg.n_decoder_layers, causal=True, cross=cfg.family == "encoder-decoder") \
            if cfg.n_decoder_layers else None
        self.pooler = Linear(cfg.d_model, cfg.d_model) if cfg.pooler else None

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None, unpad: bool = False) -> torch.Tensor:
        """(B, S) ids → memory (B, S, d). unpad: the layers skip the padding (`Stack.forward`),
        whose positions come out as zeros."""
        return self.encoder(self.tokens(input_ids), attention_mask=attention_mask,
                            token_type_ids=token_type_ids, unpad=unpad)

    def decode(self, input_ids: torch.Tensor, memory: torch.Tensor | None = None,
               memory_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """(B, T) target ids (+ encoder memory) → hidden states (B, T, d)."""
        return self.decoder(self.tokens(input_ids), attention_mask=attention_mask,
                            position_ids=position_ids, memory=memory, memory_mask=memory_mask,
                            cache=cache)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT pooler: tanh(W h_[CLS] + b)."""
        return torch.tanh(self.pooler(hidden[:, 0]))
