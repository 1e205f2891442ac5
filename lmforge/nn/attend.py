"""Scaled dot-product attention: torch's fused kernel, or the explicit products where they
measure faster (bfloat16 training; inference over short sequences).

    attend       softmax(q k^T · scale + mask) v, as F.scaled_dot_product_attention
    attend_rows  the same over packed rows (each sequence's real tokens), without gradients
    KernelAttention  attention for training by C kernels where they pay (float32, bfloat16)

On CPU, SDPA's flash kernel runs its backward in bfloat16 at a fraction of the matrix
instructions' speed for short sequences: on a 2-core Zen 4 EPYC (AVX512-BF16), batch 16 × 6
heads × 128 tokens × 64, forward + backward took 22–23 ms against 6.5–8 ms for the explicit
products below; with a causal mask, 8 × 6 × 256, 22–25 ms against 11–14 ms. Whether that
holds depends on the CPU (without AVX512-BF16, bfloat16 products are slow). So the choice is
measured here, once per process and shape (`best_time`), and the explicit products are taken
only when they are at least `MARGIN` times as fast: a margin that noise does not cross, so a
training run resumed in a new process on the same machine takes the same path (and gives the
same weights, bit for bit); lengths are measured by power-of-two `bucket`. Only where a gradient is wanted, for bfloat16 on CPU without
GQA and with at most `MAX_SCORES` scores (the explicit path keeps the (B, H, T, S) scores and
probabilities for its backward, in bfloat16).

Inference over short sequences (sentence embeddings: 32 sentences of 7–22 tokens) is the
other case. There SDPA's kernel spends its time on per-block overhead, not arithmetic: the 6
layers of all-MiniLM-L6-v2 over 600 STS-B sentences took 150–190 ms of attention in float32
against 35–40 ms for `_keys_major`'s products, 100 ms against 50 in bfloat16. Without
gradients, for float32 and bfloat16 on CPU, with more than one query and no causal flag (a
mask may hold anything), that path is measured against SDPA the same way (`INFER_MARGIN`).

Inference over packed rows (`lmforge.nn.attention.Unpadded`, sequences that see all of their own
tokens and nothing else) can skip the padded layout altogether: `attend_rows` runs lmforge's C
kernel (lmforge/models/rowattn.c) on the rows as they are, where it is built and measures at least
as fast as `attend` on the padded layout without the copies to and from it (`rows_pay`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.models import qkernel  # the optional C kernels (setup.py): attention over packed rows
from lmforge.nn.measure import best_time, bucket, median_ratio, probe

MARGIN = 1.5
REPEATS = 8  # timed runs of each path: fresh (B, H, T, S) buffers make the first few slow
INFER_MARGIN = 1.2  # inference keeps no state between processes: a smaller margin will do
MAX_SCORES = 1 << 23  # B·H·T·S: 32 MB of float32 scores
_EXPLICIT: dict[tuple, bool] = {}  # shapes, mask, causal, inference -> whether the explicit products pay
ROWS_PROBE = 8192  # rows_pay measures at most this many packed rows (sequences x longest)
_ROWS: dict[tuple, bool] = {}  # sequences, length, heads, kv heads, head size, dtype (bucketed) -> rows_pay
_KERNEL: dict[tuple, bool] = {}  # shapes (lengths bucketed), dtype, mask, causal -> kernel_pays
KERNEL_MIN_SCORES = 1 << 18  # B·H·T·S below which kernel_pays keeps torch's path without measuring
# lmforge/models/attend32.c: AVX2 and FMA, float32; attend16.c: AVX512-BF16, bfloat16
_ATTEND_C = qkernel.available() and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
_ATTEND_BF16 = (_ATTEND_C and torch.backends.cpu.get_cpu_capability() == "AVX512"
                and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           is_causal: bool = False, dropout_p: float = 0.0, scale: float | None = None,
           gqa: bool = False) -> torch.Tensor:
    """q (B, H, T, hd), k and v (B, KV, S, hd), mask additive and broadcastable to (B, H, T, S)
    (or None), is_causal applying when there is no mask. Returns (B, H, T, hd)."""
    causal = is_causal and mask is None
    if _may_use_kernel(q, k, v, mask, causal, dropout_p, gqa) and kernel_pays(q, k, mask, causal):
        return KernelAttention.apply(q, k, v, mask, causal, q.shape[-1] ** -0.5 if scale is None else scale)
    return _attend_torch(q, k, v, mask, is_causal, dropout_p, scale, gqa)


def _attend_torch(q, k, v, mask, is_causal, dropout_p, scale, gqa):
    """`attend` without lmforge's C kernels: torch's products or SDPA."""
    if _may_be_explicit(q, k, gqa) and _explicit_pays(q, k, v, mask, is_causal and mask is None):
        return _explicit(q, k, v, mask, is_causal and mask is None, dropout_p, scale)
    if _may_infer(q, k, gqa, is_causal and mask is None) and _explicit_pays(q, k, v, mask, False, infer=True):
        return _keys_major(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                          dropout_p=dropout_p, scale=scale, enable_gqa=gqa)


def _may_be_explicit(q, k, gqa) -> bool:
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and not gqa and torch.is_grad_enabled()
            and q.requires_grad and not torch.compiler.is_compiling()
            and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= MAX_SCORES)


def _may_infer(q, k, gqa, causal) -> bool:
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and not gqa and not causal
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))
            and q.shape[2] > 1 and not torch.compiler.is_compiling()
            and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= MAX_SCORES)


def _keys_major(q, k, v, mask, scale):
    """softmax(q k^T · scale + mask) v without gradients, the scores laid out (B, H, S, T): keys
    along rows, so that softmax runs down the columns, which torch vectorises across the
    queries; along rows of a few keys it measured 2-3x slower (float32, 10 keys). The scores
    are float32 from the product on: bfloat16's broadcast add and softmax ran slower than the
    casts to float32 and back."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = q * scale if scale != 1.0 else q
    s = torch.matmul(k, q.transpose(-1, -2)).float()  # (B, H, S, T)
    if mask is not None:
        s.add_(mask.float().transpose(-1, -2))
    return torch.matmul(s.softmax(-2).to(v.dtype).transpose(-1, -2), v)


