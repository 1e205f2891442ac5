"""Evaluation metrics: perplexity, classification, SQuAD, BLEU/chrF/ROUGE, correlation, retrieval.

Pure functions over Python lists, NumPy arrays or CPU tensors. Each follows a named
reference implementation and uses its scale: sacrebleu and the SQuAD script report
0-100, the others (sklearn, scipy, rouge_score, BEIR-style retrieval) report 0-1.
Every function rejects empty inputs and mismatched lengths with a ValueError.
"""

from __future__ import annotations

import math
import re
import string
import warnings
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def _check_pair(a: Sequence, b: Sequence, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} differ in length: {len(a)} != {len(b)}")
    if len(a) == 0:
        raise ValueError(f"{name_a} and {name_b} are empty")


def _as_list(x) -> list:
    return x.tolist() if hasattr(x, "tolist") else list(x)


# --- language modelling -------------------------------------------------------------------


def perplexity(mean_nll: float) -> float:
    """exp(mean negative log-likelihood per token, in nats); inf if it overflows.

    Reference: Jelinek et al. 1977; the same exp(loss) that HF's run_clm.py reports.
    """
    mean_nll = float(mean_nll)
    if math.isnan(mean_nll) or mean_nll < 0:
        raise ValueError(f"mean_nll must be a non-negative number, got {mean_nll}")
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


# --- classification -----------------------------------------------------------------------


def accuracy(preds: Sequence, labels: Sequence) -> float:
    """Fraction of predictions equal to their label, in [0, 1] (sklearn.metrics.accuracy_score)."""
    preds, labels = _as_list(preds), _as_list(labels)
    _check_pair(preds, labels, "preds", "labels")
    return sum(p == y for p, y in zip(preds, labels)) / len(labels)


def macro_f1(preds: Sequence, labels: Sequence, labels_set: Iterable[Hashable] | None = None) -> float:
    """Unweighted mean of per-class F1, in [0, 1].

    sklearn.metrics.f1_score(labels, preds, average="macro", zero_division=0): the classes
    are those seen in preds or labels, unless labels_set names them explicitly (a listed
    class that never occurs then counts with F1 = 0).
    """
    preds, labels = _as_list(preds), _as_list(labels)
    _check_pair(preds, labels, "preds", "labels")
    classes = set(labels) | set(preds) if labels_set is None else set(labels_set)
    if not classes:
        raise ValueError("labels_set is empty")
    tp, fp, fn = Counter(), Counter(), Counter()
    for p, y in zip(preds, labels):
        if p == y:
            tp[y] += 1
        else:
            fp[p] += 1
            fn[y] += 1
    # F1 = 2TP / (2TP + FP + FN), which equals 2PR / (P + R) and is 0 when TP = 0.
    f1s = [2 * tp[c] / d if (d := 2 * tp[c] + fp[c] + fn[c]) else 0.0 for c in classes]
    return sum(f1s) / len(f1s)


# --- SQuAD v1.1 (official evaluate-v1.1.py, Rajpurkar et al. 2016) --------------------------


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, strip ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_exact_match(pred: str, gold: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(gold))


def squad_f1(pred: str, gold: str) -> float:
    """Token-level F1 between the normalised answers (bag-of-words overlap), in [0, 1]."""
    pred_toks, gold_toks = normalize_answer(pred).split(), normalize_answer(gold).split()
    same = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def _squad_golds(dataset) -> dict[str, list[str]]:
    """Flatten the official SQuAD JSON ({"data": [...]} or its list) or pass an id -> golds dict."""
    if isinstance(dataset, Mapping) and isinstance(dataset.get("data"), list):
        dataset = dataset["data"]
    if isinstance(dataset, Mapping):
        return {qid: [g] if isinstance(g, str) else list(g) for qid, g in dataset.items()}
    return {
        qa["id"]: [a["text"] for a in qa["answers"]]
        for article in dataset
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    }


def squad_scores(predictions: Mapping[str, str], dataset) -> dict[str, float]:
    """{"exact_match", "f1"} in percent over every question of dataset, as evaluate-v1.1.py.

    dataset is the official JSON (dict with "data", or its list of articles) or a dict
    id -> list of gold answers. Each prediction scores its max over the golds; an
    unanswered question scores 0; predictions for unknown ids are ignored.
    """
    golds = _squad_golds(dataset)
    if not golds:
        raise ValueError("dataset has no questions")
    em = f1 = 0.0
    missing = 0
    for qid, answers in golds.items():
        if not answers:
            raise ValueError(f"question {qid!r} has no gold answers")
        if qid not in predictions:
            missing += 1
            continue
        pred = predictions[qid]
        em += max(squad_exact_match(pred, g) for g in answers)
        f1 += max(squad_f1(pred, g) for g in answers)
    if missing:
        warnings.warn(f"{missing} of {len(golds)} questions unanswered; they score 0", stacklevel=2)
    return {"exact_match": 100.0 * em / len(golds), "f1": 100.0 * f1 / len(golds)}


# --- generation: BLEU, chrF (sacrebleu, Post 2018), ROUGE (rouge_score, Lin 2004) -----------


@dataclass(frozen=True)
class CorpusScore:
    """A corpus-level score and the sacrebleu signature that makes it reproducible."""

    score: float
    signature: str

    def __float__(self) -> float:
        return self.score


