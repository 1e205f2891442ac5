"""Extractive question answering (SQuAD v1.1): JSON → windowed features → best spans → EM/F1.

Each question is encoded with its context as a pair `[CLS] question [SEP] context [SEP]`.
A context longer than the window is split into overlapping windows (`max_len` tokens,
`doc_stride` tokens of overlap, as HF's run_qa.py), each repeating the question. The
answer's character span maps through the tokenizer's offsets to the token span of each
window that contains it whole, else to the [CLS] index 0 (Devlin et al. 2019, §4.2).
At prediction the best span over all windows of a question is read back from the
original context through the offsets.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer

from lmforge.data.corpus import jsonl_rows, pad_batch
from lmforge.evaluate import squad_scores
from lmforge.interop.load import load_with_tokenizer
from lmforge.objectives import get_objective
from lmforge.tasks.classify import length_batches
from lmforge.tasks.options import Options, Prepared, Task, input_texts, is_file
from lmforge.tokenizer import Tokenizer


@dataclass
class Question:
    id: str
    question: str
    context: str
    answers: list[str]
    answer_start: int | None = None  # of the first answer; None for unlabelled questions


@dataclass
class Feature:
    """One window of one question. offsets[i] is the (start, end) character span of token i in
    the context, or None for question and special tokens."""
    qid: str
    ids: list[int]
    type_ids: list[int]
    offsets: list[tuple[int, int] | None]
    start: int = 0  # answer token span in this window; 0, 0 ([CLS]) when not inside
    end: int = 0


def read_squad(path: str | Path, limit: int | None = None) -> list[Question]:
    """Questions of a SQuAD v1.1 JSON file (first `limit` only). Each answer must be found at its
    `answer_start` in the context, else a ValueError names the question id."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    raw = path.read_bytes()  # a .json file is read whole (SQuAD's train set is one line of 30 MB)
    if not raw.strip():
        raise ValueError(f"{path}: empty file")
    if (nul := raw.find(b"\0")) >= 0:
        raise ValueError(f"{path} looks binary: NUL byte at byte offset {nul}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8: byte offset {e.start}; save it as UTF-8") from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{path}: not SQuAD JSON (expected an object with a 'data' list of articles)")
    return squad_questions(data, str(path), limit)


def squad_questions(data: dict, source: str = "<squad>", limit: int | None = None) -> list[Question]:
    """Questions of an already loaded SQuAD dict; answers are checked against their contexts. A
    missing field or one of the wrong type is an error naming `source` and the field."""
    try:
        return _squad_questions(data, source, limit)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{source}: not SQuAD JSON: missing or malformed field {e}") from None


def _squad_questions(data: dict, source: str, limit: int | None) -> list[Question]:
    out = []
    for article in data["data"]:
        for para in article["paragraphs"]:
            context = para["context"]
            for qa in para["qas"]:
                if limit is not None and len(out) >= limit:
                    return out
                qid = qa.get("id", f"#{len(out)}")
                if not qa.get("question", "").strip():
                    raise ValueError(f"{source}: question {qid!r} is empty")
                answers, start = [], None
                for a in qa.get("answers", []):
                    s, text = a["answer_start"], a["text"]
                    if context[s:s + len(text)] != text:
                        raise ValueError(f"{source}: question {qid!r}: answer {text!r} is not at answer_start={s} "
                                         f"in its context (found {context[s:s + len(text)]!r})")
                    answers.append(text)
                    start = s if start is None else start
                out.append(Question(qid, qa["question"], context, answers, start))
    if not out:
        raise ValueError(f"{source}: no questions")
    return out


# ---- features ------------------------------------------------------------------------------
def _window_tokenizer(tok: Tokenizer, max_len: int, doc_stride: int) -> HFTokenizer:
    """A copy of the tokenizer that cuts only the context into overlapping windows."""
    hf = HFTokenizer.from_str(tok.hf.to_str())
    hf.no_padding()
    hf.enable_truncation(max_len, stride=doc_stride, strategy="only_second")
    return hf


def _short_question(tok: Tokenizer, question: str, max_query_len: int) -> str:
    """The question cut to its first max_query_len tokens (cut in the text, at a token end)."""
    enc = tok.hf.encode(question.strip(), add_special_tokens=False)
    return question.strip() if len(enc.ids) <= max_query_len else question.strip()[:enc.offsets[max_query_len - 1][1]]


def answer_tokens(offsets: Sequence[tuple[int, int] | None], start_char: int, end_char: int) -> tuple[int, int]:
    """Token span (first, last) of context characters [start_char, end_char) in one window, or
    (0, 0) when the window does not contain the whole answer."""
    ctx = [i for i, o in enumerate(offsets) if o is not None]
    if not ctx or offsets[ctx[0]][0] > start_char or offsets[ctx[-1]][1] < end_char:
        return 0, 0
    first = next(i for i in ctx if offsets[i][1] > start_char)  # token holding the first answer character
    last = next(i for i in reversed(ctx) if offsets[i][0] < end_char)
    return first, max(first, last)