def _explicit(q, k, v, mask, causal, dropout_p, scale):
    """The scale goes on q (T·hd products, not T·S); the scores, mask and probabilities stay in
    q's dtype, bf16 softmax computing in float32 inside and rounding once. Every elementwise
    pass over the (B, H, T, S) scores costs about as much as a product here, so masks are added
    (an addition's backward passes the gradient through untouched). Causal: the first half of
    the queries takes only the first half of the keys, which skips a quarter of the work (more
    pieces measured slower)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = q * scale if scale != 1.0 else q  # (T5 does not scale)
    if not causal:
        s = torch.matmul(q, k.transpose(-1, -2))
        return _probs_times(s if mask is None else s.add_(mask.to(s.dtype)), v, dropout_p)
    T, S = q.shape[-2], k.shape[-2]
    above = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1)  # top-left, as SDPA's is_causal
    bias = torch.zeros(T, S, dtype=q.dtype, device=q.device).masked_fill_(above, float("-inf"))
    cuts = (0, T // 2, T) if T >= 64 else (0, T)
    parts = []
    for a, b in zip(cuts, cuts[1:]):
        keys = min(b, S)  # query i sees keys 0..i
        s = torch.matmul(q[..., a:b, :], k[..., :keys, :].transpose(-1, -2))
        parts.append(_probs_times(s.add_(bias[a:b, :keys]), v[..., :keys, :], dropout_p))
    return torch.cat(parts, -2) if len(parts) > 1 else parts[0]


def _probs_times(s, v, dropout_p):
    p = s.softmax(-1)
    if dropout_p:
        p = F.dropout(p, dropout_p)
    return torch.matmul(p, v)


def _explicit_pays(q, k, v, mask, causal, infer: bool = False) -> bool:
    """Measured on the shapes with T and S rounded up to a power of two, so batches padded to
    their longest sequence (fine-tuning, embedding) cost a measurement per length bucket, not
    per length. `infer`: `_keys_major` against SDPA's forward, without gradients."""
    (B, H, T, D), (KV, S) = q.shape, k.shape[1:3]
    T, S = bucket(T), bucket(S)
    m_shape = None if mask is None else tuple(1 if d == 1 else full for d, full in zip(mask.shape, (B, H, T, S)))
    key = (B, H, KV, T, S, D, v.shape[-1], q.dtype, m_shape, None if mask is None else mask.dtype, causal, infer)
    if key in _EXPLICIT:
        return _EXPLICIT[key]
    qs, ks, vs = probe(B, H, T, D, dtype=q.dtype), probe(B, KV, S, D, dtype=k.dtype), \
        probe(B, KV, S, v.shape[-1], dtype=v.dtype)
    m = None if mask is None else torch.zeros(m_shape, dtype=mask.dtype)
    if infer:
        with torch.inference_mode():
            fused = best_time(lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=m), REPEATS)
            _EXPLICIT[key] = best_time(lambda: _keys_major(qs, ks, vs, m, None), REPEATS) * INFER_MARGIN <= fused
        return _EXPLICIT[key]
    with torch.enable_grad():
        for t in (qs, ks, vs):
            t.requires_grad_()
        grad = probe(B, H, T, v.shape[-1], dtype=v.dtype)

        def run(explicit: bool):
            y = _explicit(qs, ks, vs, m, causal, 0.0, None) if explicit else \
                F.scaled_dot_product_attention(qs, ks, vs, attn_mask=m, is_causal=causal)
            y.backward(grad)
        fused = best_time(lambda: run(False), REPEATS)
        _EXPLICIT[key] = best_time(lambda: run(True), REPEATS) * MARGIN <= fused
    return _EXPLICIT[key]


def attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, longest: int,
                n_heads: int, n_kv: int, scale: float | None = None) -> torch.Tensor | None:
    """Self-attention over packed rows without gradients: sequence b is rows starts[b]..starts[b+1]
    (int64; `longest` the most rows of one) of q (N, n_heads·hd), k and v (N, n_kv·hd), and each
    of its rows attends to exactly those rows (no causal mask, no bias). Returns out (N,
    n_heads·hd), or None where the C kernel does not apply or `rows_pay` measures it slower: then
    the caller takes the padded path."""
    hd = q.shape[-1] // n_heads
    if not (qkernel.available() and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
            and q.dtype == k.dtype == v.dtype and q.dim() == k.dim() == v.dim() == 2 and starts.numel() > 1
            and all(t.stride(-1) == 1 for t in (q, k, v)) and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))):
        return None
    if not rows_pay(starts.numel() - 1, longest, n_heads, n_kv, hd, q.dtype):
        return None
    return _rows_kernel(q, k, v, starts, n_heads, n_kv, hd, hd ** -0.5 if scale is None else scale)


def _rows_kernel(q, k, v, starts, n_heads, n_kv, hd, scale) -> torch.Tensor:
    out = torch.empty(q.shape[0], n_heads * hd, dtype=q.dtype)
    qkernel._qkernel.attend_rows(out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), starts.data_ptr(),
                                 starts.numel() - 1, n_heads, n_kv, hd, q.stride(0), k.stride(0), v.stride(0),
                                 out.stride(0), int(q.dtype == torch.bfloat16), float(scale))
    return out


