"""Classification data: TSV/CSV/JSONL reading, label names, batches, prediction, metrics and bad-input errors."""

import json

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.evaluate import accuracy, macro_f1
from lmforge.models.heads import Model
from lmforge.tasks.classify import (ClassifyData, encode_texts, eval_classify, label_names, predict_classify,
                                    read_classify)
from lmforge.tokenizer import train_tokenizer_from_iterator

WORDS = "good great fine bad awful poor movie film plot acting the a was is very not".split()


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer_from_iterator([" ".join(WORDS)] * 20, "wordpiece", 200, family="encoder")


def _model(tok, labels=("negative", "positive")):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("bert-tiny", vocab_size=tok.vocab_size, task="classify", num_labels=len(labels),
                             labels=list(labels))
    return Model(cfg).eval()


def test_read_tsv_csv_jsonl(tmp_path):
    (tmp_path / "a.tsv").write_text('sentence\tlabel\nit \'s "good" \t1\n\nbad film \t0\n')
    ex = read_classify(tmp_path / "a.tsv")
    assert [(e.text, e.label) for e in ex] == [("it 's \"good\"", "1"), ("bad film", "0")]
    assert ex[1].where.endswith("a.tsv:4")
    (tmp_path / "b.csv").write_text('text,hypothesis,label\n"a, b",c,yes\nd,e,no\n')
    ex = read_classify(tmp_path / "b.csv", pair_field="hypothesis")
    assert [(e.text, e.pair, e.label) for e in ex] == [("a, b", "c", "yes"), ("d", "e", "no")]
    (tmp_path / "c.jsonl").write_text(json.dumps({"review": "fine", "y": 2}) + "\n" + json.dumps({"review": "x", "y": 10}))
    ex = read_classify(tmp_path / "c.jsonl", text_field="review", label_field="y")
    assert [e.label for e in ex] == ["2", "10"] and label_names(ex) == ["2", "10"]  # numeric order
    assert label_names(read_classify(tmp_path / "b.csv")) == ["no", "yes"]


def test_errors_name_file_and_line(tmp_path, tok):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tstars\ngood\t1\n")
    with pytest.raises(ValueError, match=r"bad.tsv:2: missing column\(s\) \['label'\]"):
        read_classify(bad)
    bad.write_text("review\tlabel\ngood\t1\n")
    with pytest.raises(ValueError, match=r"bad.tsv:2: no text column"):
        read_classify(bad)
    bad.write_text("sentence\tlabel\ngood\t1\n  \t0\n")
    with pytest.raises(ValueError, match=r"bad.tsv:3: empty text"):
        read_classify(bad)
    bad.write_text("sentence\tlabel\ngood\t1\nbad\t0\textra\n")
    with pytest.raises(ValueError, match=r"bad.tsv:3: 3 fields"):
        read_classify(bad)
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "good", "label": "positive"}\n{"text": "meh", "label": "neutral"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: unknown label 'neutral'"):
        eval_classify(_model(tok), tok, jl)
    with pytest.raises(ValueError, match="empty"):
        predict_classify(_model(tok), tok, ["good", " "])


def test_batches_and_truncation(tok):
    ex = read_classify_examples()
    ds = ClassifyData(ex, tok, label_names(ex), max_len=6)
    batches = list(ds.batches(batch_size=2, shuffle=True, seed=1, epochs=2))
    assert len(batches) == 4
    b = batches[0]
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert b["input_ids"].shape == b["attention_mask"].shape == b["token_type_ids"].shape
    assert b["input_ids"].shape[1] <= 6 and b["labels"].shape == (2,)
    assert (b["input_ids"][:, 0] == tok.cls_id).all()
    seen = torch.cat([x["labels"] for x in batches[:2]]).sort().values.tolist()
    assert seen == sorted(ds.label_ids)  # one epoch covers every example once
    (ids, types), = encode_texts(tok, ["good " * 10], ["bad bad"], max_len=9)
    assert len(ids) == 9 and ids.count(tok.sep_id) == 2 and types[-3:] == [1, 1, 1]  # longest first keeps the pair


def read_classify_examples():
    from lmforge.tasks.classify import Example
    return [Example("good movie", "1"), Example("bad film", "0"), Example("very very good acting", "1"),
            Example("not great", "0")]


def test_predict_and_eval_match_metrics(tmp_path, tok):
    model = _model(tok)
    texts = ["good movie", "bad film", "the plot was not good at all", "fine"]
    preds = predict_classify(model, tok, texts)
    assert len(preds) == 4
    for label, probs in preds:
        assert set(probs) == {"negative", "positive"} and abs(sum(probs.values()) - 1) < 1e-5
        assert label == max(probs, key=probs.get)
    gold = ["positive", "negative", "negative", "positive"]
    f = tmp_path / "dev.tsv"
    f.write_text("sentence\tlabel\n" + "".join(f"{t}\t{g}\n" for t, g in zip(texts, gold)))
    m = eval_classify(model, tok, f)
    pred_labels = [p[0] for p in preds]
    assert m["accuracy"] == pytest.approx(accuracy(pred_labels, gold))
    assert m["macro_f1"] == pytest.approx(macro_f1(pred_labels, gold))
    # batching (and its padding) does not change predictions
    one = [predict_classify(model, tok, [t])[0] for t in texts]
    for (l1, p1), (l2, p2) in zip(one, preds):
        assert l1 == l2 and p1["positive"] == pytest.approx(p2["positive"], abs=1e-5)
