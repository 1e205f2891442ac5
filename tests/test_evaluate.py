"""Metrics: hand-computed values, and the reference libraries where they are installed."""

import math
import sys

import numpy as np
import pytest
import sacrebleu
import torch

from lmforge.evaluate import (
    CorpusScore,
    accuracy,
    bleu,
    chrf,
    macro_f1,
    normalize_answer,
    pearson,
    perplexity,
    retrieval_metrics,
    rouge,
    spearman,
    squad_exact_match,
    squad_f1,
    squad_scores,
)

# sacrebleu's README example.
HYPS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REFS = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert perplexity(torch.tensor(math.log(7.0))) == pytest.approx(7.0)
    assert perplexity(1e6) == math.inf
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="mean_nll"):
            perplexity(bad)


def test_accuracy():
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert accuracy(torch.tensor([0, 1]), np.array([0, 1])) == 1.0
    assert accuracy(["a"], ["b"]) == 0.0


PREDS, GOLD = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]


def test_macro_f1_by_hand():
    # F1 per class = 2TP / (2TP + FP + FN): class 0 -> 2/4, class 1 -> 4/5, class 2 -> 0.
    assert macro_f1(PREDS, GOLD) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert macro_f1(PREDS, GOLD, labels_set=[0, 1, 2, 3]) == pytest.approx(1.3 / 4)
    assert macro_f1(["x", "y"], ["x", "y"]) == 1.0


def test_macro_f1_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(5):
        preds, gold = rng.integers(0, 6, 40).tolist(), rng.integers(0, 5, 40).tolist()
        ref = metrics.f1_score(gold, preds, average="macro", zero_division=0)
        assert macro_f1(preds, gold) == pytest.approx(ref, abs=1e-12)
        ref = metrics.f1_score(gold, preds, labels=list(range(8)), average="macro", zero_division=0)
        assert macro_f1(preds, gold, labels_set=range(8)) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("The  Cat!", "cat"),
        ("An apple, a day.", "apple day"),
        ("theater in the round", "theater in round"),  # only whole-word articles go
        ("A.B.C.", "abc"),
        ("  Denver\tBroncos\n", "denver broncos"),
        ("the the", ""),
        ("Hello—world", "hello—world"),  # only ASCII punctuation is stripped
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_squad_exact_match_and_f1():
    assert squad_exact_match("The Broncos!", "broncos") == 1.0
    assert squad_exact_match("Broncos", "Denver Broncos") == 0.0
    # pred {cat, sat, on, mat} vs gold {cat, on, mat}: P = 3/4, R = 1.
    assert squad_f1("the cat sat on the mat", "cat on a mat") == pytest.approx(6 / 7)
    assert squad_f1("b b x", "b c c") == pytest.approx(1 / 3)  # "b" overlaps once, not twice
    assert squad_f1("nothing", "else") == 0.0
    assert squad_f1("the", "cat") == 0.0  # empty after normalisation


def test_squad_scores_max_over_golds_and_unanswered():
    golds = {"q1": ["Denver Broncos", "The Broncos"], "q2": ["Santa Clara"], "q3": ["x"]}
    preds = {"q1": "Broncos", "q2": "Santa Clara, California", "unknown": "ignored"}
    with pytest.warns(UserWarning, match="1 of 3"):
        scores = squad_scores(preds, golds)
    # q1: EM 1, F1 1; q2: EM 0, F1 = 2 * (2/3) * 1 / (5/3) = 0.8; q3 unanswered: 0.
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(60.0)

    official = {
        "version": "1.1",
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {
                        "context": "...",
                        "qas": [
                            {"id": qid, "question": "?", "answers": [{"text": g, "answer_start": 0} for g in gs]}
                            for qid, gs in golds.items()
                        ],
                    }
                ],
            }
        ],
    }
    with pytest.warns(UserWarning):
        assert squad_scores(preds, official) == scores
    with pytest.warns(UserWarning):
        assert squad_scores(preds, official["data"]) == scores
    with pytest.raises(ValueError):
        squad_scores(preds, {})


def test_bleu_matches_sacrebleu_readme():
    result = bleu(HYPS, REFS)
    assert isinstance(result, CorpusScore)
    assert round(result.score, 2) == 48.53
    assert result.score == sacrebleu.corpus_bleu(HYPS, REFS).score
    assert "nrefs:2" in result.signature and "tok:13a" in result.signature
    assert float(result) == result.score
    one_stream = bleu(HYPS, REFS[0])
    assert one_stream.score == sacrebleu.corpus_bleu(HYPS, [REFS[0]]).score


def test_chrf_matches_sacrebleu():
    assert chrf(HYPS, REFS).score == sacrebleu.corpus_chrf(HYPS, REFS).score
    plus = chrf(HYPS, REFS, word_order=2)
    assert plus.score == sacrebleu.corpus_chrf(HYPS, REFS, word_order=2).score
    assert "nw:2" in plus.signature


def test_bleu_chrf_validate_lengths():
    with pytest.raises(ValueError, match="3 != 2"):
        bleu(HYPS, [REFS[0], REFS[1][:2]])
    with pytest.raises(ValueError, match="empty"):
        chrf([], [])


def test_rouge_without_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # makes the import fail
    with pytest.raises(ImportError, match="rouge-score"):
        rouge(["a"], ["a"])