def make_features(tok: Tokenizer, questions: Sequence[Question], max_len: int = 384, doc_stride: int = 128,
                  max_query_len: int = 64, labelled: bool = True) -> list[Feature]:
    """Windows of every question (labelled: with the answer's token span, else 0, 0)."""
    if doc_stride >= max_len // 2:
        raise ValueError(f"doc_stride={doc_stride} (the overlap between windows) must be < max_len/2={max_len // 2}")
    if tok.pad_id is None:
        raise ValueError("the tokenizer has no pad token")
    hf = _window_tokenizer(tok, max_len, doc_stride)
    queries = [_short_question(tok, q.question, max_query_len) for q in questions]
    encs = hf.encode_batch(list(zip(queries, [q.context for q in questions])))
    feats = []
    for q, enc in zip(questions, encs):
        for w in [enc] + enc.overflowing:
            offsets = [o if s == 1 else None for o, s in zip(w.offsets, w.sequence_ids)]
            f = Feature(q.id, w.ids, w.type_ids, offsets)
            if labelled and q.answers:
                f.start, f.end = answer_tokens(offsets, q.answer_start, q.answer_start + len(q.answers[0]))
            feats.append(f)
    return feats


def span_text(context: str, offsets: Sequence[tuple[int, int] | None], start: int, end: int) -> str:
    """The context text covered by tokens start..end (inclusive)."""
    return context[offsets[start][0]:offsets[end][1]]


