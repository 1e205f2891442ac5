"""oneDNN-packed weights for the engine's steps: the same products as the plain layers, and
nothing where they do not apply."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.nn.linear import Linear
from lmforge.nn.packed import PackedLinears, packing_enabled, packing_pays

pytestmark = pytest.mark.skipif(not packing_enabled(), reason="this torch build has no oneDNN weight packing")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 5, 16, 40])
def test_stacked_packed_product_equals_the_layers(bias, rows):
    torch.manual_seed(rows)
    q, k, v = Linear(48, 48, bias=bias), Linear(48, 16, bias=bias), Linear(48, 16, bias=bias)
    x = torch.randn(rows, 3, 48)  # (B, T, d)
    packed = PackedLinears(rows=16)
    with torch.inference_mode():
        want = torch.cat([F.linear(x, m.weight, m.bias) for m in (q, k, v)], dim=-1)
        got = packed(x, q, k, v)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        assert len(packed) == 1
        packed(x, q, k, v)  # packed once, used again
        assert len(packed) == 1 and torch.allclose(packed(x, q), F.linear(x, q.weight, q.bias), atol=1e-5)


def test_not_for_gradients_other_modules_or_dtypes():
    layer = Linear(32, 32)
    x = torch.randn(2, 32)
    packed = PackedLinears(rows=16)
    assert packed(x, layer) is None  # gradients on: the autograd path
    with torch.inference_mode():
        assert packed(x, torch.nn.Linear(32, 32)) is None  # not lmforge's Linear (LoRA's, int8, ...)
        assert packed(x.double(), layer) is None
        assert len(packed) == 0


def test_pack_all_packs_what_the_passes_ask_for():
    from lmforge.config import ModelConfig
    from lmforge.models.heads import Model
    model = Model(ModelConfig(family="decoder", vocab_size=40, d_model=16, n_heads=2, n_decoder_layers=2, d_ff=24,
                              max_len=16, activation="swiglu", norm="rmsnorm", position="rope")).eval()
    packed = PackedLinears(rows=4)
    with torch.inference_mode():
        packed.pack_all(model)
        n = len(packed)
        assert n == 2 * (1 + 1 + 3)  # per layer: q/k/v stacked, o, up, gate, down
        want = model.backbone.decode(torch.tensor([[1, 2, 3]]))
        from lmforge.nn.attention import KVCache
        cache = KVCache.for_model(model.cfg, 1, 16)
        cache.blocks = packed
        assert torch.allclose(model.backbone.decode(torch.tensor([[1, 2, 3]]), cache=cache), want, atol=1e-5)
        assert len(packed) == n  # nothing packed on the way


def test_packing_pays_answers_a_bool():
    assert packing_pays(64, 128, 4, repeats=2) in (True, False)
