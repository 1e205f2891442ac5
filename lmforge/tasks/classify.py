"""Text classification: labelled TSV/CSV/JSONL files → padded batches → predictions and accuracy/macro-F1.

A file has one example per row: a text column (default `sentence`, else `text`), an
optional second text column for sentence pairs (`pair_field`), and a label column
(default `label`). Labels are kept as strings; their names, collected from the
training file, go into the checkpoint config (`ModelConfig.labels`) so that a
fine-tuned model predicts names, not indices.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.data.corpus import jsonl_rows, pad_batch, text_lines
from lmforge.evaluate import accuracy, macro_f1
from lmforge.interop.load import load_with_tokenizer
from lmforge.objectives import get_objective
from lmforge.tasks.options import Options, Prepared, Task, input_texts, is_file
from lmforge.tokenizer import Tokenizer

DEFAULT_TEXT_FIELDS = ("sentence", "text")


@dataclass
class Example:
    text: str
    label: str | None
    pair: str | None = None
    where: str = ""  # "file:line", for error messages


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row dict) for a .tsv/.csv file with a header line, or a .jsonl file."""
    if path.suffix == ".jsonl":
        yield from jsonl_rows(path)
        return
    if path.suffix not in (".tsv", ".csv"):
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected .tsv, .csv or .jsonl")
    lines = text_lines(path)  # binary, non-UTF-8 and overlong lines fail here, naming the line
    # TSV: split on tabs with no quoting (SST-2 and GLUE text contains bare quote characters)
    reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE) if path.suffix == ".tsv" else csv.reader(lines)
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{path}: empty file (expected a header line)")
    header = [h.strip() for h in header]
    for row in reader:
        n = reader.line_num
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise ValueError(f"{path}:{n}: {len(row)} fields but the header has {len(header)}")
        yield n, dict(zip(header, row))


def read_classify(path: str | Path, text_field: str | None = None, pair_field: str | None = None,
                  label_field: str | None = "label") -> list[Example]:
    """Read labelled examples. text_field None → `sentence` or `text`, whichever the file has;
    label_field None → unlabelled texts (for prediction). Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    examples = []
    for n, row in _rows(path):
        where = f"{path}:{n}"
        if text_field is None:
            text_field = next((c for c in DEFAULT_TEXT_FIELDS if c in row), None)
            if text_field is None:
                raise ValueError(f"{where}: no text column: looked for {' or '.join(DEFAULT_TEXT_FIELDS)} "
                                 f"in columns {sorted(row)} (set text_field)")
        needed = [c for c in (text_field, pair_field, label_field) if c is not None]
        missing = [c for c in needed if c not in row]
        if missing:
            raise ValueError(f"{where}: missing column(s) {missing}; columns are {sorted(row)}")
        text = str(row[text_field]).strip()
        pair = None if pair_field is None else str(row[pair_field]).strip()
        if not text:
            raise ValueError(f"{where}: empty text in column {text_field!r}")
        if pair_field is not None and not pair:
            raise ValueError(f"{where}: empty text in column {pair_field!r}")
        label = None
        if label_field is not None:
            label = row[label_field]
            label = label.strip() if isinstance(label, str) else json.dumps(label)
            if not label:
                raise ValueError(f"{where}: empty label in column {label_field!r}")
        examples.append(Example(text, label, pair, where))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def label_names(examples: Sequence[Example]) -> list[str]:
    """The sorted label names of a training set (numerically when every name is an integer)."""
    names = {e.label for e in examples if e.label is not None}
    if not names:
        raise ValueError("no labels in the training examples")
    numeric = all(n.lstrip("-").isdigit() for n in names)
    return sorted(names, key=int) if numeric else sorted(names)


def label_ids(examples: Sequence[Example], labels: Sequence[str]) -> list[int]:
    """Map each example's label to its index in `labels`; an unknown label names its file and line."""
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for e in examples:
        if e.label not in index:
            raise ValueError(f"{e.where}: unknown label {e.label!r}; the model knows {list(labels)}")
        out.append(index[e.label])
    return out


