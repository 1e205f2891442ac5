"""`attend`: SDPA, or the explicit products where they measure faster (bfloat16 training on CPU;
inference without a causal flag)."""

import pytest
import torch
import torch.nn.functional as F

import lmforge.nn.attend as at


def _qkv(B=2, H=3, T=10, S=10, D=8, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, n, D, generator=g).to(dtype).requires_grad_() for n in (T, S, S)]


@pytest.mark.parametrize("kind,T,S", [("mask", 10, 10), ("causal", 10, 10), ("none", 10, 10),
                                      ("causal", 70, 70), ("causal", 70, 90), ("causal", 90, 70)])
def test_explicit_products_equal_sdpa(kind, T, S):
    """Forward and gradients against F.scaled_dot_product_attention computed in float32 from the same
    bfloat16 inputs: within bfloat16 rounding (the scores and outputs are rounded to bfloat16).
    From 64 queries on, the causal products come in two halves of the queries."""
    q, k, v = _qkv(T=T, S=S)
    mask = None
    if kind == "mask":  # padding of the last 3 keys of the second sequence
        mask = torch.zeros(2, 1, 1, 10)
        mask[1, ..., 7:] = torch.finfo(torch.float32).min
    causal = kind == "causal"
    grad = torch.randn(2, 3, T, 8)
    y = at._explicit(q, k, v, mask, causal, 0.0, 0.3)
    y.float().backward(grad)
    got = [y.float()] + [t.grad.float() for t in (q, k, v)]
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask, is_causal=causal, scale=0.3)
    want.backward(grad)
    for a, e in zip(got, [want, q32.grad, k32.grad, v32.grad]):
        assert ((a - e).abs().max() / e.abs().max()).item() < 3e-2


def test_the_path_follows_a_measurement_made_once_per_shape(monkeypatch):
    calls = []
    monkeypatch.setattr(at, "_EXPLICIT", {})
    monkeypatch.setattr(at, "best_time", lambda fn, repeats: calls.append(1) or (1.0 if len(calls) == 1 else 0.5))
    q, k, v = _qkv()
    used = []
    real = at._explicit
    monkeypatch.setattr(at, "_explicit", lambda *a: used.append(1) or real(*a))
    for _ in range(3):
        at.attend(q, k, v, is_causal=True)
    assert len(calls) == 2 and len(used) == 3  # measured once (SDPA 1.0 s, explicit 0.5 s: 2x, past 1.5x)
    at.attend(q, k, v, is_causal=True)
    assert len(calls) == 2
    at._EXPLICIT.clear()
    calls.clear()
    monkeypatch.setattr(at, "best_time", lambda fn, repeats: calls.append(1) or (1.0 if len(calls) == 1 else 0.8))
    used.clear()
    at.attend(q, k, v, is_causal=True)
    assert used == []  # 1.25x is within the margin: SDPA


def test_float32_training_gqa_and_causal_inference_stay_on_sdpa(monkeypatch):
    monkeypatch.setattr(at, "_explicit_pays", lambda *a, **k: pytest.fail("measured where SDPA is the only path"))
    q, k, v = _qkv(dtype=torch.float32)
    at.attend(q, k, v)  # float32 with a gradient
    q, k, v = _qkv()
    at.attend(q, k[:, :1], v[:, :1], gqa=True)
    with torch.no_grad():
        at.attend(q, k, v, is_causal=True)
        at.attend(q[:, :, :1], k, v)  # one query (a decoding step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["none", "padding", "bias"])
def test_keys_major_products_equal_sdpa(dtype, kind):
    """Inference's explicit products against SDPA in float64 from the same inputs: float32 to
    round-off, bfloat16 within its rounding; padding masks (B, 1, 1, S) and T5's bias (1, H, T, S)."""
    q, k, v = (t.detach() for t in _qkv(T=7, S=9, dtype=dtype))
    mask = None
    if kind == "padding":
        mask = torch.zeros(2, 1, 1, 9, dtype=dtype)
        mask[1, ..., 6:] = torch.finfo(dtype).min
    elif kind == "bias":
        mask = torch.randn(1, 3, 7, 9, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        got = at._keys_major(q, k, v, mask, None).double()
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                          attn_mask=None if mask is None else mask.double())
    assert got.dtype == torch.float64 and (got - want).abs().max().item() < (1e-5 if dtype == torch.float32 else 3e-2)


