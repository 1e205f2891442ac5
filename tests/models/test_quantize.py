"""Weight-only int8 and int4 inference: close to the float model, everywhere a linear layer is,
and never saved by mistake."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.generate import generate
from lmforge.models.heads import Model
from lmforge.interop.load import save
from lmforge.models.int4 import Int4Linear, dequantize_groups, quantize_groups
from lmforge.models.quantize import (Int8Linear, Int8LMHead, int8_linear, is_quantized, quantize, quantize_int8,
                                     quantize_kind, quantize_weight)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_int8_linear_is_close_to_the_float_product():
    torch.manual_seed(0)
    w, b, x = torch.randn(48, 32) * 0.1, torch.randn(48), torch.randn(2, 3, 32)
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127  # each row uses the full range
    assert torch.allclose(q.float() * s[:, None], w, atol=float(s.max()) / 2 + 1e-7)  # rounding error only
    y = int8_linear(x, q, s, b)
    assert y.shape == (2, 3, 48) and y.dtype == torch.float32
    assert _rel(y, F.linear(x, w, b)) < 0.02


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny", "t5-tiny"])
def test_quantized_model_stays_close_and_generates(preset):
    torch.manual_seed(0)
    model = Model(ModelConfig.preset(preset, vocab_size=128, dropout=0.0)).eval()
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        kw = {"decoder_input_ids": ids[:, :5]} if model.cfg.family == "encoder-decoder" else {}
        ref = model(ids, **kw)
        quantize_int8(model)
        got = model(ids, **kw)
    assert not any(type(m) is torch.nn.Linear or type(m).__name__ == "Linear" for m in model.modules())
    assert isinstance(model.lm_head, Int8LMHead) and any(isinstance(m, Int8Linear) for m in model.modules())
    assert _rel(got, ref) < 0.05
    out = generate(model, ids[:1], max_new_tokens=5, eos_ids=[])
    assert out.sequences.shape == (1, 5)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_model_is_not_saved_and_not_quantized_twice(tmp_path, kind):
    model = quantize(Model(ModelConfig.preset("gpt-tiny", vocab_size=64)), kind)
    assert is_quantized(model) == kind
    for fmt in ("lmforge", "hf"):
        with pytest.raises(ValueError, match=f"{kind}-quantised"):
            save(model, tmp_path / fmt, format=fmt)
        assert not (tmp_path / fmt).exists()  # nothing half-written
    with pytest.raises(ValueError, match=f"already {kind}"):
        quantize(model, "int8")
    # int4's packed layout depends on the CPU: it is not in the state dict
    assert kind == "int8" or not any("packed" in k for k in model.state_dict())


@pytest.mark.parametrize("out, inp, group", [(48, 64, 32), (40, 100, 32), (16, 256, 128), (99, 64, 64)])
def test_int4_groups_and_the_kernel(out, inp, group, quant_kernel):
    torch.manual_seed(0)
    w, b, x = torch.randn(out, inp) * 0.1, torch.randn(out), torch.randn(2, 3, inp)
    q, s, z = quantize_groups(w, group)
    assert q.dtype == torch.uint8 and q.shape == w.shape and int(q.min()) == 0 and int(q.max()) == 15
    deq = dequantize_groups(q, s, z, group)
    step = s.repeat_interleave(group, dim=1)[:, :inp]
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()  # round to nearest within each group
    y = Int4Linear(q, s, z, b, group)(x)  # rows padded to 16 and inputs to whole groups inside
    assert y.shape == (2, 3, out) and y.dtype == torch.float32
    assert _rel(y, F.linear(x, deq, b)) < 0.01  # the dequantised product, up to bfloat16 or int16 activations


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny", "t5-tiny"])
def test_int4_model_computes_its_groups_and_generates(preset, quant_kernel):
    torch.manual_seed(0)
    model = Model(ModelConfig.preset(preset, vocab_size=128, dropout=0.0)).eval()
    ids = torch.randint(3, 128, (2, 12))
    kw = {"decoder_input_ids": ids[:, :5]} if model.cfg.family == "encoder-decoder" else {}
    # the reference: every linear layer's weight replaced by its dequantised int4 groups, int8 head
    ref_model = copy.deepcopy(model)
    for m in ref_model.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.data = dequantize_groups(*quantize_groups(m.weight))
    ref_model.lm_head = Int8LMHead(ref_model.lm_head, ref_model.backbone.tokens)
    with torch.no_grad():
        float_logits, ref = model(ids, **kw), ref_model(ids, **kw)
        quantize(model, "int4")
        got = model(ids, **kw)
    assert not any(type(m).__name__ == "Linear" for m in model.modules())
    assert isinstance(model.lm_head, Int8LMHead) and any(isinstance(m, Int4Linear) for m in model.modules())
    assert _rel(got, ref) < 0.02
    assert _rel(got, float_logits) < 0.3  # random weights: 4 bits cost 7-14% here
    out = generate(model, ids[:1], max_new_tokens=5, eos_ids=[])
    assert out.sequences.shape == (1, 5)


def test_quantize_choice_and_its_alias():
    assert quantize_kind() is None and quantize_kind("int4") == "int4"
    assert quantize_kind(int8=True) == quantize_kind("int8", int8=True) == "int8"
    with pytest.raises(ValueError, match="int8=True contradicts quantize='int4'"):
        quantize_kind("int4", int8=True)
    with pytest.raises(ValueError, match="quantize='int3'"):
        quantize_kind("int3")
    with pytest.raises(ValueError, match="int4 kernel takes"):
        quantize_groups(torch.randn(4, 64), 48)


def test_stacked_quantised_products_equal_the_separate_ones(quant_kernel):
    """A compiled step runs q/k/v (and gate/up) as one quantised product (`stacked`): the same
    values as one product per layer, where the layout allows stacking (int4 with torch's
    kernel: whole tiles of 64 rows; with lmforge's: whole groups of 4 rows)."""
    from lmforge.models.int4 import Int4Linear, concat_ok
    from lmforge.models.quantize import Int8Linear
    torch.manual_seed(0)
    x = torch.randn(3, 128)
    for bias in (False, True):
        mods = [Int8Linear(torch.nn.Linear(128, n, bias=bias)) for n in (128, 64, 64)]
        torch.testing.assert_close(Int8Linear.stacked(x, mods), torch.cat([m(x) for m in mods], -1))
    mods = [Int4Linear.from_linear(torch.nn.Linear(128, n, bias=False)) for n in (128, 64, 64)]
    if quant_kernel == "native" or concat_ok():  # the packed layout of this CPU stacks (it does on x86 with AVX2)
        assert torch.equal(Int4Linear.stacked(x, mods), torch.cat([m(x) for m in mods], -1))
    else:  # each layer runs alone
        assert Int4Linear.stacked(x, mods) is None
    odd = [Int4Linear.from_linear(torch.nn.Linear(128, n, bias=False)) for n in (48, 16)]
    if quant_kernel == "native":
        assert torch.equal(Int4Linear.stacked(x, odd), torch.cat([m(x) for m in odd], -1))
        biased = [Int4Linear.from_linear(torch.nn.Linear(128, n, bias=True)) for n in (48, 16)]
        torch.testing.assert_close(Int4Linear.stacked(x, biased), torch.cat([m(x) for m in biased], -1))
        assert Int4Linear.stacked(x, [odd[0], biased[1]]) is None  # some with a bias, some without
        assert Int4Linear.stacked(x, [Int4Linear.from_linear(torch.nn.Linear(128, 6, bias=False)), odd[1]]) is None
    else:
        assert Int4Linear.stacked(x, odd) is None  # not whole tiles: the packed layouts do not stack
