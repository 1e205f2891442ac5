"""finetune / evaluate_task / predict_task end to end on tiny models: each task lowers its
validation loss through the one training loop, saves a plain checkpoint and evaluates it."""

import json
import random

import pytest
import torch

from lmforge import api
from lmforge.config import ModelConfig
from lmforge.models.heads import Model
from lmforge.tasks.finetune import coerce_options, evaluate_task, finetune, predict_task
from lmforge.tokenizer import train_tokenizer_from_iterator

POS, NEG = "good great fine lovely superb".split(), "bad awful poor dull boring".split()
FILL = "the movie film plot acting was is very quite a this".split()
NAMES = "anna bert carl dora emil fritz greta hans ida jonas".split()


def _sentence(rng, words):
    return " ".join(rng.sample(FILL, 3) + [rng.choice(words)] + rng.sample(FILL, 2))


def _encoder_dir(tmp_path, texts, **cfg):
    """A fresh bert-tiny with a wordpiece tokenizer trained on `texts`, saved like any checkpoint."""
    tok = train_tokenizer_from_iterator(texts, "wordpiece", 300, family="encoder", min_frequency=1)
    torch.manual_seed(0)
    model = Model(ModelConfig.preset("bert-tiny", vocab_size=tok.vocab_size, task="embed", **cfg))
    return api.save(model, tmp_path / "base", tokenizer=tok)


def _valid_loss(objective, model_dir, batches_fn, **load):
    model, tok = api.load(model_dir, **load)
    with torch.no_grad():
        losses = [objective(model, b)[0].item() for b in batches_fn(tok)]
    return sum(losses) / len(losses)