# ---- encoding and batching ---------------------------------------------------------------------
def encode_texts(tok: Tokenizer, texts: Sequence[str], pairs: Sequence[str] | None = None,
                 max_len: int = 128) -> list[tuple[list[int], list[int]]]:
    """(ids, token_type_ids) per text (pair), with the tokenizer's special tokens, cut to max_len
    (the longer text of a pair loses tokens first, as HF's "longest_first")."""
    hf = tok.hf
    a = hf.encode_batch(list(texts), add_special_tokens=False)
    b = hf.encode_batch(list(pairs), add_special_tokens=False) if pairs is not None else [None] * len(a)
    budget = max_len - hf.num_special_tokens_to_add(pairs is not None)
    if budget < 1:
        raise ValueError(f"max_len={max_len} leaves no room for text after the special tokens")
    out = []
    for ea, eb in zip(a, b):
        na, nb = len(ea.ids), len(eb.ids) if eb is not None else 0
        while na + nb > budget:  # longest first
            if na >= nb:
                na -= 1
            else:
                nb -= 1
        if na < len(ea.ids):
            ea.truncate(na)
        if eb is not None and nb < len(eb.ids):
            eb.truncate(nb)
        enc = hf.post_process(ea, eb, add_special_tokens=True)
        out.append((enc.ids, enc.type_ids))
    return out


def length_batches(lengths: Sequence[int], batch_size: int, shuffle: bool = False,
                   seed: int = 0, pool: int = 50) -> Iterator[list[int]]:
    """Index batches of similar length (less padding, faster on CPU). Without shuffle: sorted by length.
    With shuffle: a random permutation cut into pools of `pool` batches, each sorted by
    length and cut into batches, the batches then shuffled; a new order on each pass (seed + pass)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    n = len(lengths)
    if not shuffle:
        order = sorted(range(n), key=lambda i: lengths[i])
        yield from (order[i:i + batch_size] for i in range(0, n, batch_size))
        return
    rng = random.Random(seed)
    perm = list(range(n))
    rng.shuffle(perm)
    batches = []
    for p in range(0, n, batch_size * pool):
        chunk = sorted(perm[p:p + batch_size * pool], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    yield from batches


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad (ids, type_ids) rows → {input_ids, attention_mask, token_type_ids}, each (B, T)."""
    ids, mask = pad_batch([r[0] for r in rows], pad_id)
    types, _ = pad_batch([r[1] for r in rows], 0)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


class ClassifyData:
    """Encoded examples of one file, ready to batch: `batches()` for training or evaluation."""

    def __init__(self, examples: Sequence[Example], tok: Tokenizer, labels: Sequence[str], max_len: int = 128):
        if tok.pad_id is None:
            raise ValueError("the tokenizer has no pad token")
        self.examples, self.labels, self.pad_id = list(examples), list(labels), tok.pad_id
        self.label_ids = label_ids(self.examples, self.labels)
        pairs = [e.pair for e in self.examples] if self.examples[0].pair is not None else None
        self.rows = encode_texts(tok, [e.text for e in self.examples], pairs, max_len)

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                epochs: int | None = 1) -> Iterator[dict[str, torch.Tensor]]:
        """Batches {input_ids, attention_mask, token_type_ids, labels (B,)}; epochs=None repeats forever."""
        epoch = 0
        while epochs is None or epoch < epochs:
            for idx in length_batches([len(r[0]) for r in self.rows], batch_size, shuffle, seed + epoch):
                batch = collate([self.rows[i] for i in idx], self.pad_id)
                batch["labels"] = torch.tensor([self.label_ids[i] for i in idx])
                yield batch
            epoch += 1


# ---- prediction and evaluation ---------------------------------------------------------------
def _names(model) -> list[str]:
    cfg = model.cfg
    if cfg.task != "classify":
        raise ValueError(f"the model's task is {cfg.task!r}, not 'classify'")
    return list(cfg.labels) if cfg.labels else [str(i) for i in range(cfg.num_labels)]