def test_inference_takes_the_explicit_products_where_measured_faster(monkeypatch):
    times = iter([1.0, 0.5, 1.0, 0.9])  # SDPA, explicit: 2x (past 1.2x), then 1.1x (within)
    monkeypatch.setattr(at, "_EXPLICIT", {})
    monkeypatch.setattr(at, "best_time", lambda fn, repeats: next(times))
    used = []
    real = at._keys_major
    monkeypatch.setattr(at, "_keys_major", lambda *a: used.append(1) or real(*a))
    q, k, v = (t.detach() for t in _qkv(dtype=torch.float32))
    with torch.inference_mode():
        for _ in range(2):
            at.attend(q, k, v)
        assert len(used) == 2  # measured once
        at.attend(q, k[:, :, :5], v[:, :, :5])  # another bucket of keys: measured again, SDPA
        assert len(used) == 2


def test_lengths_in_one_power_of_two_bucket_share_a_measurement(monkeypatch):
    calls = []
    monkeypatch.setattr(at, "_EXPLICIT", {})
    monkeypatch.setattr(at, "best_time", lambda fn, repeats: calls.append(1) or 1.0)
    for n in (10, 12, 16):  # one bucket: 16
        at.attend(*_qkv(T=n, S=n), is_causal=True)
    assert len(calls) == 2  # SDPA and the explicit products, timed once
    at.attend(*_qkv(T=20, S=20), is_causal=True)
    assert len(calls) == 4


def _rows(lens, H, KV, hd, dtype, seed=0):
    """q, k, v as column blocks of one (N, (H + 2 KV) hd) product (rows of a stride wider than
    their width), and the sequences' starts."""
    g = torch.Generator().manual_seed(seed)
    qkv = (2 * torch.randn(sum(lens), (H + 2 * KV) * hd, generator=g)).to(dtype)
    starts = torch.tensor([0] + lens).cumsum(0)
    return (*qkv.split((H * hd, KV * hd, KV * hd), -1), starts)


def _rows_reference(q, k, v, starts, H, KV, scale):
    """float64, one sequence at a time, through SDPA on the (1, H, T, hd) layout."""
    hd, out = q.shape[1] // H, []
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
        qq, kk, vv = (t[a:b].double().view(b - a, n, hd).transpose(0, 1)[None] for t, n in ((q, H), (k, KV), (v, KV)))
        y = F.scaled_dot_product_attention(qq, kk, vv, scale=scale, enable_gqa=KV != H)
        out.append(y[0].transpose(0, 1).reshape(b - a, H * hd))
    return torch.cat(out)


rows_kernel = pytest.mark.skipif(not at.qkernel.available(), reason="the C kernels are not built here")


@rows_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("lens,H,KV,hd", [([22, 13, 9, 7, 1], 12, 12, 32),  # all-MiniLM-L6-v2's heads
                                          ([30, 17], 4, 2, 64),  # GQA
                                          ([40, 3], 2, 1, 24),  # hd = 16 + 8: a half step
                                          ([5, 9], 3, 3, 12)])  # hd not a multiple of 8: the portable loop
def test_attend_rows_equals_attention_per_sequence(monkeypatch, dtype, tol, lens, H, KV, hd):
    """Each packed sequence attends to its own rows only: against SDPA in float64 sequence by
    sequence, relative to the largest output; the output rounded once in bfloat16."""
    monkeypatch.setattr(at, "rows_pay", lambda *a: True)
    q, k, v, starts = _rows(lens, H, KV, hd, dtype)
    with torch.no_grad():
        got = at.attend_rows(q, k, v, starts, max(lens), H, KV, scale=0.3)
    want = _rows_reference(q, k, v, starts, H, KV, 0.3)
    assert got.dtype == dtype and got.shape == want.shape
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < tol


@rows_kernel
def test_attend_rows_declines_gradients_and_follows_its_measurement(monkeypatch):
    """None (the padded path) where a gradient is wanted or the measurement says the kernel is
    slower; measured once per bucket of sequences and length."""
    q, k, v, starts = _rows([6, 5], 2, 2, 8, torch.float32)
    calls = []
    monkeypatch.setattr(at, "_ROWS", {})
    monkeypatch.setattr(at, "best_time", lambda fn, repeats: calls.append(1) or (1.0 if len(calls) % 2 else 2.0))
    with torch.no_grad():
        assert at.attend_rows(q, k, v, starts, 6, 2, 2) is None  # padded 1.0 s, kernel 2.0 s
        assert at.attend_rows(q, k, v, starts, 7, 2, 2) is None and len(calls) == 2  # same bucket (8)
    at._ROWS.clear()
    monkeypatch.setattr(at, "best_time", lambda fn, repeats: 1.0)
    assert at.attend_rows(q.requires_grad_(), k, v, starts, 6, 2, 2) is None  # a gradient
    with torch.no_grad():
        assert at.attend_rows(q, k, v, starts, 6, 2, 2) is not None  # as fast counts
    monkeypatch.setattr(at.qkernel, "available", lambda: False)
    with torch.no_grad():
        assert at.attend_rows(q, k, v, starts, 6, 2, 2) is None


