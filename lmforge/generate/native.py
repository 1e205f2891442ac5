"""A decoding step in one native call, for one sequence through a Llama-family decoder whose
layers hold lmforge's 4-bit weights (`Int4Linear` with its `native` buffer).

A step of a small model at batch 1 issues about 150 kernels (4 products, attention, norms and
element-wise ops per layer). Eagerly, or even compiled by Inductor, each costs several
microseconds of dispatch, wrapper code and thread wake-ups besides its work: on SmolLM2-135M
in int4 that was as long as the products themselves. `qstep.c` runs the whole step (norms,
q/k/v, rotary positions, the cache write, attention, feed-forward, final norm) in one call on
the same products (`lmforge.models.qkernel`); the LM head is the model's own, so the logits
are what the eager step computes up to float summation order.

`DecoderState` steps through it where it applies (`native_fits`, and one unpadded row):
decoder-only, RMSNorm before each block, rotary positions, a gated SiLU feed-forward, no
biases, every projection 4-bit on lmforge's kernel, float32 on CPU. Elsewhere, and once beam
search has made rows of the cache, the state steps eagerly or compiled as before. The server's
engine (`lmforge.serve.batch`) steps through it while one sequence runs. `LMFORGE_NATIVE_STEP=0`
turns it off (to measure the difference, or to rule it out).
"""

from __future__ import annotations

import math
import os

import torch

from lmforge.models import qkernel
from lmforge.models.int4 import Int4Linear
from lmforge.nn.layers import RMSNorm

_WEIGHTS = ("attn.q", "attn.k", "attn.v", "attn.o", "ff.gate", "ff.up", "ff.down")


def native_fits(model) -> bool:
    """Whether `NativeStep` can run this model (for one unpadded row)."""
    cfg = model.cfg
    stack = model.backbone.decoder
    return (qkernel.available() and os.environ.get("LMFORGE_NATIVE_STEP", "1") != "0"
            and cfg.family == "decoder" and cfg.norm == "rmsnorm" and cfg.norm_placement == "pre"
            and cfg.position == "rope" and cfg.activation in ("swiglu", "silu") and cfg.gated
            and not cfg.bias and not cfg.embed_scale and stack.embed_norm is None and stack.types is None
            and cfg.head_dim % 2 == 0 and not model.training
            and model.backbone.tokens.weight.dtype == torch.float32 and model.backbone.tokens.weight.device.type == "cpu"
            and isinstance(stack.norm, RMSNorm)
            and all(isinstance(b.attn_norm, RMSNorm) and isinstance(b.ff_norm, RMSNorm) and b.cross is None
                    for b in stack.layers)
            and all(isinstance(m, Int4Linear) and m.native is not None and m.bias is None
                    for b in stack.layers for m in (b.get_submodule(n) for n in _WEIGHTS)))


class NativeStep:
    """One token of one sequence through the model in one call to `qstep.c` (see the module's
    doc), over the keys and values of row 0 of a cache buffer: a `KVCache`'s or a server's
    `SlotCache`'s, (n_layers, 2, rows, KV, length, hd) float32."""

    def __init__(self, model, buf: torch.Tensor):
        cfg, stack = model.cfg, model.backbone.decoder
        if buf.dtype != torch.float32 or not buf.is_contiguous() or buf.shape[0] != cfg.n_decoder_layers:
            raise ValueError(f"NativeStep: a contiguous float32 ({cfg.n_decoder_layers}, 2, rows, KV, length, hd) "
                             f"cache buffer, got {tuple(buf.shape)} {buf.dtype}")
        self.model, self.cfg, self.buf, self.length = model, cfg, buf, buf.shape[4]
        self.tokens = model.backbone.tokens.weight
        self.final = stack.norm.weight.detach().float().contiguous()
        self.norms = [(b.attn_norm.weight.detach().float().contiguous(), b.ff_norm.weight.detach().float().contiguous())
                      for b in stack.layers]  # held here: the table below points into them
        rows = []
        for i, (b, (g_attn, g_ff)) in enumerate(zip(stack.layers, self.norms)):
            w = [b.get_submodule(n).native for n in _WEIGHTS]
            keys, values = buf[i, 0, 0], buf[i, 1, 0]  # row 0's (KV, length, hd), contiguous views
            rows.append([g_attn.data_ptr(), *(t.data_ptr() for t in w[:4]), g_ff.data_ptr(),
                         *(t.data_ptr() for t in w[4:]), keys.data_ptr(), values.data_ptr()])
        self.table = torch.tensor(rows, dtype=torch.int64)
        cos, sin = stack.rope(torch.arange(self.length)[None])  # (1, 1, length, hd): every position's
        self.cos, self.sin = cos.reshape(self.length, -1).contiguous(), sin.reshape(self.length, -1).contiguous()
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else 1 / math.sqrt(cfg.head_dim)
        self.x, self.out = torch.empty(cfg.d_model), torch.empty(1, 1, cfg.d_model)

    def serves(self, buf: torch.Tensor) -> bool:
        """Whether `buf` is still the buffer the table points into."""
        return buf is self.buf

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        """Feed `token` at position `pos` (its keys and values written there; those before it
        attended to) → the next-token logits (1, V) in float32."""
        cfg = self.cfg
        if not 0 <= pos < self.length:
            raise ValueError(f"KV cache is full: {pos + 1} positions needed, {self.length} allocated")
        self.x.copy_(self.tokens[token])
        qkernel.decode_step(self.out, self.x, self.table, self.cos[pos], self.sin[pos], self.final,
                            cfg.n_decoder_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                            cfg.d_ff, pos, self.length, cfg.norm_eps, self.scale)
        return self.model.logits(self.out)[:, 0].float()
