"""fast_linear in training: oneDNN's products where `onednn_trains` measures them faster, with
the values and gradients of F.linear."""

import pytest
import torch
import torch.nn.functional as F

import lmforge.nn.linear as L

pytestmark = pytest.mark.skipif(not L._ONEDNN, reason="this torch has no oneDNN linear op")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_grad,w_grad", [(True, True), (False, True), (True, False)])
def test_dnn_linear_equals_f_linear(bias, x_grad, w_grad):
    """Forward, dx, dW and db of a (2, 5, 24) input: F.linear's to float32 round-off; a frozen
    weight (LoRA's base) gets no gradient."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 24, generator=g).requires_grad_(x_grad)
    w = torch.randn(40, 24, generator=g).requires_grad_(w_grad)
    b = torch.randn(40, generator=g).requires_grad_() if bias else None
    dy = torch.randn(2, 5, 40, generator=g)
    got = L.DnnLinear.apply(x, w, b)
    got.backward(dy)
    grads = [t.grad for t in (x, w, b) if t is not None and t.requires_grad]
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    want = F.linear(x, w, b)
    want.backward(dy)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, e in zip(grads, [t.grad for t in (x, w, b) if t is not None and t.requires_grad]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    assert (x.grad is None) == (not x_grad) and (w.grad is None) == (not w_grad)


@pytest.mark.parametrize("trains", [True, False])
def test_fast_linear_trains_through_onednn_where_measured(monkeypatch, trains):
    """With a gradient, fast_linear takes DnnLinear exactly when onednn_trains says so; without
    one, or under bf16 autocast, never."""
    monkeypatch.setattr(L, "onednn_trains", lambda *a: trains)
    x, w = torch.randn(3, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    y = L.fast_linear(x, w)
    assert (type(y.grad_fn).__name__ == "DnnLinearBackward") == trains
    with torch.no_grad():
        assert L.fast_linear(x, w).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(L.fast_linear(x, w).grad_fn).__name__ != "DnnLinearBackward"
    empty = L.fast_linear(torch.randn(0, 8, requires_grad=True), w)  # no rows: F.linear
    assert empty.shape == (0, 4) and type(empty.grad_fn).__name__ != "DnnLinearBackward"


def test_onednn_trains_measures_once_per_power_of_two_rows(monkeypatch):
    """Rows 1,500 and 2,000 share the 2,048 bucket: one measurement; 3,000 is another."""
    monkeypatch.setattr(L, "_TRAINS", {})
    calls = []
    real = L._dnn
    monkeypatch.setattr(L, "_dnn", lambda *a: calls.append(1) or real(*a))
    L.onednn_trains(16, 8, 1500)
    n = len(calls)
    L.onednn_trains(16, 8, 2000)
    assert n > 0 and len(calls) == n
    L.onednn_trains(16, 8, 3000)
    assert len(calls) == 2 * n
    assert set(L._TRAINS) == {(16, 8, 2048), (16, 8, 4096)}


def test_measuring_leaves_the_global_rng_alone(monkeypatch):
    """A run resumed in a new process measures again: its dropout masks and samples must not
    depend on that, so the measurement draws from a generator of its own."""
    monkeypatch.setattr(L, "_TRAINS", {})
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    L.onednn_trains(16, 8, 32)
    torch.testing.assert_close(torch.rand(3), want, rtol=0, atol=0)


@pytest.mark.parametrize("act,fn", [("gelu", F.gelu), ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh")),
                                    ("relu", F.relu)])
def test_fused_linear_equals_the_product_then_the_activation(act, fn):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 5, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    with torch.no_grad():
        got = L.fused_linear(x, w, b, act, fn)
    torch.testing.assert_close(got, fn(F.linear(x, w, b)), rtol=1e-5, atol=1e-5)
    assert L.fused_linear(x, w, b, "silu", F.silu) is None  # not a oneDNN post-op here
    assert L.fused_linear(x.requires_grad_(), w, b, act, fn) is None  # a gradient: not fused


@pytest.mark.parametrize("fuses", [True, False])
def test_bfloat16_fuses_where_measured(monkeypatch, fuses):
    """bfloat16 (a model cast to it) takes the fused product exactly when onednn_fuses says so,
    and then agrees with the product and the activation within bfloat16 rounding."""
    monkeypatch.setattr(L, "onednn_fuses", lambda *a: fuses)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 24, generator=g).bfloat16(), torch.randn(40, 24, generator=g).bfloat16()
    with torch.no_grad():
        got = L.fused_linear(x, w, None, "gelu", F.gelu)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert L.fused_linear(x, w, None, "gelu", F.gelu) is None  # autocast sees the ordinary op
    assert (got is None) == (not fuses)
    if fuses:
        assert (got.float() - F.gelu(F.linear(x.float(), w.float()))).abs().max().item() < 0.1


def test_onednn_fuses_measures_once_per_power_of_two_rows(monkeypatch):
    calls = []
    monkeypatch.setattr(L, "_TRAINS", {})
    monkeypatch.setattr(L, "_median_ratio", lambda a, b, rounds: calls.append(1) or 1.0)
    for rows in (300, 500, 512):
        assert L.onednn_fuses(16, 8, rows, "gelu", F.gelu)  # as fast counts (FUSE_MARGIN 1.0)
    assert len(calls) == 1
    L.onednn_fuses(16, 8, 600, "gelu", F.gelu)
    assert len(calls) == 2


def test_cast_once_under_autocast_same_forward_fewer_casts(monkeypatch):
    """q, k and v read one bf16 copy of their input: the same forward bits as autocast's three
    casts, fewer casts counted (forward and backward), gradients equal to bf16 round-off."""
    from torch.profiler import profile

    import lmforge.nn.attention as A
    from lmforge.config import ModelConfig
    x0 = torch.randn(2, 16, 32)
    assert L.cast_once(x0) is x0  # outside autocast: untouched
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert L.cast_once(x0).dtype == torch.bfloat16
    torch.manual_seed(0)
    att = A.Attention(ModelConfig.preset("gpt-tiny", vocab_size=64, d_model=32, n_heads=2, d_ff=64, max_len=32))

    def run(cast):
        monkeypatch.setattr(A, "cast_once", L.cast_once if cast else (lambda t: t))
        leaf = x0.clone().requires_grad_()
        x = leaf * 1.0  # not a leaf: autocast caches the casts of leaves (weights), not of activations
        with profile() as p:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                q, k, v = att.project(x)
            (q.float().sum() + 2 * k.float().sum() + 3 * v.float().sum()).backward()
        casts = sum(e.count for e in p.key_averages() if e.key == "aten::_to_copy")
        return (q, k, v), leaf.grad, casts

    (q1, k1, v1), g1, n1 = run(cast=True)
    (q0, k0, v0), g0, n0 = run(cast=False)
    assert torch.equal(q1, q0) and torch.equal(k1, k0) and torch.equal(v1, v0)
    assert n1 <= n0 - 4, (n1, n0)  # two forward casts and two backward ones fewer
    torch.testing.assert_close(g1, g0, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dnn", [True, False])
def test_bfloat16_inference_products_go_through_onednn_where_measured(monkeypatch, dnn):
    """A bfloat16 product without gradients takes oneDNN's kernel exactly when onednn_fuses (no
    activation) says so, with F.linear's values; with a gradient or under autocast, F.linear."""
    asked, used = [], []
    monkeypatch.setattr(L, "onednn_fuses", lambda d_in, d_out, rows, act=None, fn=None: asked.append(act) or dnn)
    real = L._dnn
    monkeypatch.setattr(L, "_dnn", lambda *a: used.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).bfloat16() for s in ((6, 24), (40, 24), (40,)))
    with torch.no_grad():
        got = L.fast_linear(x, w, b)
    assert asked == [None] and bool(used) == dnn
    assert (got.float() - F.linear(x, w, b).float()).abs().max().item() <= 0.0625  # bf16 rounding of |y| < 16
    used.clear()
    L.fast_linear(x, w.requires_grad_(), b)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        L.fast_linear(x.float(), w.float(), b.float())
    assert used == []


