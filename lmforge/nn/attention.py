"""Multi-head attention (self or cross, MHA/GQA/MQA) and the KV cache.

    Q = X W^Q,  K = Y W^K,  V = Y W^V        (Y = X for self-attention, the encoder memory for cross)
    head_i = softmax(Q_i K_i^T / sqrt(d_k) + M) V_i
    MultiHead = Concat(head_1..head_h) W^O

computed by `F.scaled_dot_product_attention` (`attend`: for bfloat16 training and short
inference on CPU, the explicit products where they measure faster). M is one additive mask that folds the
causal mask, padding and (T5) relative position bias together. `QKV` holds the projections
q, k, v; while decoding (a KV cache that carries RowBlocks) it computes them as one product.
`Unpadded` runs the position-wise layers on a padded batch's real tokens only (and, for
sequences that see only their own tokens, attention on them too: `attend_rows`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmforge.config import ModelConfig
from lmforge.nn.attend import attend, attend_rows
from lmforge.nn.layers import apply_rotary
from lmforge.nn.linear import Linear, RowBlocks, TracedBlocks, cast_once, fast_linear, linear


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
                 blocks: RowBlocks | None = None, per_layer: bool = False):
        shape = (batch, n_kv_heads, max_len, head_dim)
        if per_layer:  # a tensor of its own for each layer's keys and values (what a compiled step writes in place)
            self.buf = None
            self.kv = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                       for _ in range(n_layers)]
        else:  # one buffer for every layer (one copy reorders them all); kv[layer] is a view of it
            self.buf = torch.zeros(n_layers, 2, *shape, dtype=dtype, device=device)
            self._kv = None  # made from buf when first asked for (a native step reads buf itself)
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.rel_bias: torch.Tensor | None = None
        self.pos = 0  # number of positions already written
        self.max_len = max_len
        self.blocks = blocks
        self._spare: torch.Tensor | None = None  # see reorder
        self.gather_rows = None  # reorder's copy, gather_rows(dst, src, index, pos), if not index_select

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu",
                  blocks: RowBlocks | None = None, per_layer: bool = False):
        return cls(cfg.n_decoder_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim, dtype, device, blocks,
                   per_layer)

    @property
    def kv(self) -> list:
        """Each layer's keys and values, (2, B, KV, max_len, hd) or a (keys, values) pair."""
        if self._kv is None:
            self._kv = list(self.buf)
        return self._kv

    @kv.setter
    def kv(self, value: list) -> None:
        self._kv = value

    @property
    def batch(self) -> int:
        return self.buf.shape[2] if self.buf is not None else self._kv[0][0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, KV, T, hd) of `layer` at [pos, pos+T); return its keys and values up to pos+T."""
        T = k.shape[-2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        keys, values = self.kv[layer]
        keys[:, :, self.pos:end] = k
        values[:, :, self.pos:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def reorder(self, index: torch.Tensor, cross: bool = True) -> None:
        """Select batch rows (beam search): row i becomes old row index[i].

        When the batch size stays, only the positions written so far are copied, into a
        second set of buffers that then swaps with the first: fresh full-size tensors every
        beam step cost more (allocation, page faults) than the decoding step itself.
        cross=False keeps the cross-attention k/v as they are (beams of one source share them).
        """
        if self.buf is None:  # per layer
            self.kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.kv]
        elif index.numel() == self.batch:
            if self._spare is None:
                self._spare = torch.empty_like(self.buf)
            if self.gather_rows is not None:
                self.gather_rows(self._spare, self.buf, index, self.pos)
            else:
                torch.index_select(self.buf[..., :self.pos, :], 2, index, out=self._spare[..., :self.pos, :])
            self.buf, self._spare = self._spare, self.buf
        else:  # the batch grows or shrinks: new buffers
            self.buf, self._spare = self.buf.index_select(2, index), None
        if self.buf is not None:
            self._kv = None
        if cross:
            self.cross = [None if c is None else (c[0].index_select(0, index), c[1].index_select(0, index))
                          for c in self.cross]


class StaticKV:
    """The view of a `KVCache` a compiled decoding step works on (`lmforge.generate.compiled`):
    every shape fixed, whatever the position, so one compiled graph serves every step.

    `kv` are the cache's keys and values, a (B, KV, max_len, hd) tensor of their own each
    (`KVCache(per_layer=True)`: written in place by the compiled graph, where views of one
    buffer would be copied whole). The step's token is written at column `at` (a (1,) long
    tensor) and attention sees all max_len columns, the caller masking those not written yet
    (`attention_mask`). The stack then takes its positions from `position_ids`, its relative
    bias at offset `at`, and leaves `pos` alone.
    """

    def __init__(self, kv: list, at: torch.Tensor, cross: list, rel_bias: torch.Tensor | None,
                 blocks: TracedBlocks | None = None):
        self.kv, self.at, self.cross, self.rel_bias, self.blocks = kv, at, cross, rel_bias, blocks
        self.max_len = kv[0][0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, KV, 1, hd) of `layer` at column `at`; return all its keys and values."""
        keys, values = self.kv[layer]
        keys.index_copy_(2, self.at, k)
        values.index_copy_(2, self.at, v)
        return keys, values


