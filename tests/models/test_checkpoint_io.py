"""lmforge's own format round-trips, and every kind of bad checkpoint gets a clear error."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmforge
from lmforge.config import ModelConfig
from lmforge.interop.hf import load_hf
from lmforge.models.heads import Model
from tests.conftest import tiny_hf


def _tiny(task="lm"):
    torch.manual_seed(0)
    return Model(ModelConfig.preset("gpt-tiny", task=task))


def test_save_load_round_trip(tmp_path):
    m = _tiny()
    lmforge.save(m, tmp_path / "m")
    back, tok = lmforge.load(tmp_path / "m")
    assert tok is None and back.cfg == m.cfg
    ids = torch.randint(0, 1000, (2, 8))
    assert torch.equal(m.eval()(ids), back(ids))


def test_truncated_safetensors(tmp_path):
    lmforge.save(_tiny(), tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        lmforge.load(tmp_path / "m")


def test_missing_and_unexpected_tensor(tmp_path):
    lmforge.save(_tiny(), tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    sd = load_file(w)
    del sd["backbone.decoder.layers.1.ff.up.weight"]
    sd["backbone.extra"] = torch.zeros(1)
    save_file(sd, w)
    with pytest.raises(ValueError, match="partial load.*missing 1.*ff.up.weight.*unexpected 1.*backbone.extra"):
        lmforge.load(tmp_path / "m")


def test_wrong_shape(tmp_path):
    lmforge.save(_tiny(), tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    sd = load_file(w)
    sd["backbone.tokens.weight"] = sd["backbone.tokens.weight"][:10]
    save_file(sd, w)
    with pytest.raises(ValueError, match=r"wrong shape: backbone.tokens.weight: checkpoint \(10, 64\)"):
        lmforge.load(tmp_path / "m")


def test_hf_missing_tensor_and_unsupported_architecture(tmp_path):
    tiny_hf("gpt2").save_pretrained(tmp_path / "hf")
    w = tmp_path / "hf" / "model.safetensors"
    sd = load_file(w)
    del sd["transformer.h.0.mlp.c_fc.weight"]
    save_file(sd, w)
    with pytest.raises(ValueError, match="missing 1.*ff.up.weight"):
        load_hf(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.update(architectures=["MambaForCausalLM"], model_type="mamba")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*Mamba"):
        lmforge.load(tmp_path / "hf")


def test_impossible_config_in_checkpoint(tmp_path):
    lmforge.save(_tiny(), tmp_path / "m")
    c = tmp_path / "m" / "config.json"
    d = json.loads(c.read_text())
    d["n_kv_heads"] = 3
    c.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="config.json.*n_kv_heads=3"):
        lmforge.load(tmp_path / "m")


def test_failed_save_keeps_previous_files(tmp_path, monkeypatch):
    m = _tiny()
    lmforge.save(m, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    import lmforge.models.io as io

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(io, "save_file", boom)
    with pytest.raises(OSError):
        lmforge.save(_tiny(), tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert not list((tmp_path / "m").glob(".*tmp"))


def test_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError):
        lmforge.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="not an lmforge or Hugging Face model"):
        lmforge.load(tmp_path)


def test_model_kind_says_what_a_path_holds(tmp_path):
    from lmforge.models.io import model_kind
    lmforge.save(_tiny(), tmp_path / "ours")
    assert model_kind(tmp_path / "ours") == "lmforge"
    tiny_hf("gpt2").save_pretrained(tmp_path / "theirs")
    assert model_kind(tmp_path / "theirs") == "hf"
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert model_kind(tmp_path / "m.gguf") == "gguf"
    assert model_kind(tmp_path / "missing") is None and model_kind(tmp_path) is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert model_kind(tmp_path / "bad") is None