def test_rows_pay_measures_a_bounded_probe(monkeypatch):
    """Many long sequences are measured on at most ROWS_PROBE packed rows (the two paths scale
    alike with the sequences), and the key follows the capped count."""
    shapes = []
    monkeypatch.setattr(at, "_ROWS", {})
    monkeypatch.setattr(at, "probe", lambda *s, dtype=torch.float32: shapes.append(s) or torch.zeros(*s, dtype=dtype))
    monkeypatch.setattr(at, "best_time", lambda fn, repeats: 1.0)
    assert at.rows_pay(5000, 300, 2, 2, 8, torch.float32)
    assert shapes and all(s[0] <= at.ROWS_PROBE for s in shapes)
    assert list(at._ROWS) == [(at.ROWS_PROBE // 512, 512, 2, 2, 8, torch.float32)]


f32_kernel = pytest.mark.skipif(not at._ATTEND_C, reason="the C kernels are not built here (or no AVX2)")


@f32_kernel
@pytest.mark.parametrize("B,H,T,hd", [(2, 3, 37, 16), (1, 2, 5, 32), (2, 2, 64, 64)])
def test_float32_kernel_equals_sdpa_causal(B, H, T, hd):
    """Causal: output and the three gradients against SDPA in float64, with q, k and v strided
    views of one projection (B, T, 3·H·hd) as the attention layer makes them; T not a multiple of
    8 or 16. The output comes laid out (B, T, H, hd), so the layer's transpose back is a view."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, 3 * H * hd, generator=g, requires_grad=True)
    q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in x.split(H * hd, -1))
    grad = torch.randn(B, H, T, hd, generator=g)
    y = at.KernelAttention.apply(q, k, v, None, True, 0.3)
    assert y.transpose(1, 2).is_contiguous()
    y.backward(grad)
    x64 = x.detach().double().requires_grad_()
    q64, k64, v64 = (t.view(B, T, H, hd).transpose(1, 2) for t in x64.split(H * hd, -1))
    want = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True, scale=0.3)
    want.backward(grad.double())
    assert ((y.double() - want).abs().max() / want.abs().max()).item() < 1e-5
    assert ((x.grad.double() - x64.grad).abs().max() / x64.grad.abs().max()).item() < 1e-5


@f32_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_takes_inputs_strided_along_the_head(dtype):
    """q laid out with hd not innermost (a transposed view) is copied to rows before the kernel
    reads it, in either dtype: the output equals the kernel's on the same values laid out as rows."""
    if dtype == torch.bfloat16 and not at._ATTEND_BF16:
        pytest.skip("no bfloat16 C kernel here (needs AVX512-BF16)")
    g = torch.Generator().manual_seed(3)
    B, H, T, hd = 2, 2, 20, 32
    q = torch.randn(B, H, hd, T, generator=g).to(dtype).transpose(-1, -2)
    k, v = (torch.randn(B, H, T, hd, generator=g).to(dtype) for _ in range(2))
    assert q.stride(-1) != 1
    got = at.KernelAttention.apply(q, k, v, None, True, 0.25)
    want = at.KernelAttention.apply(q.contiguous(), k, v, None, True, 0.25)
    assert torch.equal(got, want)


def _masked_run(fn, x, grad, bias, keep, kind, dtype):
    """fn's output and gradients (the mask's too, with a learned bias) from the leaves x, a mask of
    `kind` made from bias and keep in float32 (float64 for the reference)"""
    leaves = [t.to(dtype).clone().requires_grad_() for t in x]
    b = bias.to(torch.float64 if dtype == torch.float64 else torch.float32).clone().requires_grad_()
    mask = {"bias": lambda: torch.where(keep, b, torch.finfo(b.dtype).min),
            "padding": lambda: torch.zeros_like(b[:1, :1, :1]).masked_fill(~keep, torch.finfo(b.dtype).min)
            }.get(kind, lambda: None)()
    y = fn(*(t.transpose(1, 2) for t in leaves), mask)
    y.backward(grad.to(dtype))
    return [y.double()] + [t.grad.double() for t in leaves] + ([b.grad.double()] if kind == "bias" else [])


def _masked_case(B, H, T, S, hd, seed):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(B, n, H, hd, generator=g) for n in (T, S, S)]
    grad = torch.randn(B, T, H, hd, generator=g).transpose(1, 2)
    bias = torch.randn(1, H, T, S, generator=g)
    keep = torch.ones(B, 1, 1, S, dtype=torch.bool)
    keep[0, ..., S - 3:] = False
    return x, grad, bias, keep


@f32_kernel
@pytest.mark.parametrize("B,H,T,S,hd,kind", [(2, 3, 37, 37, 64, "none"), (2, 4, 40, 40, 48, "bias"),
                                            (3, 2, 17, 29, 16, "bias"), (2, 4, 20, 50, 64, "padding")])
def test_float32_kernel_equals_sdpa_with_a_mask(B, H, T, S, hd, kind):
    """Without a causal flag: no mask, T5's learned relative bias under a padding mask (its gradient
    too), cross-attention (S != T, k and v apart from q) with a padding mask; against SDPA in
    float64, within 1e-5 of the largest value."""
    x, grad, bias, keep = _masked_case(B, H, T, S, hd, seed=2)
    got = _masked_run(lambda q, k, v, m: at.KernelAttention.apply(q, k, v, m, False, 0.2), x, grad, bias, keep, kind,
                      torch.float32)
    want = _masked_run(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.2), x, grad,
                       bias, keep, kind, torch.float64)
    assert len(got) == (5 if kind == "bias" else 4)
    for a, w in zip(got, want):
        assert ((a - w).abs().max() / w.abs().max()).item() < 1e-5