@torch.no_grad()
def _probs(model, rows, pad_id: int, batch_size: int) -> torch.Tensor:
    """Softmax over the labels for encoded rows, in row order: (N, num_labels)."""
    model.eval()
    out = torch.empty(len(rows), model.cfg.num_labels)
    for idx in length_batches([len(r[0]) for r in rows], batch_size):
        batch = collate([rows[i] for i in idx], pad_id)
        out[idx] = model(**batch).float().softmax(-1)
    return out


def predict_classify(model, tok: Tokenizer, texts: Sequence[str], pairs: Sequence[str] | None = None,
                     batch_size: int = 32, max_len: int | None = None) -> list[tuple[str, dict[str, float]]]:
    """[(predicted label, {label: probability})] for each text (or text pair)."""
    names = _names(model)
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not a string")
    for i, t in enumerate(texts):
        if not t.strip():
            raise ValueError(f"text {i} is empty")
    rows = encode_texts(tok, texts, pairs, max_len or model.cfg.max_len)
    probs = _probs(model, rows, tok.pad_id, batch_size)
    return [(names[int(p.argmax())], {n: float(v) for n, v in zip(names, p)}) for p in probs]


def eval_classify(model, tok: Tokenizer, data: str | Path | Sequence[Example], text_field: str | None = None,
                  pair_field: str | None = None, label_field: str = "label", batch_size: int = 64,
                  max_len: int | None = None) -> dict[str, float]:
    """{accuracy, macro_f1} (0-1) of the model on a labelled file or examples; labels the model
    does not know are an error naming their file and line."""
    names = _names(model)
    examples = read_classify(data, text_field, pair_field, label_field) if isinstance(data, (str, Path)) else data
    ds = ClassifyData(examples, tok, names, max_len or model.cfg.max_len)
    preds = _probs(model, ds.rows, ds.pad_id, batch_size).argmax(-1).tolist()
    return {"accuracy": accuracy(preds, ds.label_ids),
            "macro_f1": macro_f1(preds, ds.label_ids), "examples": len(ds)}


# ---- the task for lmforge.tasks.finetune -------------------------------------------------------------
def _build(model_dir, train_file, valid_file, opts: Options) -> Prepared:
    fields = dict(text_field=opts.text_field, pair_field=opts.pair_field, label_field=opts.label_field)
    train = read_classify(train_file, **fields)[:opts.limit]
    labels = label_names(train)
    model, tok = load_with_tokenizer(model_dir, task="classify", num_labels=len(labels), labels=labels)
    ds = ClassifyData(train, tok, labels, opts.max_len)
    valid = read_classify(valid_file, **fields)[:opts.valid_limit] if valid_file else None
    vds = ClassifyData(valid, tok, labels, opts.max_len) if valid else None
    return Prepared(model, tok, get_objective("classification"), len(ds),
                    lambda bs, seed: ds.batches(bs, shuffle=True, seed=seed, epochs=None),
                    list(vds.batches(opts.eval_batch_size)) if vds else [],
                    lambda m: eval_classify(m, tok, valid, batch_size=opts.eval_batch_size,
                                            max_len=opts.max_len) if valid else {})


def _evaluate(model, tok: Tokenizer, data_file, opts: Options) -> dict[str, float]:
    data = read_classify(data_file, opts.text_field, opts.pair_field, opts.label_field)
    return eval_classify(model, tok, data[:opts.limit], batch_size=opts.eval_batch_size, max_len=opts.max_len)


def _predict(model, tok: Tokenizer, inputs, context: str | None, opts: Options) -> list[dict]:
    if is_file(inputs, ".tsv", ".csv"):
        texts = [e.text for e in read_classify(inputs, opts.text_field, label_field=None)]
    else:
        texts = input_texts(inputs)
    preds = predict_classify(model, tok, texts, batch_size=opts.eval_batch_size, max_len=opts.max_len)
    return [{"text": t, "label": label, "probs": probs} for t, (label, probs) in zip(texts, preds)]


TASK = Task(build=_build, evaluate=_evaluate, predict=_predict)