class SlotCache:
    """Keys/values of the sequences a server decodes together: one slot (batch row) each, every
    slot at its own length (continuous batching, `lmforge.serve.batch`).

    `buf` (n_layers, 2, slots, KV, length, hd) grows on demand (`reserve`). Attention reaches
    it through the same `update(layer, k, v)` as a `KVCache`, in one of two modes set before
    each forward pass:

        prefill(slot, n, start)  the next pass runs n prompts (right-padded) from position
                                 `start` into slots slot..slot+n-1 (`put` wrote what is before)
        step(positions)          the next pass feeds one token to each of slots 0..n-1, row i
                                 written at positions[i]; keys up to max(positions) come back,
                                 and the caller masks each row's keys beyond its own position

    In step mode `pos` is max(positions), the offset the stack's causal mask starts from.
    The running sequences keep slots 0..n-1 (`move` packs a slot into a freed one), so the
    keys of a step are a view of `buf`, never a gathered copy.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 blocks: RowBlocks | None = None):
        # zeros, not empty: keys beyond a row's length are masked, and must be finite to stay out
        self.buf = torch.zeros(n_layers, 2, 0, n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.kv = list(self.buf)
        self.max_len = max_len  # the model's context: no slot grows beyond it
        self.blocks = blocks
        self.cross: list = [None] * n_layers  # (decoder-only: never used)
        self.rel_bias: torch.Tensor | None = None
        self.pos = 0
        self._rows = slice(0, 0)
        self._at: torch.Tensor | None = None  # step mode: where each row's k/v go; None in prefill mode

    @classmethod
    def for_model(cls, cfg: ModelConfig, dtype=torch.float32, device="cpu", blocks: RowBlocks | None = None):
        return cls(cfg.n_decoder_layers, cfg.n_kv_heads, cfg.head_dim, cfg.max_len, dtype, device, blocks)

    @property
    def slots(self) -> int:
        return self.buf.shape[2]

    @property
    def length(self) -> int:
        return self.buf.shape[4]

    def reserve(self, slots: int, length: int) -> None:
        """Make room for `slots` slots of `length` positions (a size that grows at least
        doubles, up to max_len for the length; the other stays); what is cached stays."""
        if length > self.max_len:
            raise ValueError(f"a slot of {length} positions exceeds the model's context of {self.max_len}")
        if slots <= self.slots and length <= self.length:
            return
        new_slots = max(slots, min(2 * self.slots, slots + 8)) if slots > self.slots else self.slots
        new_len = min(self.max_len, max(length, 2 * self.length, 64)) if length > self.length else self.length
        L, _, S, KV, T, hd = self.buf.shape
        buf = torch.zeros(L, 2, new_slots, KV, new_len, hd, dtype=self.buf.dtype, device=self.buf.device)
        buf[:, :, :S, :, :T] = self.buf
        self.buf, self.kv = buf, list(buf)

    def prefill(self, slot: int, n: int = 1, start: int = 0) -> None:
        """The next forward pass writes n sequences from position `start` into slots
        slot..slot+n-1 (positions before `start` are there already: `put`)."""
        self._rows, self._at, self.pos = slice(slot, slot + n), None, start

    def put(self, slot: int, kv: torch.Tensor, length: int) -> None:
        """Write the first `length` positions of kv (n_layers, 2, KV, >= length, hd) into `slot`."""
        self.buf[:, :, slot, :, :length] = kv[:, :, :, :length]

    def take(self, slot: int, length: int) -> torch.Tensor:
        """A copy of the first `length` positions of `slot`: (n_layers, 2, KV, length, hd)."""
        return self.buf[:, :, slot, :, :length].clone()

    def step(self, positions: torch.Tensor, top: int) -> None:
        """The next forward pass writes one token per slot 0..n-1 at positions (n,); top is
        max(positions), known to the caller (no device sync here)."""
        n, KV, T = positions.shape[0], self.buf.shape[3], self.length
        heads = torch.arange(n * KV, device=positions.device).view(n, KV)  # row r, head h: r*KV + h
        # where row r, head h writes in a layer's keys seen as (slots*KV*T, hd): one index_copy_
        self._at = (heads * T + positions[:, None]).flatten()
        self._rows, self.pos = slice(0, n), top

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot src into slot dst (packing the slots)."""
        self.buf[:, :, dst, :, :length] = self.buf[:, :, src, :, :length]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (n, KV, T, hd) of `layer` (see the modes); return its keys and values
        (n, KV, pos+T, hd)."""
        kv, rows = self.kv[layer], self._rows
        if self._at is None:
            end = self.pos + k.shape[-2]
            kv[0, rows, :, self.pos:end] = k
            kv[1, rows, :, self.pos:end] = v
        else:  # one token per row, each at its own position
            end = self.pos + 1
            hd = k.shape[-1]
            kv[0].view(-1, hd).index_copy_(0, self._at, k.reshape(-1, hd))
            kv[1].view(-1, hd).index_copy_(0, self._at, v.reshape(-1, hd))
        return kv[0, rows, :, :end], kv[1, rows, :, :end]


class Unpadded:
    """The real tokens of a padded batch, packed into rows: the position-wise layers (linear
    maps, norms, the feed-forward block) run on those N rows only, attention on the padded
    (B, T) layout, `unpack`ed to it and `pack`ed back in each layer. Sentence embeddings
    sorted by length still pad some of their tokens (5% of 600 STS-B sentences in batches of
    32); this skips that work. `alone`: each token attends to exactly the real tokens of its own
    row (no causal mask, no position bias); then attention may run on the rows as they are
    (`attend_rows`: sequence b is rows starts[b]..starts[b+1])."""

    def __init__(self, attention_mask: torch.Tensor, alone: bool = False):
        self.shape = tuple(attention_mask.shape)  # (B, T)
        self.index = attention_mask.reshape(-1).nonzero().squeeze(1)  # rows of (B*T, ...) that are real
        self.alone = alone
        lengths = (attention_mask != 0).sum(1)
        self.starts = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.long).cpu()
        self.longest = int(lengths.max()) if lengths.numel() else 0

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) → (N, ...), the real tokens in order."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) → (B, T, ...), zeros at the padding."""
        out = x.new_zeros(self.shape[0] * self.shape[1], *x.shape[1:])
        return out.index_copy_(0, self.index, x).view(*self.shape, *x.shape[1:])


