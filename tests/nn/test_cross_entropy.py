"""The fused vocabulary product + cross-entropy (lmforge.nn.cross_entropy) against F.linear + F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

import lmforge.nn.cross_entropy as ce


def _case(n=300, d=24, v=90, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.3).requires_grad_()
    b = torch.randn(v, generator=g).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[::4] = -100
    with torch.no_grad():  # some targets are the argmax, so accuracy is neither 0 nor 1
        t[1::4] = F.linear(x[1::4], w, b).argmax(-1)
    return x, w, b, t


def _run(x, w, b, t, smoothing, fused, scale=3.0, bf16=False):
    for p in (x, w, b):
        if p is not None:
            p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if fused:
            loss, nll, acc = ce.token_loss(x, w, b, t, smoothing)
            assert loss.grad_fn.name() == "LinearCrossEntropyBackward"
        else:
            logits = F.linear(x, w, b).float()
            loss = F.cross_entropy(logits, t, label_smoothing=smoothing)
            nll = F.cross_entropy(logits, t)
            keep = t != -100
            acc = (logits.argmax(-1)[keep] == t[keep]).float().mean()
    (loss * scale).backward()
    return [loss.detach(), nll, acc] + [p.grad for p in (x, w, b) if p is not None]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("onednn", [True, False])
def test_fused_equals_linear_then_cross_entropy(monkeypatch, bias, smoothing, onednn):
    """Chunks of 64 rows over 300 (the last one short), ignored targets, label smoothing, a
    gradient scaled after the loss, oneDNN's products or MKL's: the loss, nll, accuracy and
    every gradient as autograd's."""
    monkeypatch.setattr(ce, "CHUNK_ROWS", 64)
    monkeypatch.setattr(ce, "onednn_trains", lambda *a: onednn)
    x, w, b, t = _case(bias=bias)
    got, want = _run(x, w, b, t, smoothing, True), _run(x, w, b, t, smoothing, False)
    assert 0.1 < want[2] < 0.9
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group_bytes", [50_000, 1])
def test_fused_under_bf16_autocast_is_near_float32(monkeypatch, group_bytes):
    """Under bf16 autocast the products run in bf16 (as F.linear's would), the softmax in float32:
    the loss within 1e-3 and the gradients within 2% of float32's, no further than autocast's own.
    dW in groups of 256 rows (a full one and a short one), or, where one chunk is already more
    than GROUP_BYTES (a large vocabulary), of one chunk."""
    monkeypatch.setattr(ce, "CHUNK_ROWS", 64)
    monkeypatch.setattr(ce, "GROUP_BYTES", group_bytes)  # 50,000: whole chunks, 256 rows of bf16, then 44
    x, w, b, t = _case()
    ref = _run(x, w, b, t, 0.1, False)
    fused, plain = _run(x, w, b, t, 0.1, True, bf16=True), _run(x, w, b, t, 0.1, False, bf16=True)
    assert all(g.dtype == torch.float32 for g in fused[3:])
    for f, p, r in zip(fused[:2] + fused[3:], plain[:2] + plain[3:], ref[:2] + ref[3:]):
        err = ((f - r).abs().max() / r.abs().max()).item()
        assert err < 2e-2 and err <= 1.5 * ((p - r).abs().max() / r.abs().max()).item() + 1e-4


def test_without_gradient_or_when_switched_off_it_is_the_plain_loss(monkeypatch):
    x, w, b, t = _case()
    with torch.no_grad():
        loss, nll, acc = ce.token_loss(x, w, b, t, 0.1)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(x, w, b), t, label_smoothing=0.1))
    monkeypatch.setattr(ce, "FUSED", False)
    assert ce.token_loss(x, w, b, t)[0].grad_fn.name() != "LinearCrossEntropyBackward"
