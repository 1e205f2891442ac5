"""Weight-only int8 inference: close to the float model, everywhere a linear layer is, and
never saved by mistake."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.generate import generate
from lmforge.models.heads import Model
from lmforge.models.io import save_model
from lmforge.models.quantize import Int8Linear, Int8LMHead, int8_linear, quantize_int8, quantize_weight


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


def test_quantized_model_is_not_saved_and_not_quantized_twice(tmp_path):
    model = quantize_int8(Model(ModelConfig.preset("gpt-tiny", vocab_size=64)))
    with pytest.raises(ValueError, match="int8"):
        save_model(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()  # nothing half-written
    with pytest.raises(ValueError, match="already"):
        quantize_int8(model)