@pytest.fixture
def sentiment(tmp_path):
    rng = random.Random(0)
    for name, n in (("train", 400), ("dev", 60)):
        rows = [(_sentence(rng, POS), "positive") if i % 2 else (_sentence(rng, NEG), "negative") for i in range(n)]
        (tmp_path / f"{name}.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    base = _encoder_dir(tmp_path, POS + NEG + FILL)
    return tmp_path, base


def _classify_valid_loss(model_dir, dev, labels=None):
    from lmforge.objectives import classification
    from lmforge.tasks.classify import ClassifyData, read_classify
    ex = read_classify(dev)
    load = {"task": "classify", "num_labels": 2, "labels": labels} if labels else {}
    return _valid_loss(classification, model_dir,
                       lambda tok: ClassifyData(ex, tok, labels or ["negative", "positive"], 32).batches(30), **load)


def test_classify_finetune_improves_and_saves_labels(sentiment):
    d, base = sentiment
    before = _classify_valid_loss(base, d / "dev.tsv", labels=["negative", "positive"])
    m = finetune("classify", base, d / "train.tsv", d / "dev.tsv", d / "out", steps=60, batch_size=16, lr=2e-3,
                 max_len=32, log_every=1000)
    after = _classify_valid_loss(d / "out", d / "dev.tsv")
    assert after < before * 0.7, (before, after)
    assert m["accuracy"] >= 0.9 and {"macro_f1", "steps", "seconds", "valid_loss_start"} <= set(m)
    assert json.loads((d / "out" / "metrics.json").read_text())["accuracy"] == m["accuracy"]
    model, _ = api.load(d / "out")
    assert model.cfg.task == "classify" and model.cfg.labels == ["negative", "positive"]
    assert evaluate_task("classify", d / "out", d / "dev.tsv")["accuracy"] == pytest.approx(m["accuracy"])
    (pred,) = predict_task("classify", d / "out", "the film was superb")
    assert pred["label"] == "positive" and set(pred["probs"]) == {"negative", "positive"}
    preds = predict_task("classify", d / "out", d / "dev.tsv")  # a labelled file: its text column
    assert len(preds) == 60 and preds[0]["text"] != "sentence"


def test_classify_lora_checkpoint_is_plain(sentiment):
    d, base = sentiment
    m = finetune("classify", base, d / "train.tsv", d / "dev.tsv", d / "lora", steps=60, batch_size=16, lr=5e-3,
                 max_len=32, lora="true", lora_r="4", lora_targets="q,v", log_every=1000)
    assert m["lora_parameters"] > 0
    tuned, _ = api.load(d / "lora")  # a plain state dict: no adapter tensors
    orig, _ = api.load(base)
    t_sd, o_sd = tuned.state_dict(), orig.state_dict()
    assert not any("lora" in k for k in t_sd)
    for k, v in o_sd.items():  # frozen weights are untouched; merged q/v weights and the head moved
        if not k.startswith("backbone.pooler."):
            assert (not torch.equal(v, t_sd[k])) == k.endswith(("attn.q.weight", "attn.v.weight")), k
    assert _classify_valid_loss(d / "lora", d / "dev.tsv") < _classify_valid_loss(
        base, d / "dev.tsv", labels=["negative", "positive"])


def _squad_file(path, rng, n):
    data = []
    for i in range(n):
        name = rng.choice(NAMES)
        words, k = rng.sample(FILL * 3, 12), rng.randint(1, 10)  # the answer moves: no position shortcut
        context = " ".join(words[:k]) + f" and {name} wrote it . " + " ".join(words[k:])
        start = context.index(f" {name} ") + 1
        data.append({"title": f"a{i}", "paragraphs": [{"context": context, "qas": [
            {"id": f"q{i}", "question": "who wrote it ?", "answers": [{"text": name, "answer_start": start}]}]}]})
    path.write_text(json.dumps({"version": "1.1", "data": data}))
    return path


def test_qa_finetune_improves(tmp_path):
    from lmforge.objectives import span_qa
    from lmforge.tasks.qa import make_features, qa_batches, read_squad
    rng = random.Random(0)
    train, dev = _squad_file(tmp_path / "train.json", rng, 300), _squad_file(tmp_path / "dev.json", rng, 40)
    base = _encoder_dir(tmp_path, NAMES + FILL + ["who wrote it and ?"])

    def loss(model_dir, **load):
        return _valid_loss(span_qa, model_dir, lambda tok: qa_batches(
            make_features(tok, read_squad(dev), max_len=48, doc_stride=8), tok.pad_id, 20), **load)

    before = loss(base, task="qa")
    m = finetune("qa", base, train, dev, tmp_path / "out", steps=80, batch_size=16, lr=3e-3, max_len=48,
                 doc_stride=8, log_every=1000)
    after = loss(tmp_path / "out")
    assert after < before * 0.7, (before, after)
    assert {"exact_match", "f1"} <= set(m) and m["f1"] > 30
    (p,) = predict_task("qa", tmp_path / "out", "who wrote it ?", context="the film was quite a plot and greta wrote it . very")
    assert p["answer"] == "greta", (m, p)


def test_seq2seq_from_preset_improves(tmp_path):
    rng = random.Random(0)
    vocab = FILL + NAMES
    for name, n in (("train", 300), ("val", 30)):
        src = [" ".join(rng.choices(vocab, k=rng.randint(2, 5))) for _ in range(n)]
        (tmp_path / f"{name}.en").write_text("\n".join(src) + "\n")
        (tmp_path / f"{name}.de").write_text("\n".join(s.upper() for s in src) + "\n")  # a word-for-word "translation"
    tiny = {"model.d_model": 64, "model.n_heads": 4, "model.d_ff": 128, "model.n_encoder_layers": 2,
            "model.n_decoder_layers": 2, "model.max_len": 64, "model.dropout": 0.0}

    m = finetune("seq2seq", "preset:transformer-tiny", tmp_path / "train", tmp_path / "val", tmp_path / "s1",
                 src_lang="en", tgt_lang="de", vocab_size=400, batch_size=32, lr=3e-3, max_len=64, num_beams=2,
                 steps=150, log_every=1000, **tiny)
    assert m["valid_loss"] < 0.5 * m["valid_loss_start"], m  # the loop's validation loss, before and after
    assert {"bleu", "chrf"} <= set(m) and m["bleu"] > 5 and m["chrf"] > 20
    model, tok = api.load(tmp_path / "s1")
    assert model.cfg.position == "sinusoidal" and model.cfg.d_model == 64 and tok.vocab_size <= 400
    out = predict_task("seq2seq", tmp_path / "s1", ["anna wrote the plot"], num_beams="2")
    assert out[0]["source"] == "anna wrote the plot" and isinstance(out[0]["translation"], str)
    e = evaluate_task("seq2seq", tmp_path / "s1", str(tmp_path / "val.en") + "," + str(tmp_path / "val.de"),
                      num_beams=2)
    assert e["bleu"] == pytest.approx(m["bleu"])


def test_options_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown option 'learning_rate'"):
        coerce_options("classify", {"learning_rate": "1e-4"})
    with pytest.raises(ValueError, match="option steps='ten'"):
        coerce_options("qa", {"steps": "ten"})
    with pytest.raises(ValueError, match="task='ner'"):
        coerce_options("ner", {})
    with pytest.raises(ValueError, match="must be > 0"):
        coerce_options("classify", {"lr": "0"})
    with pytest.raises(ValueError, match="needs a context"):
        predict_task("qa", _encoder_dir(tmp_path, FILL), "who?")


def test_options_use_the_one_typed_parser():
    """Command-line text becomes the declared type; a string option keeps the text as typed."""
    from lmforge.cli import _overrides
    opts = coerce_options("classify", _overrides(["lr=3e-5", "max-minutes=none", "lora=yes", "text_field=yes",
                                                  "model.dropout=0.2", "steps=1e2"]))
    assert (opts.lr, opts.max_minutes, opts.lora, opts.text_field, opts.steps) == (3e-5, None, True, "yes", 100)
    assert opts.model == {"dropout": 0.2}
    with pytest.raises(ValueError, match="option model.d_model='big': expected int"):
        coerce_options("classify", {"model.d_model": "big"})
    with pytest.raises(ValueError, match="override 'lr': expected key=value"):
        _overrides(["lr"])
