"""Building blocks against their definitions."""

import math

import torch
import torch.nn.functional as F

from lmforge.nn.layers import RelativeBias, fast_linear, sinusoidal_table


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


def test_row_blocks_match_f_linear_and_follow_weight_updates():
    from lmforge.nn.layers import RowBlocks
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 12)
    w, b = model.weight, model.bias
    w2, b2 = torch.randn(4, 16), torch.randn(4)
    blocks = RowBlocks(max_elements=4 * 16 * 16)
    with torch.no_grad():
        for shape in ((1, 1, 16), (3, 16), (2, 2, 16)):
            x = torch.randn(*shape)
            with blocks:
                y = fast_linear(x, w, b)
                both = blocks.linear(x, (w, w2), (b, b2))  # [W; W2] stacked: one product
            assert y.shape == (*shape[:-1], 12) and torch.allclose(y, F.linear(x, w, b), atol=1e-5)
            assert torch.allclose(both, torch.cat([F.linear(x, w, b), F.linear(x, w2, b2)], -1), atol=1e-5)
        assert blocks.linear(torch.randn(6, 16), (w,), (b,)) is None  # 6 * 12 * 16 > max_elements
        big = torch.randn(80, 16)
        assert blocks.linear(torch.randn(1, 16), (big,), (None,)) is None  # too large even for one row
        x = torch.randn(1, 16)
        model.__dict__["_row_blocks"] = blocks
        w.mul_(2)  # an in-place update (an optimizer step): the next generation makes new blocks
        assert RowBlocks.of(model) is blocks
        with blocks:
            assert torch.allclose(fast_linear(x, w, b), F.linear(x, w, b), atol=1e-5)
        assert RowBlocks.active() is None  # only inside `with`