def qa_batches(features: Sequence[Feature], pad_id: int, batch_size: int, shuffle: bool = False, seed: int = 0,
               epochs: int | None = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Batches {input_ids, attention_mask, token_type_ids, start_positions, end_positions};
    epochs=None repeats forever."""
    epoch = 0
    while epochs is None or epoch < epochs:
        for idx in length_batches([len(f.ids) for f in features], batch_size, shuffle, seed + epoch):
            yield _collate([features[i] for i in idx], pad_id)
        epoch += 1


def _collate(feats: Sequence[Feature], pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = pad_batch([f.ids for f in feats], pad_id)
    types, _ = pad_batch([f.type_ids for f in feats], 0)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
            "start_positions": torch.tensor([f.start for f in feats]),
            "end_positions": torch.tensor([f.end for f in feats])}


# ---- decoding --------------------------------------------------------------------------------
def best_spans(start_logits: torch.Tensor, end_logits: torch.Tensor, context_mask: torch.Tensor,
               max_answer_length: int = 30, n_best: int = 20) -> list[tuple[float, int, int]]:
    """The n_best (score, start, end) spans of one window with start and end on context tokens,
    start <= end < start + max_answer_length; score = start logit + end logit."""
    s, e, m = start_logits.float(), end_logits.float(), context_mask.bool()
    # top n_best starts and ends, as BERT's run_squad.py; then every valid pair among them
    k = min(n_best, int(m.sum()))
    if k == 0:
        return []
    neg = torch.finfo(torch.float32).min
    si = s.masked_fill(~m, neg).topk(k).indices
    ei = e.masked_fill(~m, neg).topk(k).indices
    length = ei[None, :] - si[:, None]  # (k, k)
    ok = (length >= 0) & (length < max_answer_length)
    scores = (s[si][:, None] + e[ei][None, :]).masked_fill(~ok, float("-inf"))
    flat = scores.flatten()  # (k*k,)
    top = flat.topk(min(n_best, int(ok.sum()))).indices
    return [(float(flat[i]), int(si[i // k]), int(ei[i % k])) for i in top]


@torch.no_grad()
def predict_features(model, features: Sequence[Feature], contexts: dict[str, str], pad_id: int,
                     batch_size: int = 32, max_answer_length: int = 30,
                     n_best: int = 20) -> dict[str, list[tuple[float, str]]]:
    """qid → [(score, answer text)], best first, over all windows of each question."""
    if model.cfg.task != "qa":
        raise ValueError(f"the model's task is {model.cfg.task!r}, not 'qa'")
    model.eval()
    cands: dict[str, list[tuple[float, str]]] = {f.qid: [] for f in features}
    for idx in length_batches([len(f.ids) for f in features], batch_size):
        feats = [features[i] for i in idx]
        batch = _collate(feats, pad_id)
        batch.pop("start_positions"), batch.pop("end_positions")
        start, end = model(**batch)  # (B, T) each
        for f, s, e in zip(feats, start, end):
            mask = torch.tensor([o is not None for o in f.offsets])
            n = len(f.ids)
            for score, i, j in best_spans(s[:n], e[:n], mask, max_answer_length, n_best):
                cands[f.qid].append((score, span_text(contexts[f.qid], f.offsets, i, j)))
    return {qid: sorted(c, key=lambda x: -x[0]) for qid, c in cands.items()}


def predict_qa(model, tok: Tokenizer, questions: Sequence[Question], max_len: int = 384, doc_stride: int = 128,
               batch_size: int = 32, max_answer_length: int = 30) -> dict[str, str]:
    """qid → best answer text (empty when no window yields a valid span)."""
    feats = make_features(tok, questions, max_len, doc_stride, labelled=False)
    cands = predict_features(model, feats, {q.id: q.context for q in questions}, tok.pad_id, batch_size,
                             max_answer_length)
    return {q.id: (cands[q.id][0][1] if cands[q.id] else "") for q in questions}


def answer(model, tok: Tokenizer, question: str, context: str, n_best: int = 1, max_len: int = 384,
           doc_stride: int = 128, max_answer_length: int = 30) -> list[tuple[str, float]]:
    """The n_best answers to one question about one context: [(text, score)]."""
    q = Question("q", question, context, [])
    feats = make_features(tok, [q], max_len, doc_stride, labelled=False)
    cands = predict_features(model, feats, {"q": context}, tok.pad_id, max_answer_length=max_answer_length,
                             n_best=max(n_best, 20))["q"]
    seen, out = set(), []
    for score, text in cands:
        if text not in seen:
            seen.add(text)
            out.append((text, score))
    return out[:n_best]


def eval_qa(model, tok: Tokenizer, data: str | Path | Sequence[Question], max_len: int = 384,
            doc_stride: int = 128, batch_size: int = 32, max_answer_length: int = 30) -> dict[str, float]:
    """{exact_match, f1} in percent (the official SQuAD v1.1 metric) on a file or questions."""
    questions = read_squad(data) if isinstance(data, (str, Path)) else list(data)
    preds = predict_qa(model, tok, questions, max_len, doc_stride, batch_size, max_answer_length)
    return {**squad_scores(preds, {q.id: q.answers for q in questions}), "questions": len(questions)}



# ---- the task for lmforge.tasks.finetune -------------------------------------------------------------
def _build(model_dir, train_file, valid_file, opts: Options) -> Prepared:
    model, tok = load_with_tokenizer(model_dir, task="qa")
    kw = dict(max_len=opts.max_len, doc_stride=opts.doc_stride, max_query_len=opts.max_query_len)
    train = make_features(tok, read_squad(train_file, limit=opts.limit), **kw)
    valid = read_squad(valid_file, limit=opts.valid_limit) if valid_file else None
    vfeats = make_features(tok, valid, **kw) if valid else []
    return Prepared(model, tok, get_objective("span_qa"), len(train),
                    lambda bs, seed: qa_batches(train, tok.pad_id, bs, shuffle=True, seed=seed, epochs=None),
                    list(qa_batches(vfeats, tok.pad_id, opts.eval_batch_size)) if vfeats else [],
                    lambda m: eval_qa(m, tok, valid, opts.max_len, opts.doc_stride, opts.eval_batch_size,
                                      opts.max_answer_length) if valid else {})


def _evaluate(model, tok: Tokenizer, data_file, opts: Options) -> dict[str, float]:
    return eval_qa(model, tok, read_squad(data_file, limit=opts.limit), opts.max_len, opts.doc_stride,
                   opts.eval_batch_size, opts.max_answer_length)


def _questions(inputs, context: str | None) -> list[Question]:
    """A SQuAD .json file, a .jsonl file of {question, context}, or question text(s) with `context`."""
    if is_file(inputs, ".json"):
        return read_squad(inputs)
    if is_file(inputs, ".jsonl"):
        out = []
        for n, row in jsonl_rows(inputs):
            if not isinstance(row.get("question"), str) or not isinstance(row.get("context"), str):
                raise ValueError(f"{inputs}:{n}: expected a JSON object with 'question' and 'context'")
            out.append(Question(str(row.get("id", n)), row["question"], row["context"], []))
        return out
    if context is None:
        raise ValueError("qa prediction needs a context: pass context=TEXT, or a .json/.jsonl file")
    return [Question(str(i), q, context, []) for i, q in enumerate(input_texts(inputs))]


def _predict(model, tok: Tokenizer, inputs, context: str | None, opts: Options) -> list[dict]:
    questions = _questions(inputs, context)
    answers = predict_qa(model, tok, questions, opts.max_len, opts.doc_stride, opts.eval_batch_size,
                         opts.max_answer_length)
    return [{"id": q.id, "question": q.question, "answer": answers[q.id]} for q in questions]


TASK = Task(build=_build, evaluate=_evaluate, predict=_predict)
