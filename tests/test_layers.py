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
