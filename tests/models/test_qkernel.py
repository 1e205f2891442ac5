"""lmforge's own 4- and 8-bit CPU kernels (`lmforge.models.qkernel`): the compiled kernel (its
AVX2 loop and its portable loop) computes exactly `reference`'s sums, `reference` is the
product of the dequantised weight with int16 activations, and PyTorch serves where the kernel
was not built."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.models import int4, qkernel
from lmforge.models.int4 import Int4Linear, dequantize_groups, quantize_groups
from lmforge.models.quantize import quantize_weight

needs_kernel = pytest.mark.skipif(not qkernel.available(), reason="lmforge.models._qkernel was not built here")


def _weights(out, inp, group=32, seed=0):
    """The same weight packed in 4 bits (groups of `group`) and in 8 bits (one scale per row),
    with the float weights each holds (scales rounded to half precision, as packed)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.1
    q, s, z = quantize_groups(w, group)
    s = s.half().float()  # d = s and m = z - 8s are kept in half precision
    z = (z - 8 * s).half().float() + 8 * s
    q8, s8 = quantize_weight(w)
    return ((qkernel.pack4(q, s, z, group), dequantize_groups(q, s, z, group)),
            (qkernel.pack8(q8, s8), q8.float() * s8.float().half().float()[:, None]))


@pytest.mark.parametrize("out, inp, group", [(8, 32, 32), (7, 40, 32), (99, 100, 32), (64, 256, 128), (13, 576, 64)])
def test_packing_keeps_codes_and_scales(out, inp, group):
    for w, dense in _weights(out, inp, group):
        assert w.dtype == torch.uint8 and w.shape == (-(-out // 4), -(-inp // 32), qkernel.BLOCK_BYTES[qkernel.bits_of(w)])
        codes, d, m = qkernel.unpack(w, out)
        full = codes.view(out, -1, 32).float() * d[..., None]
        full = (full if m is None else full + m[..., None]).view(out, -1)
        torch.testing.assert_close(full[:, :inp], dense, rtol=1e-6, atol=1e-6)
        assert not codes[:, inp:].any()  # padded inputs: code 0 (the activations' padding is 0 too)
        for simd in (True, False):  # the C kernel's two loops (or PyTorch, where it was not built)
            torch.testing.assert_close(qkernel.dequantize(w, out, inp, simd), dense, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 3, 5])
@pytest.mark.parametrize("out, inp", [(7, 40), (64, 64), (99, 100), (130, 576)])
def test_reference_is_the_dequantised_product_with_int16_activations(rows, out, inp):
    x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(1))
    for w, dense in _weights(out, inp):
        y, exact = qkernel.reference(x, w, out), x @ dense.T
        assert y.shape == (rows, out) and y.dtype == torch.float32
        err = float((y - exact).norm() / exact.norm())
        assert 1e-9 < err < 1e-4  # int16 activations: a rounding, but a small one
        # exactly: the rounded activations' product with the weight
        qx, dx, _ = qkernel.quantize_activations(x, w.shape[1])
        xq = (qx.float() * dx[..., None]).view(rows, -1)[:, :inp]
        torch.testing.assert_close(y, xq @ dense.T, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 4, 9])
@pytest.mark.parametrize("out, inp", [(1, 32), (7, 40), (64, 64), (99, 100), (300, 1536)])
def test_compiled_kernel_computes_the_reference_sums(simd, rows, out, inp):
    """Both loops of the C kernel (AVX2 where the CPU has it, and the portable one) against
    PyTorch: the integer sums are exact, only float summation order differs."""
    x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(2)) * 3
    for w, _ in _weights(out, inp):
        ref = qkernel.reference(x, w, out)
        torch.testing.assert_close(qkernel.matmul(x, w, out, simd=simd), ref, rtol=1e-5, atol=1e-4)


