"""lmforge's own CPU kernels for 4- and 8-bit weights (`qkernel.c`, built by pip as
`lmforge.models._qkernel`), and the wrappers of its two whole decoding steps (`decode_step`:
`qstep.c`, int4; `float_step`: `fstep.c`, float32; see lmforge.generate.native).

torch's int4 and int8 CPU kernels take bfloat16 activations, which a CPU without bfloat16
instructions (most AVX2 machines) converts in software: there they read weights at a fifth
to a third of the memory bandwidth. These kernels work as llama.cpp's do: the activations are
quantised per block of 32 inputs and multiplied with the weight codes in integer SIMD (AVX2
`madd`), with a float scale per block (see `qkernel.c`). The activations are rounded to int16,
not to int8 as in llama.cpp: on SmolLM2-135M int8 activations alone change the answer to
"What is the capital of France?" (llama.cpp's too), int16 keeps the float model's.

    4-bit  W = d q + m per block (`Int4Linear`'s (q - 8) s + z: d = s, m = z - 8 s)
    8-bit  W = d q per block (Q8_0; an int8 weight with one scale per row has one d per row)
    sum_i W[o, i] x[i]  ~  sum_b ( d[o, b] dx[b] sum_j q[o, j] qx[j]  (+ m[o, b] sx[b]) )

dx = max|x| / 32767 over the block, qx = round(x / dx), sx = dx sum qx: the result is exactly the
product of the weight with the rounded activations dx qx (with the exact sum of x instead,
their rounding error would meet the codes 0..15 rather than the centred weight: twice as large).

`matmul` runs the compiled kernel where it was built, else `reference`, the same sums in
PyTorch (slow; it defines the kernels' result for the tests). Whether a layer uses these
kernels or torch's is measured on the machine (`lmforge.models.int4.native_rows`), not assumed.
The packed weights are made at load time and never saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from lmforge.models import _qkernel  # imported after torch: it shares torch's OpenMP runtime
except ImportError:  # built without a C compiler: `available()` is False
    _qkernel = None

QK = 32  # inputs per block
QMAX = 32767  # activations: int16 codes per block
ROWS = 4  # output rows per packed group
BLOCK_BYTES = {4: ROWS * 16 + 2 * ROWS * 2, 8: ROWS * 32 + ROWS * 2}  # per group and block: codes, d (, m)


def available() -> bool:
    """Whether the compiled kernels are here (optional: pip builds them where a C compiler is)."""
    return _qkernel is not None


def bits_of(w: torch.Tensor) -> int:
    """4 or 8: the kind of packed weight w (its last dimension tells)."""
    for bits, size in BLOCK_BYTES.items():
        if w.dim() == 3 and w.shape[2] == size and w.dtype == torch.uint8:
            return bits
    raise ValueError(f"not a packed 4- or 8-bit weight: {tuple(w.shape)} {w.dtype}")


def _by_group(t: torch.Tensor, nb: int) -> torch.Tensor:
    """(out', nb, c) → (out'/4, nb, 4 · c): the 4 rows of a group side by side in each block."""
    return t.view(-1, ROWS, nb, t.shape[-1]).transpose(1, 2).reshape(-1, nb, ROWS * t.shape[-1])


def _pack(codes: torch.Tensor, scales: list[torch.Tensor], nb: int) -> torch.Tensor:
    """codes (out', nb, c) uint8 and per-block scales (out', nb) → (out'/4, nb, bytes), the
    scales in half precision (GGUF's own precision for them)."""
    floats = torch.cat([_by_group(s[..., None].half(), nb) for s in scales], -1).contiguous()
    return torch.cat([_by_group(codes, nb), floats.view(torch.uint8)], -1).contiguous()


def pack4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Int4 groups (codes q (out, in) in 0..15, W = (q - 8) scale + zero per group of
    `group_size`, a multiple of 32) → the kernel's weight, uint8 (ceil(out/4), in'/32, 80), in'
    = in padded to whole blocks. Padded rows and inputs get code 0 and d = m = 0."""
    if group_size % QK:
        raise ValueError(f"group_size={group_size}: lmforge's 4-bit kernel takes multiples of {QK}")
    out, inp = q.shape
    nb, pad_rows = -(-inp // QK), -out % ROWS
    d = scale.float().repeat_interleave(group_size // QK, 1)[:, :nb]  # (out, nb): one scale per block
    m = (zero.float() - 8 * scale.float()).repeat_interleave(group_size // QK, 1)[:, :nb]
    codes = F.pad(q.to(torch.uint8), (0, nb * QK - inp, 0, pad_rows)).view(-1, nb, 2, 16)
    nibbles = codes[:, :, 0] | (codes[:, :, 1] << 4)  # byte j = element j | element j + 16 << 4
    return _pack(nibbles, [F.pad(d, (0, 0, 0, pad_rows)), F.pad(m, (0, 0, 0, pad_rows))], nb)


def pack8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes q (out, in) with scales (out,) (one per row) or (out, ceil(in/32)) (one per
    block) → the kernel's weight, uint8 (ceil(out/4), in'/32, 136)."""
    out, inp = q.shape
    nb, pad_rows = -(-inp // QK), -out % ROWS
    d = scale.float()[:, None].expand(out, nb) if scale.dim() == 1 else scale.float()
    codes = F.pad(q.to(torch.int8), (0, nb * QK - inp, 0, pad_rows)).view(torch.uint8).view(-1, nb, QK)
    return _pack(codes, [F.pad(d, (0, 0, 0, pad_rows))], nb)


def unpack(w: torch.Tensor, out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A packed weight → codes (out, in') (uint8 0..15 or int8), d and m (out, nb) as float32
    (m: None for 8 bits)."""
    bits, (groups, nb, _) = bits_of(w), w.shape
    width = 16 if bits == 4 else QK
    raw = w[..., :ROWS * width].reshape(groups, nb, ROWS, width).transpose(1, 2).reshape(groups * ROWS, nb, width)
    if bits == 4:
        codes = torch.stack([raw & 15, raw >> 4], -2).reshape(groups * ROWS, nb * QK)
    else:
        codes = raw.contiguous().view(torch.int8).reshape(groups * ROWS, nb * QK)
    floats = w[..., ROWS * width:].contiguous().view(torch.float16).float().view(groups, nb, -1, ROWS)
    floats = floats.permute(2, 0, 3, 1)
    floats = floats.reshape(-1, groups * ROWS, nb)[:, :out]
    return codes[:out], floats[0], floats[1] if bits == 4 else None


def quantize_activations(x: torch.Tensor, nb: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (rows, in) float32 → qx (rows, nb, 32) int16 codes, dx and sx (rows, nb): the kernel's step."""
    xb = F.pad(x.float(), (0, nb * QK - x.shape[1])).view(x.shape[0], nb, QK)
    dx = xb.abs().amax(-1) / QMAX
    inv = torch.where(dx > 0, 1 / dx, torch.zeros_like(dx))
    qx = torch.round(xb * inv[..., None])
    return qx.to(torch.int16), dx, qx.sum(-1) * dx


def reference(x: torch.Tensor, w: torch.Tensor, out: int) -> torch.Tensor:
    """The kernel's sums in PyTorch: x (rows, in) float32 → (rows, out) float32."""
    codes, d, m = unpack(w, out)
    qx, dx, sx = quantize_activations(x, w.shape[1])
    dots = torch.einsum("onj,rnj->ron", codes.view(out, -1, QK).double(), qx.double())  # (rows, out, nb), exact
    y = (dots.float() * d * dx[:, None]).sum(-1)
    return y if m is None else y + sx @ m.T


def matmul(x: torch.Tensor, w: torch.Tensor, out: int, simd: bool = True) -> torch.Tensor:
    """x (rows, in) @ W^T → (rows, out) float32 for a packed W, by the compiled kernel (its
    AVX2 loop where the CPU has it and simd=True) or, without it, by `reference`."""
    if _qkernel is None:
        return reference(x, w, out)
    x = x.float().contiguous()
    bits = bits_of(w)
    if x.dim() != 2 or x.shape[1] > w.shape[1] * QK or w.shape[0] * ROWS < out or not w.is_contiguous():
        raise ValueError(f"qkernel matmul: x {tuple(x.shape)} and packed weight {tuple(w.shape)} "
                         f"do not fit {out} outputs")
    y = torch.empty(x.shape[0], out, dtype=torch.float32)
    _qkernel.matmul(y.data_ptr(), x.data_ptr(), w.data_ptr(), x.shape[0], out, x.shape[1], w.shape[1], bits, simd)
    return y


def dequantize(w: torch.Tensor, out: int, inp: int, simd: bool = True) -> torch.Tensor:
    """A packed weight → the float32 weight (out, inp) it holds (by the compiled kernel where
    it was built: its AVX2 loop where the CPU has it and simd=True)."""
    if _qkernel is None:
        codes, d, m = unpack(w, out)
        full = codes.view(out, -1, QK).float() * d[..., None]
        return (full if m is None else full + m[..., None]).view(out, -1)[:, :inp]
    y = torch.empty(out, inp, dtype=torch.float32)
    _qkernel.dequantize(y.data_ptr(), w.data_ptr(), out, inp, w.shape[1], bits_of(w), simd)
    return y


def decode_step(out: torch.Tensor, x: torch.Tensor, table: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                final_norm: torch.Tensor, n_layers: int, d: int, heads: int, kv: int, head_dim: int, d_ff: int,
                pos: int, max_len: int, eps: float, scale: float, simd: bool = True) -> None:
    """One decoding step of a Llama-family decoder in `qstep.c` (lmforge.generate.native's path):
    x (d) the token's embedding in, the last layer's output after; out (d) its final norm.
    table (n_layers, 11) int64: each layer's data pointers (see qstep.c), which the caller keeps
    alive; cos, sin (head_dim) the rotary row of position `pos`."""
    if _qkernel is None:
        raise RuntimeError("lmforge's native kernels were not built (no C compiler at install)")
    for name, t in (("out", out), ("x", x), ("cos", cos), ("sin", sin), ("final_norm", final_norm)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"decode_step: {name} must be a contiguous float32 CPU tensor")
    if table.dtype != torch.int64 or tuple(table.shape) != (n_layers, 11) or not table.is_contiguous():
        raise ValueError(f"decode_step: table must be ({n_layers}, 11) int64, got {tuple(table.shape)} {table.dtype}")
    if out.numel() != d or x.numel() != d or cos.numel() != head_dim or sin.numel() != head_dim:
        raise ValueError(f"decode_step: out, x ({d}) or cos, sin ({head_dim}) have other sizes")
    _qkernel.decode_step(out.data_ptr(), x.data_ptr(), table.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                         final_norm.data_ptr(), n_layers, d, heads, kv, head_dim, d_ff, pos, max_len, simd,
                         float(eps), float(scale))


def float_step(out: torch.Tensor, x: torch.Tensor, table: torch.Tensor, cross: int, cache: torch.Tensor, mask: int,
               positions: int, cos: int, sin: int, rel: int, mem_mask: int, final_w: int, final_b: int, head_w: int,
               head_b: int, n_layers: int, B: int, d: int, heads: int, kv: int, head_dim: int, d_ff: int, rows: int,
               length: int, pos: int, S: int, vocab: int, rel_n: int, rms: int, act: int, eps: float, scale: float,
               logit_scale: float, simd: bool = True, checked: bool = False, ids: int = 0, embed: int = 0,
               n_embed: int = 0, pos_table: int = 0, n_pos: int = 0, embed_scale: float = 1.0, argmax: int = 0) -> None:
    """One float32 decoding step of B rows in `fstep.c` (lmforge.generate.native's `FloatStep`):
    x (B, d) the rows' embeddings in, or with ids (B int64 tokens) a buffer the step fills with
    their rows of embed (n_embed, d) times embed_scale plus their rows of pos_table (n_pos, d),
    from position 0 (0: none); out (B, vocab) logits (head_w given) or (B, d) hidden states; argmax (B int64,
    with head_w) each row's largest logit's index. The tensors are checked here; the integers
    are data pointers (0: absent) the caller keeps alive, as fstep.c describes. checked=True:
    the caller made out and x itself and already checked this cache and table (the per-step
    call of `FloatStep`)."""
    if _qkernel is None:
        raise RuntimeError("lmforge's native kernels were not built (no C compiler at install)")
    if not checked:
        _check_float_step(out, x, table, cache, n_layers, B, d, kv, head_dim, length)
    _qkernel.float_step(out.data_ptr(), x.data_ptr(), table.data_ptr(), cross, cache.data_ptr(), mask, positions, cos,
                        sin, rel, mem_mask, final_w, final_b, head_w, head_b, ids, embed, pos_table, argmax, n_layers,
                        B, d, heads, kv, head_dim, d_ff, rows, length, pos, S, vocab, rel_n, rms, act, simd, n_embed,
                        n_pos, float(eps), float(scale), float(logit_scale), float(embed_scale))


def gather_rows(dst: torch.Tensor, src: torch.Tensor, index: torch.Tensor, used: int) -> None:
    """dst[:, :, r, :, :used] = src[:, :, index[r], :, :used] for KV cache buffers (layers, 2, rows,
    KV, length, hd) of float32 (beam search's reorder; `fstep.c`, the copies shared by the
    threads)."""
    if _qkernel is None:
        raise RuntimeError("lmforge's native kernels were not built (no C compiler at install)")
    if (dst.shape != src.shape or dst.dim() != 6 or dst.dtype != torch.float32 or src.dtype != torch.float32
            or not dst.is_contiguous() or not src.is_contiguous() or dst.device.type != "cpu"
            or src.device.type != "cpu" or dst.data_ptr() == src.data_ptr()):
        raise ValueError(f"gather_rows: two distinct contiguous float32 CPU buffers of one 6-d shape, got "
                         f"{tuple(dst.shape)} {dst.dtype} and {tuple(src.shape)} {src.dtype}")
    L2, rows, kv, length, hd = dst.shape[0] * dst.shape[1], *dst.shape[2:]
    if index.dtype != torch.int64 or not index.is_contiguous() or tuple(index.shape) != (rows,):
        raise ValueError(f"gather_rows: index must be ({rows},) contiguous int64, got {tuple(index.shape)} {index.dtype}")
    if not 0 <= used <= length:
        raise ValueError(f"gather_rows: used={used} positions of a cache of {length}")
    _qkernel.gather_rows(dst.data_ptr(), src.data_ptr(), index.data_ptr(), L2, rows, kv, length * hd, used * hd)


def _check_float_step(out, x, table, cache, n_layers, B, d, kv, head_dim, length) -> None:
    for name, t in (("out", out), ("x", x), ("cache", cache)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"float_step: {name} must be a contiguous float32 CPU tensor")
    if table.dtype != torch.int64 or tuple(table.shape) != (n_layers, 24) or not table.is_contiguous():
        raise ValueError(f"float_step: table must be ({n_layers}, 24) int64, got {tuple(table.shape)} {table.dtype}")
    if tuple(x.shape) != (B, d) or out.shape[0] != B or cache.dim() != 6 or tuple(cache.shape[:2]) != (n_layers, 2) \
            or cache.shape[2] < B or tuple(cache.shape[3:]) != (kv, length, head_dim):
        raise ValueError(f"float_step: x {tuple(x.shape)}, out {tuple(out.shape)} or the cache {tuple(cache.shape)} "
                         f"do not fit B={B}, d={d}, {n_layers} layers, kv={kv}, length={length}, head_dim={head_dim}")


def linear(x: torch.Tensor, w: torch.Tensor, in_features: int, out_features: int, bias: torch.Tensor | None,
           max_rows: int) -> torch.Tensor:
    """x (..., in) @ W^T + bias for a packed W, in x's dtype: the kernel for up to `max_rows`
    rows, else (a prompt) the float product of the unpacked weight."""
    if w.device.type != "cpu":
        raise ValueError(f"lmforge's 4- and 8-bit kernels run on CPU; this layer's packed weight is on {w.device}: "
                         "quantize the model on the device it runs on")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.shape[0] <= max_rows:
        y = torch.ops.lmforge.q_matmul(x2, w, out_features)
    else:
        y = F.linear(x2.float(), torch.ops.lmforge.q_dequantize(w, out_features, in_features))
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], out_features)


# The two as torch operators (a compiled graph calls each as one opaque kernel), declared with
# torch.library's plain registration: its `custom_op` wrapper costs ~20 us a call, as much as
# a small product.
_lib = torch.library.Library("lmforge", "DEF")
_lib.define("q_matmul(Tensor x, Tensor w, int out) -> Tensor")
_lib.define("q_dequantize(Tensor w, int out, int inp) -> Tensor")
_lib.impl("q_matmul", matmul, "CPU")
_lib.impl("q_dequantize", dequantize, "CPU")


@torch.library.register_fake("lmforge::q_matmul")
def _(x, w, out):
    return x.new_empty(x.shape[0], out, dtype=torch.float32)


@torch.library.register_fake("lmforge::q_dequantize")
def _(w, out, inp):
    return w.new_empty(out, inp, dtype=torch.float32)