def rows_pay(sequences: int, longest: int, n_heads: int, n_kv: int, hd: int, dtype: torch.dtype) -> bool:
    """Whether `attend_rows`'s kernel runs at least as fast here as `attend` on the padded layout
    (B, H, T, hd) with a key-padding mask, for `sequences` of `longest` tokens (both rounded up to a
    power of two), measured once per process and shape. The padded path's copies into and out of
    that layout are not counted: the kernel must win on the attention alone. Both take time in
    proportion to the sequences, so at most `ROWS_PROBE` rows are measured."""
    T = bucket(longest)
    B = min(bucket(sequences), max(1, ROWS_PROBE // T))
    key = (B, T, n_heads, n_kv, hd, dtype)
    if key not in _ROWS:
        q, kv = probe(B * T, n_heads * hd, dtype=dtype), probe(B * T, 2 * n_kv * hd, dtype=dtype)
        k, v = kv[:, :n_kv * hd], kv[:, n_kv * hd:]
        starts = torch.arange(0, B * T + 1, T)
        qp, kp, vp = (t.view(B, T, -1, hd).transpose(1, 2) for t in (q, k, v))
        mask = torch.zeros(B, 1, 1, T, dtype=dtype)
        with torch.inference_mode():
            padded = best_time(lambda: attend(qp, kp, vp, mask, gqa=n_kv != n_heads), REPEATS)
            _ROWS[key] = best_time(lambda: _rows_kernel(q, k, v, starts, n_heads, n_kv, hd, hd ** -0.5),
                                   REPEATS) <= padded
    return _ROWS[key]


def _may_use_kernel(q, k, v, mask, causal, dropout_p, gqa) -> bool:
    """Whether lmforge's C kernels can take this attention: training (a gradient wanted) on CPU,
    without dropout or GQA, with or without an additive float mask or a causal flag; float32
    (attend32.c, hd a multiple of 16) or bfloat16 (attend16.c, hd a multiple of 32)."""
    (B, H, T, hd), full = q.shape, (*q.shape[:3], k.shape[2])
    if q.dtype == torch.float32:
        fits = _ATTEND_C and hd % 16 == 0
    else:
        fits = _ATTEND_BF16 and q.dtype == torch.bfloat16 and hd % 32 == 0
    return (fits and (mask is None or (mask.dtype in (torch.float32, torch.bfloat16) and mask.dim() <= 4
                                       and torch.broadcast_shapes(mask.shape, full) == full))
            and not (causal and k.shape[2] != T)
            and not dropout_p and not gqa and q.device.type == "cpu" and q.dtype == k.dtype == v.dtype
            and k.shape == v.shape and k.shape[:2] == (B, H) and k.shape[3] == hd and T > 1
            and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            and not torch.compiler.is_compiling())


def _four(shape) -> tuple:
    """A mask's shape with leading 1s up to four dimensions, as it broadcasts against (B, H, T, S)."""
    return (1,) * (4 - len(shape)) + tuple(shape)


def _unit(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride along its last dimension, as the kernels read rows, and for bfloat16 even
    strides besides (attend16.c's pairs); copied if not."""
    even = t.dtype != torch.bfloat16 or all(s % 2 == 0 for s in t.stride()[:-1])
    return t if t.stride(-1) == 1 and even else t.contiguous()


class KernelAttention(torch.autograd.Function):
    """Attention for training by lmforge's C kernels, FlashAttention's recomputation per (batch,
    head) with one head's keys whole in cache, with a causal flag or an additive mask, its gradient
    included (T5's relative position bias is a mask that learns): float32 in AVX2
    (lmforge/models/attend32.c), bfloat16 on AVX512-BF16's pair products (attend16.c, float32
    inside). The output and gradients come in a (B, T, H, hd) layout, so the caller's transposes
    need no copy. On a 2-core Zen 4 EPYC, 8 x 6 heads x 256 x 64 causal (a GPT-2-like layer),
    forward and backward: float32 10.3-12.1 ms against SDPA's 21.2-24.0; bfloat16 7.6-8.9 ms
    against 16-22 for `_explicit`'s products and 33-41 for SDPA. Taken where `kernel_pays`."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale):
        q, k, v = _unit(q), _unit(k), _unit(v)
        if k.stride() != v.stride():
            k, v = k.contiguous(), v.contiguous()
        (B, H, T, hd), S = q.shape, k.shape[2]
        o, lse = q.new_empty(B, T, H, hd).transpose(1, 2), q.new_empty(B, H, T, dtype=torch.float32)
        m = None if mask is None else mask.reshape(_four(mask.shape)).expand(B, H, T, S)
        if m is not None and m.stride(-1) != 1:
            m = m.contiguous()
        ctx.sizes = (B, H, T, S, hd, *q.stride()[:3], *k.stride()[:3], *o.stride()[:3],
                     *((0, 0, 0, 0) if m is None else (*m.stride()[:3], int(m.dtype == torch.bfloat16))), int(causal))
        kernels = qkernel._qkernel
        ctx.kernel = ((kernels.attend16_forward, kernels.attend16_backward) if q.dtype == torch.bfloat16
                      else (kernels.attend32_forward, kernels.attend32_backward))
        ctx.kernel[0](o.data_ptr(), lse.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                      0 if m is None else m.data_ptr(), *ctx.sizes, float(scale))
        ctx.save_for_backward(q, k, v, o, lse, m)
        ctx.scale = scale
        ctx.mask_shape = None if mask is None else mask.shape
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, m = ctx.saved_tensors
        (B, H, T, hd), S = q.shape, k.shape[2]
        if do.stride() != o.stride():
            do = do.transpose(1, 2).contiguous().transpose(1, 2)
        dq = q.new_empty(B, T, H, hd).transpose(1, 2)
        dk, dv = (q.new_empty(B, S, H, hd).transpose(1, 2) for _ in range(2))
        dmask = torch.empty(B, H, T, S) if ctx.needs_input_grad[3] else None
        ctx.kernel[1](dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), 0 if dmask is None else dmask.data_ptr(),
                      q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), do.data_ptr(), lse.data_ptr(),
                      0 if m is None else m.data_ptr(), *ctx.sizes, *dk.stride()[:3], float(ctx.scale))
        if dmask is not None:  # summed over the dimensions the mask broadcast along
            dims = [d for d, n in enumerate(_four(ctx.mask_shape)) if n == 1]
            dmask = (dmask.sum(dims, keepdim=True) if dims else dmask).reshape(ctx.mask_shape).to(m.dtype)
        return dq, dk, dv, dmask, None, None


def kernel_pays(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> bool:
    """Whether `KernelAttention`'s forward and backward run at least `MARGIN` times as fast as
    `attend`'s torch path here (SDPA; in bfloat16 `_explicit`'s products where they pay): the median
    ratio of rounds timing the two in turn (`median_ratio`), measured once per process, dtype, mask
    layout and shape (lengths rounded up to powers of two), on inputs laid out as a layer's
    projections make them. The margin keeps noise from flipping the choice between processes, so
    that a resumed run (or another rank) takes the same path (the two sum in different orders);
    under `KERNEL_MIN_SCORES` scores, where a step takes tens of microseconds and the kernel gains
    little, it is not measured and torch's path stays."""
    (B, H, T, hd), S = q.shape, k.shape[2]
    T, S = bucket(T), bucket(S)
    m_shape = None if mask is None else tuple(1 if d == 1 else n for d, n in zip(_four(mask.shape), (B, H, T, S)))
    m_grad = mask is not None and mask.requires_grad
    key = (B, H, T, S, hd, q.dtype, m_shape, None if mask is None else mask.dtype, m_grad, causal)
    if key not in _KERNEL:
        if B * H * T * S < KERNEL_MIN_SCORES:
            _KERNEL[key] = False
            return False
        # laid out as an attention layer's projections make them: (B, T, H, hd) viewed as (B, H, T, hd)
        leaves = [probe(B, n, H, hd, dtype=q.dtype).requires_grad_() for n in (T, S, S)]
        qs, ks, vs = (t.transpose(1, 2) for t in leaves)
        ms = None if mask is None else torch.zeros(m_shape, dtype=mask.dtype).requires_grad_(m_grad)
        grad = probe(B, T, H, hd, dtype=q.dtype).transpose(1, 2)
        with torch.enable_grad():
            ratio = median_ratio(lambda: _attend_torch(qs, ks, vs, ms, causal, 0.0, None, False).backward(grad),
                                 lambda: KernelAttention.apply(qs, ks, vs, ms, causal, hd ** -0.5).backward(grad),
                                 REPEATS)
        _KERNEL[key] = ratio >= MARGIN
    return _KERNEL[key]
