import pytest
import torch

from lmforge.config import PRESETS, ModelConfig
from lmforge.models.heads import Model

PUBLISHED = {  # parameter counts of the published models
    "bert-base": 109_482_240,    # BertModel with pooler
    "gpt2": 124_439_808,         # GPT2LMHeadModel, tied head
    "t5-small": 60_506_624,      # T5ForConditionalGeneration, tied head
    "llama-small": 134_515_008,  # SmolLM2-135M (Llama: RoPE, RMSNorm, SwiGLU, GQA 9/3)
    "transformer-base": 63_082_496,  # the paper's base model with a shared 37k vocab (paper: "65M")
    "bart-base": 139_420_416 + 50_265,  # BartModel + final-logits bias (a buffer in HF, trainable here)
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts(name):
    with torch.device("meta"):
        model = Model(ModelConfig.preset(name))
    assert model.num_parameters() == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_round_trip(tmp_path, name):
    cfg = ModelConfig.preset(name)
    for suffix in (".json", ".yaml"):
        cfg.save(tmp_path / f"c{suffix}")
        assert ModelConfig.load(tmp_path / f"c{suffix}") == cfg


@pytest.mark.parametrize("bad,field", [
    (dict(d_model=100, n_heads=3), "d_model"),
    (dict(n_heads=8, n_kv_heads=3), "n_kv_heads"),
    (dict(norm="batchnorm"), "norm"),
    (dict(position="alibi"), "position"),
    (dict(activation="tanh"), "activation"),
    (dict(family="encoder", n_encoder_layers=0, n_decoder_layers=2), "family"),
    (dict(family="decoder", task="mlm"), "task"),
    (dict(dropout=1.5), "dropout"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(task="classify", num_labels=2, labels=["a"]), "labels"),
])
def test_impossible_configs_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**bad)


def test_unknown_field_and_preset():
    with pytest.raises(ValueError, match="d_modle"):
        ModelConfig.from_dict({"d_modle": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("gpt5")


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        ModelConfig.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        ModelConfig.load(tmp_path / "bad.json")
    (tmp_path / "wrong.json").write_text('{"d_model": 30, "n_heads": 4}')
    with pytest.raises(ValueError, match="wrong.json.*d_model=30"):
        ModelConfig.load(tmp_path / "wrong.json")
