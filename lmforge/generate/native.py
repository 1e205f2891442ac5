"""A decoding step in one native call: `NativeStep` for one sequence through a Llama-family
decoder whose layers hold lmforge's 4-bit weights (`Int4Linear` with its `native` buffer), and
`FloatStep` for B rows through a float32 pre-norm decoder (GPT-2-, Llama- and T5-like; the
decoder of an encoder-decoder too).

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
turns it off (to measure the difference, or to rule it out), and the float step too.

The float step (`fstep.c`) is the same idea for float32 weights and any number of rows:
norms (LayerNorm or RMSNorm), q/k/v with their biases, rotary positions per row, the cache
write, attention with each row's padding mask and T5's relative position bias, cross-attention
over the encoder memory's keys and values (projected once, at the first step), the
feed-forward (plain or gated; ReLU, GELU, SiLU), the final norm and the LM head, all in one
call. Its products are tiled for few rows: at 1-8 rows BLAS libraries are at their weakest.
`DecoderState` uses it for float32 models on CPU where `float_fits` (pre-norm; no token types,
embedding norm or quantised layers) for batches of up to `FLOAT_ROWS_MAX` rows; beam search
included (the cache's rows are read where they are after each reorder).
"""

from __future__ import annotations

import math
import os

import torch

from lmforge.models import qkernel
from lmforge.models.heads import LMHead
from lmforge.models.int4 import Int4Linear
from lmforge.nn.attention import KVCache
from lmforge.nn.layers import RMSNorm

FLOAT_ROWS_MAX = int(os.environ.get("LMFORGE_FLOAT_STEP_ROWS", 32))  # rows beyond it: the batched BLAS step

_WEIGHTS = ("attn.q", "attn.k", "attn.v", "attn.o", "ff.gate", "ff.up", "ff.down")


def _enabled() -> bool:
    """The kernels were built and LMFORGE_NATIVE_STEP does not turn the native steps off."""
    return qkernel.available() and os.environ.get("LMFORGE_NATIVE_STEP", "1") != "0"