def test_pytorch_serves_where_the_kernel_was_not_built(monkeypatch):
    x = torch.randn(3, 100)
    for w, _ in _weights(99, 100):
        want = qkernel.reference(x, w, 99)
        monkeypatch.setattr(qkernel, "_qkernel", None)
        assert not qkernel.available()
        torch.testing.assert_close(qkernel.matmul(x, w, 99), want)
        torch.testing.assert_close(torch.ops.lmforge.q_matmul(x, w, 99), want)
        monkeypatch.undo()


@needs_kernel
def test_bad_operands_are_refused_with_their_shapes():
    (w, _), _ = _weights(8, 64)
    with pytest.raises(ValueError, match=r"x \(1, 96\) and packed weight \(2, 2, 80\)"):
        qkernel.matmul(torch.randn(1, 96), w, 8)
    with pytest.raises(ValueError, match="not a packed 4- or 8-bit weight"):
        qkernel.matmul(torch.randn(1, 64), w[..., :40], 8)
    with pytest.raises(ValueError, match="group_size=48"):
        qkernel.pack4(torch.zeros(4, 96, dtype=torch.uint8), torch.ones(4, 2), torch.ones(4, 2), 48)


def test_linear_takes_the_kernel_for_few_rows_and_the_float_product_for_many():
    (w, dense), _ = _weights(40, 64)
    b = torch.randn(40)
    few, many = torch.randn(2, 3, 64), torch.randn(20, 64)
    torch.testing.assert_close(qkernel.linear(few, w, 64, 40, b, max_rows=8),
                               qkernel.reference(few.view(-1, 64), w, 40).view(2, 3, 40) + b, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(qkernel.linear(many, w, 64, 40, b, max_rows=8), F.linear(many, dense, b),
                               rtol=1e-5, atol=1e-5)


def test_the_kernel_as_a_compiled_graphs_operator():
    (w, _), _ = _weights(24, 64)
    x = torch.randn(1, 64)

    def f(x):
        return torch.ops.lmforge.q_matmul(x * 2, w, 24).relu() + 1
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


def test_native_rows_is_measured_or_set(monkeypatch):
    monkeypatch.setattr(int4, "_native_rows", None)
    monkeypatch.setenv("LMFORGE_Q4", "torch")
    assert int4.native_rows() == 0
    monkeypatch.setattr(int4, "_native_rows", None)
    monkeypatch.setenv("LMFORGE_Q4", "fast")
    with pytest.raises(ValueError, match="LMFORGE_Q4='fast'"):
        int4.native_rows()
    monkeypatch.setattr(int4, "_native_rows", None)
    monkeypatch.delenv("LMFORGE_Q4")
    rows = int4.native_rows()  # measured: 0 (torch's kernel is faster here) or a row count it tried
    assert rows in (0, 1, 2, 4, 8, 16, 32, 64) and (rows == 0 or qkernel.available())


def test_int4_layers_give_the_same_product_with_either_kernel(quant_kernel):
    """Int4Linear computes its groups' product with torch's kernel (bfloat16 activations) or
    lmforge's (int16 activations): both within 1% of the dequantised product."""
    torch.manual_seed(0)
    w, b = torch.randn(99, 100) * 0.1, torch.randn(99)
    q, s, z = quantize_groups(w, 32)
    layer = Int4Linear(q, s, z, b)
    assert (layer.native is not None) == (quant_kernel == "native")
    x = torch.randn(2, 3, 100)
    y = layer(x)
    exact = F.linear(x, dequantize_groups(q, s, z), b)
    assert float((y - exact).norm() / exact.norm()) < 0.01


def test_a_packed_weight_off_the_cpu_is_a_clear_error():
    """The kernels run on CPU: a quantised model moved to another device says so, by name."""
    w = qkernel.pack8(torch.randint(-127, 127, (8, 64)), torch.rand(8)).to("meta")
    with pytest.raises(ValueError, match="run on CPU.*on meta"):
        qkernel.linear(torch.randn(1, 64, device="meta"), w, 64, 8, None, 16)