bf16_kernel = pytest.mark.skipif(not at._ATTEND_BF16, reason="no bfloat16 C kernel here (needs AVX512-BF16)")


@bf16_kernel
@pytest.mark.parametrize("B,H,T,S,hd,kind", [(1, 1, 5, 5, 32, "causal"), (2, 3, 37, 37, 64, "causal"),
                                            (2, 2, 16, 16, 96, "causal"), (1, 2, 100, 100, 128, "causal"),
                                            (2, 3, 37, 37, 64, "none"), (2, 4, 40, 40, 64, "bias"),
                                            (2, 4, 20, 50, 64, "padding")])
def test_bfloat16_kernel_is_as_close_as_sdpa(B, H, T, S, hd, kind):
    """The bfloat16 kernel's output and gradients (the mask's too, for T5's learned relative bias
    under a padding mask) against SDPA in float64 from the same bfloat16 inputs: within 2% of the
    largest value, and at most 1.5x the error of SDPA's own bfloat16 kernel (both round the
    probabilities to bfloat16 for their products); with a learned bias, of `_explicit`'s products,
    the path it replaces there (SDPA's math path adds a float32 bias in float32). T not a multiple
    of the 16-query blocks or 32-key tiles; cross-attention (S != T) with k and v apart from q."""
    x, grad, bias, keep = _masked_case(B, H, T, S, hd, seed=1)
    x, grad = [t.bfloat16() for t in x], grad.bfloat16()
    causal = kind == "causal"

    def run(fn, dtype):
        return _masked_run(fn, x, grad, bias, keep, kind, dtype)
    got = run(lambda q, k, v, m: at.KernelAttention.apply(q, k, v, m, causal, 0.2), torch.bfloat16)
    if kind == "bias":  # SDPA's math path: float32 inside; lmforge took `_explicit`'s products here
        sdpa = run(lambda q, k, v, m: at._explicit(q, k, v, m, False, 0.0, 0.2), torch.bfloat16)
    else:
        sdpa = run(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal,
                                                                     scale=0.2), torch.bfloat16)
    want = run(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, scale=0.2),
               torch.float64)
    assert len(got) == (5 if kind == "bias" else 4)
    for a, r, w in zip(got, sdpa, want):
        err, ref_err = ((t - w).abs().max().item() / w.abs().max().item() for t in (a, r))
        assert err < 0.02 and err <= 1.5 * ref_err + 1e-3, (err, ref_err)