def test_stacked_qkv_one_product_same_values(monkeypatch):
    """QKV.stack lays q, k and v out as one tensor: the state dict and the three projections keep
    their values, without gradients they come from one product, with them from three; a
    parameter replaced (.to(), LoRA) falls back to the three products."""
    import lmforge.nn.attention as A
    from lmforge.config import ModelConfig
    from lmforge.lora import apply_lora
    torch.manual_seed(0)
    cfg = ModelConfig.preset("gpt-tiny", vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_len=32)
    att = A.Attention(cfg).to(torch.bfloat16)
    x = torch.randn(2, 5, 32).bfloat16()
    state = {k: v.clone() for k, v in att.state_dict().items()}
    with torch.no_grad():
        want = att.project(x)
    att.stack()
    assert all(torch.equal(state[k], v) for k, v in att.state_dict().items())
    shapes = []
    real = A.fast_linear
    monkeypatch.setattr(A, "fast_linear", lambda x, w, b=None: shapes.append(tuple(w.shape)) or real(x, w, b))
    with torch.no_grad():
        got = att.project(x)
    assert shapes == [(64, 32)]  # q 32 + k 16 + v 16 rows in one product
    assert all((a.float() - e.float()).abs().max().item() <= 2e-2 for a, e in zip(got, want))
    shapes.clear()
    (att.project(x)[0].float().sum()).backward()  # gradients: the parameters' own products
    assert att.q.weight.grad is not None and (64, 32) not in shapes
    shapes.clear()
    with torch.no_grad():
        att.float().project(x.float())
    assert (64, 32) not in shapes  # .to() made new parameters: the stacked layout is gone
    att.to(torch.bfloat16).stack()
    apply_lora(att, r=2, targets=("q",))
    assert type(att.q).__name__ == "LoRALinear"
    with torch.no_grad():
        att.project(x)
    assert (64, 32) not in shapes
