"""Building blocks against their definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

import lmforge.nn.layers as L_act
from lmforge.nn.layers import RelativeBias, sinusoidal_table
from lmforge.nn.linear import Linear, RowBlocks, fast_linear, linear


def test_fast_linear_matches_f_linear_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    y = fast_linear(x, w, b)
    ref = F.linear(x, w, b)
    assert torch.allclose(y, ref, atol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), g)
    want = torch.autograd.grad(ref, (x, w, b), g)
    for a, e in zip(got, want):
        assert torch.allclose(a, e, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(fast_linear(x, w), F.linear(x, w), atol=1e-5)


def test_sinusoidal_table_is_the_papers_encoding():
    pe = sinusoidal_table(50, 8)
    for pos in (0, 7, 49):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert math.isclose(pe[pos, i].item(), math.sin(angle), abs_tol=1e-6)
            assert math.isclose(pe[pos, 4 + i].item(), math.cos(angle), abs_tol=1e-6)


def test_relative_buckets_match_t5():
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        ours = RelativeBias(32, 128, 1, bidirectional=bidirectional).bucket(rel)
        ref = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32,
                                                    max_distance=128)
        assert torch.equal(ours, ref)


def test_relative_bias_table_slices_equal_forward():
    torch.manual_seed(0)
    rb = RelativeBias(32, 128, 4, bidirectional=False)
    torch.nn.init.normal_(rb.weight)
    table = rb.table(40)
    for q_len, offset in ((1, 0), (1, 17), (1, 39), (5, 0), (3, 20)):
        k_len = offset + q_len
        assert torch.equal(RelativeBias.from_table(table, q_len, k_len, offset), rb(q_len, k_len, offset))


@pytest.mark.parametrize("parts", [1, 3, 4, 5])  # 5 does not divide 12 or 20 outputs: one block
def test_row_blocks_match_f_linear_for_any_number_of_blocks(parts):
    """The column blocks (one per thread) give F.linear's values whatever their number, so the
    multi-block path is tested on a machine of any core count."""
    torch.manual_seed(0)
    q, k = Linear(16, 12), Linear(16, 8)
    blocks = RowBlocks(max_elements=4 * 20 * 16, parts=parts)
    with torch.inference_mode():
        for shape in ((1, 1, 16), (3, 16), (2, 2, 16)):
            x = torch.randn(*shape)
            y = blocks(x, q)
            both = blocks(x, q, k)  # [W_q; W_k] stacked: one product
            assert y.shape == (*shape[:-1], 12) and torch.allclose(y, F.linear(x, q.weight, q.bias), atol=1e-5)
            assert torch.allclose(both, torch.cat([q(x), k(x)], -1), atol=1e-5)
        assert blocks(torch.randn(7, 16), q) is None  # 7 * 12 * 16 > max_elements
        assert blocks(torch.randn(1, 32), Linear(32, 80)) is None  # too large even for one row
        assert blocks(torch.randn(1, 16).double(), Linear(16, 4).double()) is None  # float32 only
        lora = torch.nn.Sequential(q)  # not a plain Linear (LoRA's): the module's own forward
        x = torch.randn(1, 16)
        assert blocks(x, lora) is None and torch.equal(linear(lora, x, blocks), q(x))
    with torch.no_grad():
        assert torch.allclose(linear(q, x, blocks), q(x), atol=1e-5)
    assert blocks(x, q) is None  # with gradients: never
    with pytest.raises(ValueError, match="parts"):
        RowBlocks(parts=0)


def test_qkv_projections_keep_their_names_and_stack_when_decoding():
    from lmforge.config import ModelConfig
    from lmforge.nn.attention import Attention
    cfg = ModelConfig(family="decoder", vocab_size=50, d_model=16, n_heads=4, n_kv_heads=2, n_decoder_layers=1,
                      d_ff=32, bias=True)
    attn = Attention(cfg)
    assert [k for k in attn.state_dict()] == ["q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias",
                                              "o.weight", "o.bias"]
    x = torch.randn(2, 1, 16)
    with torch.inference_mode():
        plain = attn.project(x)
        stacked = attn.project(x, blocks=RowBlocks(parts=2))
    for a, b, n in zip(plain, stacked, (16, 8, 8)):
        assert a.shape == b.shape == (2, 1, n) and torch.allclose(a, b, atol=1e-5)


@pytest.mark.skipif(not L_act._GELU_C, reason="lmforge's C kernels are not built, or the CPU lacks AVX2")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_tanh_kernel_matches_torch(dtype):
    """The C tanh-GELU (lmforge/models/gelu.c), forward and input gradient: within float32
    round-off of float64, as close as torch's own in bfloat16; a strided input; the tail of
    fewer than 8 elements; large |x|."""
    torch.manual_seed(0)
    x = (torch.randn(37, 64) * 3).to(dtype)[:, ::2]  # not contiguous
    x[0, :4] = torch.tensor([-30.0, 30.0, -1e4, 1e4], dtype=dtype)
    x.requires_grad_()
    dy = torch.randn(x.shape).to(dtype)
    y = L_act.activation("gelu_tanh")(x)
    assert type(y.grad_fn).__name__.startswith("GeluTanh")
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    y64 = F.gelu(x64, approximate="tanh")
    y64.backward(dy.double())
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(y.double(), y64, **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **({"rtol": 1e-5, "atol": 2e-5} if dtype == torch.float32
                                                          else tol))
    if dtype == torch.bfloat16:  # the same values as torch's bfloat16 GELU, to one rounding
        assert (y.float() - F.gelu(x.detach(), approximate="tanh").float()).abs().max() <= 2 ** -7 * y.abs().max()


@pytest.mark.skipif(not L_act._RMS_C, reason="lmforge's C kernels are not built, or the CPU lacks AVX2")
@pytest.mark.parametrize("shape", [(3, 37, 256), (5, 64), (1, 8)])
def test_rmsnorm_kernel_matches_float64(shape):
    """RMSNorm for float32 training by the C kernel (lmforge/models/rmsnorm.c): output and the input
    and weight gradients within float32 round-off of float64 F.rms_norm; a strided input; row
    counts that do not split evenly over the threads."""
    torch.manual_seed(0)
    norm = L_act.RMSNorm(shape[-1], 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1]) * 0.2 + 1)
    x = torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2].requires_grad_()  # not contiguous
    dy = torch.randn(shape)
    y = norm(x)
    assert type(y.grad_fn).__name__.startswith("RMSNormFn")
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    y64 = F.rms_norm(x64, (shape[-1],), w64, 1e-6)
    y64.backward(dy.double())
    for got, want in ((y, y64), (x.grad, x64.grad), (norm.weight.grad, w64.grad)):
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 2e-6
    with torch.no_grad():  # inference, and rows the kernel does not take, stay with F.rms_norm
        assert norm(x).grad_fn is None
    assert type(L_act.RMSNorm(12, 1e-6)(torch.randn(2, 12, requires_grad=True)).grad_fn).__name__ != "RMSNormFnBackward"
