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