@f32_kernel
def test_float32_kernel_follows_its_measurement_and_its_conditions(monkeypatch):
    """attend takes the kernel for float32 training without dropout or GQA (causal, with a float
    mask, or with neither) exactly where kernel_pays (the median ratio of alternating rounds,
    measured once per mask layout and power-of-two length, with the training margin) says so;
    below KERNEL_MIN_SCORES it keeps SDPA unmeasured."""
    calls, used = [], []
    monkeypatch.setattr(at, "_KERNEL", {})
    monkeypatch.setattr(at, "KERNEL_MIN_SCORES", 1)
    monkeypatch.setattr(at, "median_ratio", lambda a, b, rounds: calls.append(1) or 1.6)
    real = at.KernelAttention.apply
    monkeypatch.setattr(at.KernelAttention, "apply", lambda *a: used.append(1) or real(*a))
    q, k, v = (t.float().detach().requires_grad_() for t in _qkv(T=12, S=12, D=16))
    at.attend(q, k, v, is_causal=True)
    at.attend(q, k, v, is_causal=True)
    assert calls == [1] and used == [1, 1]  # SDPA 1.6x the kernel's time: past the 1.5x margin
    at.attend(q[:, :, :9], k[:, :, :9], v[:, :, :9], is_causal=True)
    assert len(calls) == 1  # 9 and 12 tokens share the bucket of 16
    with torch.no_grad():
        at.attend(q, k, v, is_causal=True)  # inference
    at.attend(q, k, v, is_causal=True, dropout_p=0.1)
    at.attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)  # bfloat16 wants hd % 32 == 0
    at.attend(q, k, v, mask=torch.zeros(2, 1, 1, 12).bool())  # a boolean mask
    assert used == [1, 1, 1] and len(calls) == 1
    at.attend(q, k, v, mask=torch.zeros(1, 1, 12, 12))
    at.attend(q, k[:, :, :7], v[:, :, :7], mask=torch.zeros(2, 1, 1, 7))  # cross-attention
    assert used == [1, 1, 1, 1, 1] and len(calls) == 3  # each mask layout measured on its own
    at._KERNEL.clear()
    monkeypatch.setattr(at, "median_ratio", lambda a, b, rounds: calls.append(1) or 1.25)
    at.attend(q, k, v, is_causal=True)
    assert len(used) == 5 and len(calls) == 4  # 1.25x is within the margin: SDPA
    at._KERNEL.clear()
    monkeypatch.setattr(at, "KERNEL_MIN_SCORES", 2 * 3 * 16 * 16 + 1)
    at.attend(q, k, v, is_causal=True)
    assert len(used) == 5 and len(calls) == 4  # too small to measure: SDPA


@bf16_kernel
def test_bfloat16_kernel_is_measured_on_its_own(monkeypatch):
    """bfloat16 training takes the kernel where its own measurement (keyed by dtype, mask layout and
    whether the mask learns, against `attend`'s torch path) says so: causal, with a float mask or
    with neither, and only with hd a multiple of 32; boolean masks stay with torch."""
    calls, used = [], []
    monkeypatch.setattr(at, "_KERNEL", {})
    monkeypatch.setattr(at, "KERNEL_MIN_SCORES", 1)
    monkeypatch.setattr(at, "median_ratio", lambda a, b, rounds: calls.append(1) or 1.6)
    real = at.KernelAttention.apply
    monkeypatch.setattr(at.KernelAttention, "apply", lambda *a: used.append(a[0].dtype) or real(*a))
    q, k, v = (t.detach().requires_grad_() for t in _qkv(T=12, S=12, D=32))
    at.attend(q, k, v, is_causal=True)
    at.attend(q.float(), k.float(), v.float(), is_causal=True)
    assert used == [torch.bfloat16, torch.float32] and len(calls) == 2
    assert {key[5] for key in at._KERNEL} == {torch.bfloat16, torch.float32}
    q48, k48, v48 = (t.detach().requires_grad_() for t in _qkv(T=12, S=12, D=48))
    at.attend(q48, k48, v48, is_causal=True)
    assert len(used) == 2
    mask = torch.zeros(2, 1, 1, 12)
    at.attend(q, k, v, mask=mask)
    at.attend(q, k, v, mask=torch.zeros(1, 3, 12, 12, requires_grad=True))
    at.attend(q, k, v)
    at.attend(q, k, v, mask=mask.bool())
    assert len(used) == 5 and len(calls) == 5
    assert {(key[6], key[8], key[9]) for key in at._KERNEL if key[5] == torch.bfloat16} == {
        (None, False, True), ((2, 1, 1, 16), False, False), ((1, 3, 16, 16), True, False), (None, False, False)}