class QKV(nn.Module):
    """The query, key and value projections `q`, `k`, `v` (their state-dict names), computed
    as one stacked product [W_q; W_k; W_v] when a generation's RowBlocks hold them, or without
    gradients once `stack` has laid the three out as one tensor."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inner, self.kv_inner = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q = Linear(cfg.d_model, self.inner, bias=cfg.bias)
        self.k = Linear(cfg.d_model, self.kv_inner, bias=cfg.bias)
        self.v = Linear(cfg.d_model, self.kv_inner, bias=cfg.bias)
        self.stacked = None  # (W, b, the parameters' data pointers): see `stack`

    def stack(self) -> None:
        """Make q, k and v's weights (and biases) consecutive rows of one tensor W, the parameters
        views of it: their values and the state dict stay as they were, and without gradients
        `project` makes the three with one product x W^T. In bfloat16 on a 2-core Zen 4 EPYC
        (AVX512-BF16) one 384 -> 1152 product over ~350 rows ran 1.1-1.17x as fast as three 384 ->
        384 (in float32 no faster). Undone by anything that replaces a parameter (`.to()`)."""
        lins = (self.q, self.k, self.v)
        if not self._pointers() or len({(m.weight.dtype, m.weight.device) for m in lins}) != 1 \
                or len({m.bias is None for m in lins}) != 1:
            return
        with torch.no_grad():
            w = torch.cat([m.weight for m in lins])
            b = None if self.q.bias is None else torch.cat([m.bias for m in lins])
            sizes = (self.inner, self.kv_inner, self.kv_inner)
            for m, wi, bi in zip(lins, w.split(sizes), b.split(sizes) if b is not None else (None,) * 3):
                m.weight.data = wi
                if bi is not None:
                    m.bias.data = bi
        self.stacked = (w, b, self._pointers())

    def _pointers(self) -> tuple[int, ...]:
        lins = (self.q, self.k, self.v)  # a wrapper (LoRA) in their place: not the stacked layout
        if not all(isinstance(m, nn.Linear) for m in lins):
            return ()
        return tuple(t.data_ptr() for m in lins for t in (m.weight, m.bias) if t is not None)

    def project(self, x: torch.Tensor, memory: torch.Tensor | None = None, blocks: RowBlocks | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, d) → q (B, T, H*hd) and, from `memory` (B, S, d) or else x, k and v (B, S, KV*hd)."""
        if memory is None and blocks is not None:
            y = blocks(x, self.q, self.k, self.v)
            if y is not None:
                return y.split((self.inner, self.kv_inner, self.kv_inner), dim=-1)
        if memory is None and self.stacked is not None and self._pointers() == self.stacked[2] and not (
                torch.is_grad_enabled() and (x.requires_grad or self.q.weight.requires_grad)):
            return fast_linear(x, *self.stacked[:2]).split((self.inner, self.kv_inner, self.kv_inner), dim=-1)
        x = cast_once(x)  # under autocast: one cast for the three products, not one each
        src = x if memory is None else cast_once(memory)
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
                cache: KVCache | None = None, layer: int = 0, unpadded: Unpadded | None = None) -> torch.Tensor:
        """x (B, T, d); memory (B, S, d) for cross-attention; mask additive, broadcastable
        to (B, H, T, S_k). Returns (B, T, d). With `unpadded` (self-attention without a cache),
        x and the result are the (N, d) real tokens instead."""
        if unpadded is not None and (self.cross or cache is not None):
            raise ValueError("unpadded rows are for self-attention without a KV cache")
        if rope is not None and self.cross:
            raise ValueError("rotary positions do not apply to cross-attention")
        blocks = cache.blocks if cache is not None else None
        if self.cross and cache is not None and cache.cross[layer] is not None:
            q = self._heads(linear(self.q, x, blocks), self.n_heads)
            k, v = cache.cross[layer]  # encoder memory projected once
        else:
            q, k, v = self.project(x, memory if self.cross else None, blocks)
            if unpadded is not None and unpadded.alone and rope is None:
                y = attend_rows(q, k, v, unpadded.starts, unpadded.longest, self.n_heads, self.n_kv, self.scale)
                if y is not None:
                    return linear(self.o, y, blocks)
            if unpadded is not None:  # (N, ·) real tokens → the padded (B, T, ·) layout attention works on
                q, k, v = unpadded.unpack(q), unpadded.unpack(k), unpadded.unpack(v)
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
        y = attend(q, k, v, mask, is_causal, dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
                   gqa=self.n_kv != self.n_heads).transpose(1, 2)  # (B, T, H, hd)
        y = unpadded.pack(y).flatten(1) if unpadded is not None else y.reshape(*y.shape[:2], self.n_heads * self.hd)
        return linear(self.o, y, blocks)


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