def _ref_streams(hypotheses: Sequence[str], references) -> list[list[str]]:
    """sacrebleu's layout: a list of reference streams, each aligned with hypotheses."""
    if len(hypotheses) == 0:
        raise ValueError("hypotheses is empty")
    if len(references) == 0:
        raise ValueError("references is empty")
    streams = [list(references)] if isinstance(references[0], str) else [list(r) for r in references]
    for i, stream in enumerate(streams):
        if len(stream) != len(hypotheses):
            raise ValueError(
                f"hypotheses and reference stream {i} differ in length: {len(hypotheses)} != {len(stream)}"
            )
    return streams


def bleu(hypotheses: Sequence[str], references, **options) -> CorpusScore:
    """Corpus BLEU (Papineni et al. 2002) from sacrebleu, 0-100.

    references is one list of strings aligned with hypotheses, or a list of such
    streams (sacrebleu's layout). options go to sacrebleu.metrics.BLEU (tokenize=, ...).
    """
    from sacrebleu.metrics import BLEU

    metric = BLEU(**options)
    result = metric.corpus_score(list(hypotheses), _ref_streams(hypotheses, references))
    return CorpusScore(float(result.score), str(metric.get_signature()))


def chrf(hypotheses: Sequence[str], references, **options) -> CorpusScore:
    """Corpus chrF (Popović 2015) from sacrebleu, 0-100; word_order=2 gives chrF++.

    references as in `bleu`; options go to sacrebleu.metrics.CHRF.
    """
    from sacrebleu.metrics import CHRF

    metric = CHRF(**options)
    result = metric.corpus_score(list(hypotheses), _ref_streams(hypotheses, references))
    return CorpusScore(float(result.score), str(metric.get_signature()))


def rouge(hyps: Sequence[str], refs: Sequence, use_stemmer: bool = False) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures in [0, 1] from Google's `rouge_score` package.

    refs[i] is a reference string or a list of them (the best-scoring one counts, as
    rouge_score's score_multi does). Needs `pip install rouge-score`.
    """
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise ImportError("rouge() needs the optional package rouge_score: pip install rouge-score") from e
    _check_pair(hyps, refs, "hyps", "refs")
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=use_stemmer)
    totals = dict.fromkeys(keys, 0.0)
    for hyp, ref in zip(hyps, refs):
        scores = scorer.score(ref, hyp) if isinstance(ref, str) else scorer.score_multi(list(ref), hyp)
        for k in keys:
            totals[k] += scores[k].fmeasure
    return {k: v / len(hyps) for k, v in totals.items()}


# --- correlation (STS) ----------------------------------------------------------------------


def _vectors(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(_as_list(x), dtype=np.float64), np.asarray(_as_list(y), dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError(f"x and y must be 1-D, got shapes {x.shape} and {y.shape}")
    _check_pair(x, y, "x", "y")
    if len(x) < 2:
        raise ValueError("correlation needs at least 2 points")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite")
    return x, y


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    xm, ym = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((xm * xm).sum()) * float((ym * ym).sum()))
    if denom == 0:
        return math.nan  # a constant input: undefined, as scipy returns
    return max(-1.0, min(1.0, float((xm * ym).sum()) / denom))


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share their average rank (scipy.stats.rankdata 'average')."""
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    starts_group = np.r_[True, sorted_a[1:] != sorted_a[:-1]]
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], len(a)]  # exclusive
    ranks = np.empty(len(a))
    ranks[order] = ((starts + ends - 1) / 2 + 1)[group]
    return ranks


def pearson(x, y) -> float:
    """Pearson's r (scipy.stats.pearsonr statistic); nan if either input is constant."""
    return _pearson(*_vectors(x, y))


def spearman(x, y) -> float:
    """Spearman's rho: Pearson's r of average ranks (scipy.stats.spearmanr statistic)."""
    x, y = _vectors(x, y)
    return _pearson(_average_ranks(x), _average_ranks(y))


# --- retrieval (binary relevance; Järvelin & Kekäläinen 2002 for nDCG) -----------------------


def retrieval_metrics(
    ranked_ids: Sequence[Sequence[Hashable]], relevant: Sequence[set], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Mean recall@k, MRR@k and nDCG@k over queries, in [0, 1], for every k in ks.

    Per query: recall@k = |relevant ∩ top-k| / |relevant|; MRR@k = 1 / rank of the first
    relevant id within the top k, else 0; nDCG@k = sum over relevant hits of
    1 / log2(rank + 1), divided by the same sum over ranks 1..min(|relevant|, k).
    Keys are "recall@1", "mrr@10", "ndcg@10", ... (as BEIR / pytrec_eval compute them).
    """
    _check_pair(ranked_ids, relevant, "ranked_ids", "relevant")
    ks = sorted(set(ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    sums = {f"{m}@{k}": 0.0 for m in ("recall", "mrr", "ndcg") for k in ks}
    for q, (ranking, rel) in enumerate(zip(ranked_ids, relevant)):
        ranking, rel = list(ranking), set(rel)
        if not rel:
            raise ValueError(f"query {q} has no relevant ids")
        if len(set(ranking)) != len(ranking):
            raise ValueError(f"query {q} ranks the same id more than once")
        hits = [rank for rank, doc in enumerate(ranking[: ks[-1]], start=1) if doc in rel]
        for k in ks:
            hits_k = [r for r in hits if r <= k]
            sums[f"recall@{k}"] += len(hits_k) / len(rel)
            sums[f"mrr@{k}"] += 1.0 / hits_k[0] if hits_k else 0.0
            dcg = sum(1.0 / math.log2(r + 1) for r in hits_k)
            idcg = sum(1.0 / math.log2(r + 1) for r in range(1, min(len(rel), k) + 1))
            sums[f"ndcg@{k}"] += dcg / idcg
    return {key: total / len(ranked_ids) for key, total in sums.items()}
