"""LoRA: unchanged output at init, only adapters + head train, merged == adapted, plain state dict after merge."""

import pytest
import torch
import torch.nn as nn

from lmforge.config import ModelConfig
from lmforge.lora import LoRALinear, apply_lora, lora_parameters, merge_lora
from lmforge.models.heads import Model


def _model(preset="bert-tiny", **kw):
    torch.manual_seed(0)
    return Model(ModelConfig.preset(preset, **kw)).eval()


def _batch(vocab=1000):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _nudge(model):
    """Give every B matrix non-zero values, as training would."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(std=0.05)


def test_unchanged_at_init_and_only_adapters_and_head_train():
    model = _model(task="classify", num_labels=3)
    batch = _batch()
    ref = model(**batch)
    apply_lora(model, r=4, alpha=8, targets=("attn.q", "attn.v"))
    torch.testing.assert_close(model(**batch), ref, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    for n in trainable:
        assert "lora_" in n or n.startswith(("classifier.", "backbone.pooler.")), n
    n_layers = model.cfg.n_encoder_layers
    assert sum("lora_a" in n for n in trainable) == 2 * n_layers  # q and v of each layer
    counts = lora_parameters(model)
    assert counts["trainable"] < 0.2 * counts["total"]


def test_merged_equals_adapted_and_state_dict_is_plain():
    model = _model(task="qa")
    plain_keys = set(model.state_dict())
    batch = _batch()
    apply_lora(model, r=4, alpha=16, targets=("q", "k", "v", "o", "ff.up", "ff.down"))
    _nudge(model)
    adapted = model(**batch)
    assert not torch.allclose(adapted[0], _model(task="qa")(**batch)[0])
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == plain_keys
    for a, b in zip(model(**batch), adapted):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())


def test_seq2seq_cross_attention_and_gated_ff_targets():
    model = _model("t5-tiny")
    apply_lora(model, targets=("cross.q", "cross.v"))
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert names and all(".cross." in n for n in names)
    llama = _model("llama-tiny")
    apply_lora(llama, targets=("ff.gate",))
    assert all(n.endswith("ff.gate") for n, m in llama.named_modules() if isinstance(m, LoRALinear))


def test_only_adapters_get_gradients():
    model = _model(task="classify", num_labels=2)
    apply_lora(model, r=2, targets=("attn.v",))
    loss = model(**_batch()).sum()
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_bad_targets_and_double_apply():
    model = _model(task="classify")
    with pytest.raises(ValueError, match="unknown LoRA target"):
        apply_lora(model, targets=("attn.x",))
    with pytest.raises(ValueError, match="no linear layer"):
        apply_lora(model, targets=("ff.gate",))  # bert has no gated FF
    apply_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), r=0, alpha=1)