def test_rouge_averages_f_measures_and_takes_best_reference(monkeypatch):
    """Runs without rouge_score: a stand-in scorer returns F = 1 on equal strings, else 0.5."""
    import types
    from collections import namedtuple

    Score = namedtuple("Score", "precision recall fmeasure")

    class FakeScorer:
        def __init__(self, types_, use_stemmer=False):
            self.types = types_

        def score(self, target, prediction):
            f = 1.0 if target == prediction else 0.5
            return {t: Score(f, f, f) for t in self.types}

        def score_multi(self, targets, prediction):
            return max((self.score(t, prediction) for t in targets), key=lambda s: s["rouge1"].fmeasure)

    package = types.ModuleType("rouge_score")
    package.rouge_scorer = types.SimpleNamespace(RougeScorer=FakeScorer)
    monkeypatch.setitem(sys.modules, "rouge_score", package)
    monkeypatch.setitem(sys.modules, "rouge_score.rouge_scorer", package.rouge_scorer)
    scores = rouge(["a", "b", "c"], ["a", ["x", "b"], "y"])
    assert scores == pytest.approx({"rouge1": 2.5 / 3, "rouge2": 2.5 / 3, "rougeL": 2.5 / 3})
    with pytest.raises(ValueError, match="3 != 2"):
        rouge(["a", "b", "c"], ["a", "b"])


def test_rouge_values():
    pytest.importorskip("rouge_score")
    scores = rouge(["the cat sat", "a b"], ["the cat sat", ["x y", "a b"]])
    assert scores == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    # hyp "the cat" vs ref "the cat sat": unigram P = 1, R = 2/3 -> F = 0.8.
    assert rouge(["the cat"], ["the cat sat"])["rouge1"] == pytest.approx(0.8)


def test_pearson_spearman_by_hand():
    # means 2.5 and 5; sum xy = 11, sum xx = 5, sum yy = 26.
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    # ranks with ties: x -> 1, 2.5, 2.5, 4; y -> 1, 3, 2, 4; r = 4.5 / sqrt(4.5 * 5).
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3], [10, 100, 1000]) == pytest.approx(1.0)
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), np.array([3, 2, 1])) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_pearson_spearman_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.integers(0, 5, 30).astype(float)  # many ties
        y = x + rng.normal(size=30)
        y[:6] = y[6:12]  # ties in y too
        assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


def test_correlation_validates():
    with pytest.raises(ValueError, match="3 != 2"):
        pearson([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="empty"):
        spearman([], [])
    with pytest.raises(ValueError, match="at least 2"):
        spearman([1], [1])
    with pytest.raises(ValueError, match="finite"):
        pearson([1, float("nan")], [1, 2])


def test_retrieval_metrics_by_hand():
    ranked = [["a", "b", "c", "d", "e", "f"], ["x", "y"]]
    relevant = [{"b", "e", "z"}, {"x"}]
    m = retrieval_metrics(ranked, relevant)
    # Query 1: hits at ranks 2 and 5 out of 3 relevant; query 2: hit at rank 1.
    assert m["recall@1"] == pytest.approx((0 + 1) / 2)
    assert m["recall@5"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["recall@10"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["mrr@1"] == pytest.approx(0.5)
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1) / 2)
    dcg = 1 / math.log2(3) + 1 / math.log2(6)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@10"] == pytest.approx((dcg / idcg + 1) / 2)
    assert m["ndcg@1"] == pytest.approx(0.5)
    assert m["ndcg@5"] == m["ndcg@10"]
    assert set(m) == {f"{n}@{k}" for n in ("recall", "mrr", "ndcg") for k in (1, 5, 10)}


def test_retrieval_ideal_dcg_caps_at_k_and_ignores_hits_past_k():
    # 3 relevant, k = 2: ideal DCG counts only 2 of them; the hit at rank 3 is outside top-2.
    m = retrieval_metrics([[1, 2, 3]], [{1, 3, 4}], ks=(2,))
    assert m["ndcg@2"] == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert m["recall@2"] == pytest.approx(1 / 3)
    assert retrieval_metrics([[7, 8]], [{9}], ks=(10,))["mrr@10"] == 0.0


def test_retrieval_metrics_validate():
    with pytest.raises(ValueError, match="2 != 1"):
        retrieval_metrics([[1], [2]], [{1}])
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics([], [])
    with pytest.raises(ValueError, match="no relevant"):
        retrieval_metrics([[1]], [set()])
    with pytest.raises(ValueError, match="more than once"):
        retrieval_metrics([[1, 1]], [{1}])


@pytest.mark.parametrize("fn", [accuracy, macro_f1])
def test_classification_validates(fn):
    with pytest.raises(ValueError, match="3 != 2"):
        fn([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])


def test_rouge_values_with_the_real_package():
    pytest.importorskip("rouge_score")
    r = rouge(["the cat sat on the mat"], ["the cat is on the mat"])
    # 5 of 6 unigrams, 3 of 5 bigrams, LCS "the cat on the mat" of 6
    assert r["rouge1"] == pytest.approx(5 / 6) and r["rouge2"] == pytest.approx(0.6)
    assert r["rougeL"] == pytest.approx(5 / 6)
