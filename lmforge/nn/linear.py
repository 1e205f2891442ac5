"""Linear layers and the GEMM kernels behind them.

    fast_linear   y = x W^T + b: on CPU in float32 through oneDNN without gradients, and when
                  training where oneDNN measures faster (`onednn_trains`); in bfloat16 without
                  gradients where it measures faster (`onednn_fuses`); else F.linear
    fused_linear  act(x W^T + b) as one oneDNN product with the activation fused, without
                  gradients (float32; bfloat16 where it measures faster: `onednn_fuses`)
    Linear        nn.Linear (same parameters, same state dict) computed with fast_linear
    RowBlocks     the small weights of one generation laid out for products of a few rows
    TracedBlocks  the same products for a compiled step, laid out by torch.compile's freezing
    linear        module(x), through a generation's RowBlocks when they hold the module
    cast_once     x in autocast's dtype, for an input that several products share
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.nn.measure import bucket, median_ratio, probe


# Inference (no gradients) on CPU in float32 goes through oneDNN; off with LMFORGE_ONEDNN=0.
# Training goes through it only where it measures faster (`onednn_trains`): on a 2-core AVX2
# EPYC oneDNN's products were no faster than MKL's; on a 2-core Zen 4 EPYC (AVX-512) MKL's
# sgemm ran at 100-160 GFLOP/s on a GPT-2-like model's shapes and oneDNN's at 185-210 (forward
# and dx 1.07-1.4x as fast, in the median of alternating runs; dW, a reduction over the rows,
# as fast with MKL, which keeps it), and whole fp32 training steps 5-12% faster.
_ONEDNN = (os.environ.get("LMFORGE_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()
           and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
TRAIN_MARGIN = 1.05  # oneDNN takes a shape when its products measure this much faster
_TRAINS: dict[tuple, bool] = {}  # (d_in, d_out, rows rounded up to a power of 2[, dtype]) -> choice
FUSE_MARGIN = 1.0  # inference only: no run to resume, and the two paths differ by round-off alone
# activations oneDNN applies inside its product (post-ops): name -> (attr, algorithm)
POST_OPS = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", "")}


def _dnn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, act: str = "none",
         algorithm: str = "") -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, act, [], algorithm)


def _cpu_fp32(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def _cpu_bf16_inference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    return (_ONEDNN and x.device.type == "cpu" and x.dtype == w.dtype == torch.bfloat16 and x.dim() >= 2
            and x.numel() > 0 and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b))))


def fused_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, act: str, fn) -> torch.Tensor | None:
    """fn(x W^T + b), fn the activation named `act`, as one oneDNN product with the activation
    applied inside it (`POST_OPS`; the same values to round-off), or None where that does not
    apply: gradients, another activation, or neither float32 on CPU nor bfloat16 (a model cast
    to it) where `onednn_fuses` measures it faster."""
    if act not in POST_OPS or x.device.type != "cpu" or x.dim() < 2 or x.numel() == 0 \
            or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b))):
        return None
    if not _cpu_fp32(x, w):
        if not (_cpu_bf16_inference(x, w, b)
                and onednn_fuses(w.shape[1], w.shape[0], x.numel() // x.shape[-1], act, fn)):
            return None
    return _dnn(x, w, b, *POST_OPS[act])


def fast_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; through oneDNN on CPU in float32 without gradients, and with them where
    `onednn_trains` says so; in bfloat16 without gradients where `onednn_fuses` measures it faster."""
    if not _cpu_fp32(x, w):
        if _cpu_bf16_inference(x, w, b) and onednn_fuses(w.shape[1], w.shape[0], x.numel() // x.shape[-1]):
            return _dnn(x, w, b)
        return F.linear(x, w, b)  # autocast and torch.compile see the ordinary op
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        rows = x.numel() // max(x.shape[-1], 1)
        if x.dim() < 2 or rows == 0 or not onednn_trains(w.shape[1], w.shape[0], rows):
            return F.linear(x, w, b)
        return DnnLinear.apply(x, w, b)
    return _dnn(x, w, b)


def onednn_trains(d_in: int, d_out: int, rows: int, rounds: int = 7) -> bool:
    """Whether oneDNN's forward (x W^T) and input-gradient (dy W) products of this shape run at
    least `TRAIN_MARGIN` times as fast as MKL's here: the median ratio of `rounds` runs of the
    two, alternating, measured once per process and shape, with the rows rounded up to a
    power of two (at most 2,048 measured, fewer for a large layer). The margin keeps noise from flipping the choice
    between processes, so a resumed run takes the same path (the two libraries sum in
    different orders: the same values to round-off, not the same bits)."""
    key = (d_in, d_out, bucket(rows))
    if key not in _TRAINS:
        n = min(key[2], 2048)
        while n > 256 and n * d_in * d_out > 1 << 31:  # a large layer: fewer rows, a second or two at most
            n //= 2
        x, w, dy = probe(n, d_in), probe(d_out, d_in), probe(n, d_out)
        _TRAINS[key] = _median_ratio(lambda: (torch.mm(x, w.t()), torch.mm(dy, w)),
                                     lambda: (_dnn(x, w, None), _dnn(dy, w.t(), None)), rounds) >= TRAIN_MARGIN
    return _TRAINS[key]


def onednn_fuses(d_in: int, d_out: int, rows: int, act: str | None = None, fn=None, rounds: int = 7) -> bool:
    """Whether oneDNN's bfloat16 product of this shape (with the activation `act` fused in, if
    given) runs at least as fast as F.linear (and then fn) here (`FUSE_MARGIN`, measured as
    `onednn_trains` does); for inference, where the two give the same values to round-off. On
    a 2-core Zen 4 EPYC (AVX512-BF16), 384 -> 1536 with GELU: 1.1-1.3x; the plain products of
    all-MiniLM-L6-v2 over ~350 rows: 384 -> 384 1.1x, 384 -> 1536 1.07x (the same bits)."""
    key = (d_in, d_out, bucket(rows), torch.bfloat16, act)
    if key not in _TRAINS:
        n = min(key[2], 2048)
        x, w = probe(n, d_in, dtype=torch.bfloat16), probe(d_out, d_in, dtype=torch.bfloat16)
        post = POST_OPS[act] if act is not None else ("none", "")
        _TRAINS[key] = _median_ratio(lambda: F.linear(x, w) if fn is None else fn(F.linear(x, w)),
                                     lambda: _dnn(x, w, None, *post), rounds) >= FUSE_MARGIN
    return _TRAINS[key]


def _median_ratio(mkl, dnn, rounds: int) -> float:
    """`median_ratio` of the two without gradients."""
    with torch.no_grad():
        return median_ratio(mkl, dnn, rounds)


class DnnLinear(torch.autograd.Function):
    """x W^T + b with oneDNN's products forward and for dx (dy W, W read transposed in place);
    dW = dy^T x stays with MKL, which measured as fast or faster for that reduction over rows."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _dnn(x, w, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = _dnn(dy2, w.t(), None).view(x.shape) if ctx.needs_input_grad[0] else None
        dw = torch.mm(dy2.t(), x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) computed with `fast_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_linear(x, self.weight, self.bias)


# products of rows x W with rows * W.numel() up to this go through RowBlocks (0: never)
ROW_BLOCKS_MAX = int(os.environ.get("LMFORGE_ROW_BLOCKS", 1 << 21))


class RowBlocks:
    """Small weights laid out for GEMMs of a few rows (decoding: one token per sequence).

    oneDNN spends ~11 µs setting up each call, more than a 256x256 product of one row takes.
    Here the weight W (out, in) of a `Linear`, or several stacked ([W_q; W_k; W_v]: one
    product instead of three, copied once), is seen as P column blocks of W^T, (P, in,
    out/P), and y = x W^T + b runs as one batched MKL GEMM over the blocks (P = threads, a
    block each). Used for products of rows * W.numel() <= max_elements (default 2^21 elements,
    LMFORGE_ROW_BLOCKS), on CPU in float32 without gradients.

    One generation owns one RowBlocks (the decoding state makes it, the KV cache carries it
    to every layer): blocks are made on first use and live as long as the generation, so
    any change to a weight between generations (in place, `p.data = ...`, a new module,
    `load_state_dict`, an optimizer step) is seen by the next one. Values differ from
    oneDNN's in the last bits only (another summation order).
    """

    def __init__(self, max_elements: int = ROW_BLOCKS_MAX, parts: int | None = None):
        if parts is not None and (isinstance(parts, bool) or not isinstance(parts, int) or parts < 1):
            raise ValueError(f"parts must be an int >= 1, got {parts!r}")
        self.max_elements = max_elements
        self.parts = parts if parts is not None else torch.get_num_threads()
        self._blocks: dict[tuple[int, ...], tuple] = {}  # ids of the modules → (W blocks, b blocks, shape)

    def __len__(self) -> int:
        """How many weights (or stacks of weights) have been laid out."""
        return len(self._blocks)

    def __call__(self, x: torch.Tensor, *modules: nn.Module) -> torch.Tensor | None:
        """x [W_1; W_2; ...]^T + [b_1; b_2; ...] of plain `Linear` modules, or None when this is
        not for RowBlocks (another module such as LoRA's, another dtype or device, gradients,
        a product too large)."""
        if self.max_elements <= 0 or torch.is_grad_enabled() or any(type(m) is not Linear for m in modules) \
                or not _cpu_fp32(x, modules[0].weight):
            return None
        return self.linear(x, tuple(m.weight for m in modules), tuple(m.bias for m in modules),
                           key=tuple(map(id, modules)))

    def linear(self, x: torch.Tensor, ws: tuple[torch.Tensor, ...], bs: tuple[torch.Tensor | None, ...],
               key: tuple[int, ...] | None = None) -> torch.Tensor | None:
        """x [W_1; W_2; ...]^T + [b_1; b_2; ...], or None when the product is too large here.
        Blocks are found by `key` (default: the weights' ids): the weights must not change
        while these blocks are in use."""
        key = key if key is not None else tuple(map(id, ws))
        entry = self._blocks.get(key)
        if entry is None:
            entry = self._blocks[key] = self._make(ws, bs)
        wb, bb, shape = entry
        if wb is None or x.numel() * wb.numel() // shape[1] > self.max_elements:
            return None
        return block_product(x, wb, bb)

    def _make(self, ws, bs) -> tuple:
        """(blocks of [W...]^T or None, bias blocks or None, (P, in, out/P))."""
        out, inp = sum(w.shape[0] for w in ws), ws[0].shape[1]
        P = self.parts if out % self.parts == 0 else 1
        if out * inp > self.max_elements:  # too large even for one row: nothing, only the shape
            return None, None, (P, inp, out // P)
        return (*weight_blocks(ws, bs, self.parts), (P, inp, out // P))


def weight_blocks(ws, bs, parts: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[W_1; W_2; ...]^T as P = `parts` column blocks (P, in, out/P) (P = 1 when out is not a
    multiple), and the biases as (P, 1, out/P) or None. One weight: a view (no copy; MKL reads
    the transposed blocks as fast); stacked: one copy."""
    out, inp = sum(w.shape[0] for w in ws), ws[0].shape[1]
    P = parts if out % parts == 0 else 1
    w = torch.cat([w.detach() for w in ws]) if len(ws) > 1 else ws[0].detach().contiguous()
    wb = w.view(P, out // P, inp).transpose(1, 2)
    bb = None if bs[0] is None else torch.cat([b.detach() for b in bs]).view(P, 1, out // P)
    return wb, bb


def block_product(x: torch.Tensor, wb: torch.Tensor, bb: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b as one batched GEMM over the column blocks of `weight_blocks`: (..., in) → (..., out)."""
    P, inp, cols = wb.shape
    rows = x.numel() // inp
    x3 = x.reshape(1, rows, inp).expand(P, rows, inp)
    y = torch.bmm(x3, wb) if bb is None else torch.baddbmm(bb, x3, wb)  # (P, rows, out/P)
    y = y.view(rows, P * cols) if rows == 1 else y.transpose(0, 1).reshape(rows, P * cols)
    return y.view(*x.shape[:-1], P * cols)


class TracedBlocks:
    """RowBlocks' products for a compiled step (`lmforge.generate.compiled`): the same batched
    GEMMs over column blocks, written as plain tensor ops on the weights with nothing cached,
    so that torch.compile traces them and its freezing lays the blocks out once, as constants.
    For plain `Linear` modules in float32 on CPU; quantised layers of one kind that can stack
    (a `stacked` static method: q/k/v as one int8 or int4 product) go through it; anything
    else (LoRA) returns None."""

    stack_gate = True  # a gated FFN's gate and up as one product (frozen once; RowBlocks would copy them per generation)

    def __init__(self, parts: int | None = None):
        self.parts = parts if parts is not None else torch.get_num_threads()

    def __call__(self, x: torch.Tensor, *modules: nn.Module) -> torch.Tensor | None:
        kind = type(modules[0])
        if kind is not Linear:
            if len(modules) > 1 and hasattr(kind, "stacked") and all(type(m) is kind for m in modules):
                return kind.stacked(x, modules)
            return None
        if any(type(m) is not Linear for m in modules):
            return None
        w = modules[0].weight
        if w.dtype != torch.float32 or w.device.type != "cpu":
            return None
        return block_product(x, *weight_blocks([m.weight for m in modules], [m.bias for m in modules], self.parts))


def cast_once(x: torch.Tensor) -> torch.Tensor:
    """x cast to autocast's dtype where autocast is on and would cast it, else x itself. For an
    input that several products read (q, k and v; a gated FFN's gate and up): autocast casts
    the input of each product separately, and in the backward casts each product's input
    gradient back to float32 and sums those there. Cast once here, the forward is the same
    bits, and the gradients are summed in the low precision before their one cast back. On a
    GPT-2-like model under bf16 (2,048 x 384 activations) that is 4 casts fewer per layer."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev) or x.dtype != torch.float32 or torch.compiler.is_compiling():
        return x
    return x.to(torch.get_autocast_dtype(dev))


def linear(module: nn.Module, x: torch.Tensor, blocks: RowBlocks | None = None) -> torch.Tensor:
    """module(x), as one product of `blocks` when they apply (see RowBlocks.__call__)."""
    if blocks is not None:
        y = blocks(x, module)
        if y is not None:
            return y
    return module(x)