def _rope_rows(stack, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary cos, sin rows (length, head_dim) of every position 0..length-1."""
    cos, sin = stack.rope(torch.arange(length)[None])  # (1, 1, length, hd)
    return cos.reshape(length, -1).contiguous(), sin.reshape(length, -1).contiguous()


def native_fits(model) -> bool:
    """Whether `NativeStep` can run this model (for one unpadded row)."""
    cfg = model.cfg
    stack = model.backbone.decoder
    return (_enabled() and cfg.family == "decoder" and cfg.norm == "rmsnorm" and cfg.norm_placement == "pre"
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
        self.cos, self.sin = _rope_rows(stack, self.length)
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


# ---- float32, B rows ---------------------------------------------------------------------------
_ACT = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "geglu": 2, "silu": 3, "swiglu": 3}  # fstep.c's ACT_*
_FIELDS = ("attn_norm.weight", "attn_norm.bias", "attn.q.weight", "attn.q.bias", "attn.k.weight", "attn.k.bias",
           "attn.v.weight", "attn.v.bias", "attn.o.weight", "attn.o.bias", "cross_norm.weight", "cross_norm.bias",
           "cross.q.weight", "cross.q.bias", "cross.o.weight", "cross.o.bias", "ff_norm.weight", "ff_norm.bias",
           "ff.up.weight", "ff.up.bias", "ff.gate.weight", "ff.gate.bias", "ff.down.weight", "ff.down.bias")


def float_fits(model, rows: int) -> bool:
    """Whether `FloatStep` can run this model for a batch of `rows` rows."""
    cfg, stack = model.cfg, model.backbone.decoder
    if not (_enabled() and 1 <= rows <= FLOAT_ROWS_MAX and cfg.family in ("decoder", "encoder-decoder")
            and cfg.norm_placement == "pre" and cfg.activation in _ACT and not model.training
            and stack.types is None and stack.embed_norm is None and stack.norm is not None
            and not (cfg.position == "rope" and cfg.head_dim % 2)):
        return False
    tensors = [t for b in stack.layers for name in _FIELDS for t in [_get(b, name)] if t is not None]
    tensors += [model.backbone.tokens.weight, stack.norm.weight]
    norms = [m for b in stack.layers for m in (b.attn_norm, b.cross_norm, b.ff_norm) if m is not None]
    linears = [m for b in stack.layers for m in b.modules() if "Linear" in type(m).__name__]
    return (all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and all(type(m) in (RMSNorm, torch.nn.LayerNorm) for m in [*norms, stack.norm])
            and all(isinstance(m, torch.nn.Linear) for m in linears))


def _get(block, name: str):
    """block's tensor at a dotted name, or None where the module or the tensor is absent."""
    *path, attr = name.split(".")
    m = block
    for part in path:
        m = getattr(m, part, None)
        if m is None:
            return None
    return getattr(m, attr, None)


class FloatStep:
    """One token per row through a float32 model in one call to `fstep.c` (see the module's doc).
    Made per generation: it reads the weights' data where they are when it is made."""

    def __init__(self, model):
        cfg, stack = model.cfg, model.backbone.decoder
        self.model, self.cfg, self.stack = model, cfg, stack
        self.keep = []  # contiguous copies where a weight is not (the table points into them)
        self.table = torch.tensor([[self._ptr(_get(b, name)) for name in _FIELDS] for b in stack.layers],
                                  dtype=torch.int64)
        self.final = (self._ptr(stack.norm.weight), self._ptr(getattr(stack.norm, "bias", None)))
        head = model.lm_head
        self.head = None
        if type(head) is LMHead:  # a float head: its product in the same call
            w = model.backbone.tokens.weight if head.weight is None else head.weight
            self.head = (self._ptr(w), self._ptr(head.bias), float(head.scale))
        tokens = model.backbone.tokens.weight
        self.embed = (self._ptr(tokens), tokens.shape[0], float(stack.embed_scale))
        self.pos_table = (0, 0)  # (pointer to position 0's row, rows from there) of learned or sinusoidal positions
        if stack.positions is not None or hasattr(stack, "sinusoid"):
            table = stack.positions.weight if stack.positions is not None else stack.sinusoid
            offset = cfg.pos_offset if stack.positions is not None else 0
            rows = table.detach()[offset:].float().contiguous()
            self.keep.append(rows)
            self.pos_table = (rows.data_ptr(), rows.shape[0])
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else 1 / math.sqrt(cfg.head_dim)
        self.rms = int(cfg.norm == "rmsnorm")
        self.rope = None  # (cos, sin) of every position of the cache, made at the first step
        self.cross = None  # (the cache's cross k/v it was made from, their contiguous copies, the pointer table)
        self.checked = []  # the (cache buffer, batch size) pairs the kernel's argument checks passed for
        self.x = torch.empty(0)  # the step's (B, d) work buffer, kept between steps
        self.last = None  # (the logits of the last step, their argmax per row (B,)), with a float head

    def _ptr(self, t) -> int:
        if t is None:
            return 0
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()
            self.keep.append(t)
        return t.data_ptr()

    def _cross(self, cache: KVCache):
        """The pointer table of the encoder memory's keys and values (made anew when they change:
        the first step projects them, a beam search's first reorder repeats them per beam)."""
        if self.cross is None or any(a is not b for a, b in zip(self.cross[0], cache.cross)):
            copies = [(k.contiguous(), v.contiguous()) for k, v in cache.cross]
            table = torch.tensor([[k.data_ptr(), v.data_ptr()] for k, v in copies], dtype=torch.int64)
            self.cross = (list(cache.cross), copies, table)
        return self.cross

    def __call__(self, tokens: torch.Tensor, cache: KVCache, mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed tokens (B,) at the cache's next column (keys and values written there; each row
        attends to the columns its mask keeps, mask (B, cache length), None: all);
        positions (B, 1): each row's position (padded rows), None: the column. Returns the
        next-token logits (B, V) in float32. The caller advances the cache and positions."""
        cfg, stack, B, pos = self.cfg, self.stack, tokens.shape[0], cache.pos
        buf = cache.buf
        if pos >= cache.max_len:
            raise ValueError(f"KV cache is full: {pos + 1} positions needed, {cache.max_len} allocated")
        ids = tokens.reshape(-1)
        if ids.dtype != torch.int64 or not ids.is_contiguous():
            ids = ids.to(torch.int64).contiguous()
        if self.x.shape[0] != B:
            self.x = torch.empty(B, cfg.d_model)
        rows = None if positions is None else positions.reshape(-1).contiguous()
        cos = sin = 0
        if stack.rope is not None:
            if self.rope is None or self.rope[0].shape[0] < cache.max_len:
                self.rope = _rope_rows(stack, cache.max_len)
            cos, sin = self.rope[0].data_ptr(), self.rope[1].data_ptr()
        rel, rel_n = 0, 0
        if stack.rel_bias is not None:
            if cache.rel_bias is None:
                cache.rel_bias = stack.rel_bias.table(cache.max_len)
            rel, rel_n = cache.rel_bias.data_ptr(), (cache.rel_bias.shape[1] + 1) // 2
        cross, S = 0, 0
        if cfg.family == "encoder-decoder":
            _, copies, table = self._cross(cache)
            cross, S = table.data_ptr(), copies[0][0].shape[2]
        if mask is not None:
            mask = mask.to(torch.int64).contiguous()
        if memory_mask is not None:
            memory_mask = memory_mask.to(torch.int64).contiguous()
        out = torch.empty(B, cfg.vocab_size if self.head else cfg.d_model)
        top = torch.empty(B, dtype=torch.int64) if self.head else None
        head_w, head_b, logit_scale = self.head or (0, 0, 1.0)
        checked = any(b is buf and n == B for b, n in self.checked)  # once per buffer (beam search swaps two)
        qkernel.float_step(out, self.x, self.table, cross, buf, 0 if mask is None else mask.data_ptr(),
                           0 if rows is None else rows.data_ptr(), cos, sin, rel,
                           0 if memory_mask is None else memory_mask.data_ptr(), *self.final, head_w, head_b,
                           cfg.n_decoder_layers, B, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                           buf.shape[2], buf.shape[4], pos, S, cfg.vocab_size, rel_n, self.rms,
                           _ACT[cfg.activation], cfg.norm_eps, self.scale, logit_scale, checked=checked,
                           ids=ids.data_ptr(), embed=self.embed[0], n_embed=self.embed[1], pos_table=self.pos_table[0],
                           n_pos=self.pos_table[1], embed_scale=self.embed[2],
                           argmax=0 if top is None else top.data_ptr())
        if not checked:
            self.checked = [*self.checked[-1:], (buf, B)]
        if self.head is None:
            return self.model.logits(out[:, None])[:, 0].float()
        self.last = (out, top)
        return out

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """logits.argmax(-1), taken by the kernel when `logits` are the last step's own (B,)."""
        if self.last is not None and logits is self.last[0]:
            return self.last[1]
        return logits.argmax(-1)
