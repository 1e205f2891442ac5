"""Task-level glue for the CLI: data file → objective → the one training loop → save → evaluate.

    finetune("classify", "all-MiniLM-L6-v2/", "train.tsv", "dev.tsv", "out/", lr=1e-4, epochs=1)
    evaluate_task("qa", "out/", "dev.json")
    predict_task("seq2seq", "out/", ["A dog runs."])

Options are keyword arguments or `key=value` strings from the command line (`coerce_options`
turns strings into the option's type). `lora=True` trains low-rank adapters (and the task
head) only and merges them before saving, so the checkpoint is a plain model. For seq2seq,
`model="preset:transformer-tiny"` builds a fresh model and first trains a joint BPE
tokenizer on both sides of the training data; `model.<field>=value` options override
fields of the preset's config.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge import api
from lmforge.config import ModelConfig
from lmforge.data.corpus import jsonl_rows
from lmforge.lora import apply_lora, lora_parameters, merge_lora
from lmforge.models.heads import Model
from lmforge.tasks import classify, qa, seq2seq
from lmforge.tokenizer import Tokenizer, train_tokenizer_from_iterator
from lmforge.train import distributed

TASKS = ("classify", "qa", "seq2seq")


@dataclass
class Options:
    """Every fine-tuning option; `None` means the task's default (see `TASK_DEFAULTS`)."""

    # optimisation (passed to the training loop)
    lr: float | None = None
    schedule: str | None = None  # cosine | linear | constant | noam (the loop's schedules)
    epochs: float = 1.0
    steps: int | None = None  # overrides epochs
    batch_size: int | None = None
    warmup: float = 0.1  # < 1: fraction of the steps; else a number of steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int | None = None  # validation loss every N steps (None: at the end)
    log_every: int = 50
    max_minutes: float | None = None  # wall-clock budget of the training loop
    progress: bool = True  # progress bar
    seed: int = 0
    # data
    max_len: int | None = None
    limit: int | None = None  # use the first N training examples (questions, pairs)
    valid_limit: int | None = None
    eval_batch_size: int = 64
    # LoRA
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "attn.q,attn.v"
    # classify
    text_field: str | None = None
    pair_field: str | None = None
    label_field: str = "label"
    # qa
    doc_stride: int = 128
    max_query_len: int = 64
    max_answer_length: int = 30
    # seq2seq
    src_lang: str | None = None
    tgt_lang: str | None = None
    label_smoothing: float = 0.1
    num_beams: int = 4
    max_new_tokens: int | None = None
    vocab_size: int = 8000  # joint BPE for a model built from a preset
    dropout: float | None = None  # model dropout for the fine-tune (None: the checkpoint's)
    model: dict[str, Any] = field(default_factory=dict)  # model.<field>=value: config overrides for a preset


TASK_DEFAULTS = {
    "classify": dict(lr=1e-4, batch_size=32, max_len=128, schedule="linear"),
    "qa": dict(lr=1e-4, batch_size=16, max_len=384, schedule="linear"),
    "seq2seq": dict(lr=7e-4, batch_size=64, max_len=128, schedule="cosine"),
}


def coerce_options(task: str, options: dict[str, Any]) -> Options:
    """Options for a task from keyword arguments; string values ("3e-5", "true", "none") take the
    option's type. Unknown keys are an error that lists the known ones."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}; expected one of {', '.join(TASKS)}")
    known = {f.name: f for f in dataclasses.fields(Options)}
    values: dict[str, Any] = {"model": {}}
    for key, value in options.items():
        if key.startswith("model."):
            values["model"][key[6:]] = _parse_scalar(value) if isinstance(value, str) else value
            continue
        if key not in known or key == "model":
            raise ValueError(f"unknown option {key!r}; known: {', '.join(sorted(known))} and model.<config field>")
        values[key] = _coerce(key, value, str(known[key].type))
    opts = Options(**{**{k: v for k, v in TASK_DEFAULTS[task].items()}, **values})
    for name in ("lr", "batch_size", "max_len", "epochs"):
        if getattr(opts, name) is not None and getattr(opts, name) <= 0:
            raise ValueError(f"option {name}={getattr(opts, name)} must be > 0")
    return opts


def _parse_scalar(s: str):
    low = s.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s


def _coerce(key: str, value, type_name: str):
    """A command-line string as the option's declared type ("float | None" → float or None)."""
    if not isinstance(value, str):
        return value
    low = value.strip().lower()
    if "None" in type_name and low in ("none", "null"):
        return None
    base = type_name.split("|")[0].strip()
    try:
        if base == "bool":
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if base in ("int", "float"):
            return {"int": int, "float": float}[base](value)
    except ValueError:
        raise ValueError(f"option {key}={value!r}: expected {type_name}") from None
    return value


# ---- models ------------------------------------------------------------------------------------
def _load(model_dir: str | Path, **kw) -> tuple[Model, Tokenizer]:
    model, tok = api.load(model_dir, **kw)
    if tok is None:
        raise ValueError(f"{model_dir}: no tokenizer (tokenizer.json or vocab.txt) next to the model")
    return model, tok


def _fresh_seq2seq(preset: str, pairs, opts: Options) -> tuple[Model, Tokenizer]:
    """A new encoder-decoder from a preset with a joint byte-level BPE trained on both sides."""
    texts = [p.source for p in pairs] + [p.target for p in pairs]
    tok = train_tokenizer_from_iterator(texts, "bpe", opts.vocab_size, family="encoder-decoder")
    cfg = ModelConfig.preset(preset, **{"vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "bos_id": tok.bos_id,
                                        "eos_id": tok.eos_id, "decoder_start_id": tok.bos_id, **opts.model})
    if cfg.family != "encoder-decoder" or cfg.task != "lm":
        raise ValueError(f"preset {preset!r} is not an encoder-decoder LM")
    torch.manual_seed(opts.seed)
    return Model(cfg), tok


def _with_dropout(model: Model, p: float | None) -> Model:
    """Set every dropout probability (a fine-tuning choice, not saved in the weights)."""
    if p is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = p
        model.cfg = model.cfg.replace(dropout=p)
    return model


# ---- per-task data ------------------------------------------------------------------------------
@dataclass
class _Task:
    model: Model
    tok: Tokenizer
    objective: Any
    n_train: int  # training examples (windows for QA)
    train_batches: Any  # callable: (batch_size, seed) -> endless iterator of batches
    valid_batches: list  # batches for the validation loss
    evaluate: Any  # callable: model -> task metrics


def _classify(model_dir, train_file, valid_file, opts: Options) -> _Task:
    from lmforge.objectives import classification
    fields = dict(text_field=opts.text_field, pair_field=opts.pair_field, label_field=opts.label_field)
    train = classify.read_classify(train_file, **fields)[:opts.limit]
    labels = classify.label_names(train)
    model, tok = _load(model_dir, task="classify", num_labels=len(labels), labels=labels)
    ds = classify.ClassifyData(train, tok, labels, opts.max_len)
    valid = classify.read_classify(valid_file, **fields)[:opts.valid_limit] if valid_file else None
    vds = classify.ClassifyData(valid, tok, labels, opts.max_len) if valid else None
    return _Task(model, tok, classification, len(ds),
                 lambda bs, seed: ds.batches(bs, shuffle=True, seed=seed, epochs=None),
                 list(vds.batches(opts.eval_batch_size)) if vds else [],
                 lambda m: classify.eval_classify(m, tok, valid, batch_size=opts.eval_batch_size,
                                                  max_len=opts.max_len) if valid else {})


def _qa(model_dir, train_file, valid_file, opts: Options) -> _Task:
    from lmforge.objectives import span_qa
    model, tok = _load(model_dir, task="qa")
    kw = dict(max_len=opts.max_len, doc_stride=opts.doc_stride, max_query_len=opts.max_query_len)
    train = qa.make_features(tok, qa.read_squad(train_file, limit=opts.limit), **kw)
    valid = qa.read_squad(valid_file, limit=opts.valid_limit) if valid_file else None
    vfeats = qa.make_features(tok, valid, **kw) if valid else []
    return _Task(model, tok, span_qa, len(train),
                 lambda bs, seed: qa.qa_batches(train, tok.pad_id, bs, shuffle=True, seed=seed, epochs=None),
                 list(qa.qa_batches(vfeats, tok.pad_id, opts.eval_batch_size)) if vfeats else [],
                 lambda m: qa.eval_qa(m, tok, valid, opts.max_len, opts.doc_stride, opts.eval_batch_size,
                                      opts.max_answer_length) if valid else {})


def _seq2seq(model_dir, train_file, valid_file, opts: Options) -> _Task:
    from lmforge.objectives import seq2seq as seq2seq_loss
    train = seq2seq.read_parallel(train_file, opts.src_lang, opts.tgt_lang, limit=opts.limit)
    model_dir = str(model_dir)
    if model_dir.startswith("preset:"):
        model, tok = _fresh_seq2seq(model_dir[len("preset:"):], train, opts)
    else:
        model, tok = _load(model_dir)
        if model.cfg.family != "encoder-decoder" or model.cfg.task != "lm":
            raise ValueError(f"{model_dir}: seq2seq needs an encoder-decoder LM, got "
                             f"family={model.cfg.family!r} task={model.cfg.task!r}")
    start = seq2seq.start_id(model.cfg, tok)
    ds = seq2seq.Seq2SeqData(train, tok, start, opts.max_len)
    valid = seq2seq.read_parallel(valid_file, opts.src_lang, opts.tgt_lang, limit=opts.valid_limit) \
        if valid_file else None
    vds = seq2seq.Seq2SeqData(valid, tok, start, opts.max_len) if valid else None
    objective = functools.partial(seq2seq_loss, label_smoothing=opts.label_smoothing)
    return _Task(model, tok, objective, len(ds),
                 lambda bs, seed: ds.batches(bs, shuffle=True, seed=seed, epochs=None),
                 list(vds.batches(opts.eval_batch_size)) if vds else [],
                 lambda m: seq2seq.eval_seq2seq(m, tok, valid, opts.num_beams, opts.eval_batch_size,
                                                opts.max_new_tokens, opts.max_len) if valid else {})


_BUILDERS = {"classify": _classify, "qa": _qa, "seq2seq": _seq2seq}


# ---- the entry points --------------------------------------------------------------------------
def finetune(task: str, model_dir: str | Path, train_file, valid_file=None, out_dir: str | Path = "finetuned",
             **options) -> dict[str, Any]:
    """Fine-tune `model_dir` (or, for seq2seq, `preset:NAME`) on a task's training file with the
    training loop, save the model and tokenizer to `out_dir`, and evaluate on `valid_file`.
    Returns {valid_loss_start, train_loss, valid_loss, ...task metrics, steps, seconds}; also
    written to out_dir/metrics.json (the loop's log.jsonl and loss.png go to out_dir/train/)."""
    opts = coerce_options(task, options)
    random.seed(opts.seed)
    torch.manual_seed(opts.seed)
    t0 = time.time()
    t = _BUILDERS[task](model_dir, train_file, valid_file, opts)
    model = _with_dropout(t.model, opts.dropout)
    if opts.lora:
        apply_lora(model, opts.lora_r, opts.lora_alpha, opts.lora_dropout, opts.lora_targets)
    steps = opts.steps or max(1, math.ceil(opts.epochs * t.n_train / opts.batch_size))
    result = _train(model, t.objective, t.train_batches(opts.batch_size, opts.seed), t.valid_batches, steps, opts,
                    Path(out_dir))
    if opts.lora:
        result["lora_parameters"] = lora_parameters(model)["trainable"]
        merge_lora(model)
    model.eval()
    if not distributed.is_main():  # under torchrun rank 0 saves and evaluates
        distributed.barrier()
        return result
    api.save(model, out_dir, tokenizer=t.tok)
    metrics = {**result, **t.evaluate(model), "train_examples": t.n_train,
               "total_seconds": round(time.time() - t0, 1)}
    Path(out_dir, "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    distributed.barrier()
    return metrics


def _train(model, objective, batches, valid_batches, steps: int, opts: Options, out_dir: Path) -> dict[str, Any]:
    """The validation loss before training, then the one training loop for `steps` updates;
    returns {valid_loss_start, train_loss, valid_loss, valid_* metrics, steps, tokens_per_s, ...}."""
    from lmforge.train.loop import TrainConfig, evaluate, train
    warmup = int(opts.warmup * steps) if opts.warmup < 1 else int(opts.warmup)
    cfg = TrainConfig(lr=opts.lr, schedule=opts.schedule, warmup_steps=warmup, weight_decay=opts.weight_decay,
                      grad_clip=opts.grad_clip, batch_size=opts.batch_size, max_steps=steps,
                      max_minutes=opts.max_minutes, seed=opts.seed, eval_every=opts.eval_every or 0,
                      log_every=opts.log_every, out_dir=str(out_dir / "train"), progress=opts.progress)
    start = {}
    if valid_batches:
        start = {"valid_loss_start": evaluate(model, objective, valid_batches)["valid_loss"]}
    result = train(model, objective, batches, cfg, eval_batches=valid_batches or None)
    result.pop("checkpoint", None)
    return {**start, **result}


def evaluate_task(task: str, model_dir: str | Path, data_file, **options) -> dict[str, Any]:
    """Task metrics of a saved model on a data file: classify → accuracy/macro_f1; qa → exact_match/f1;
    seq2seq → bleu/chrf(/rouge); perplexity → perplexity of a decoder LM on a text file."""
    if task == "perplexity":
        return perplexity(model_dir, data_file, **options)
    opts = coerce_options(task, options)
    model, tok = _load(model_dir)
    if task == "classify":
        data = classify.read_classify(data_file, opts.text_field, opts.pair_field, opts.label_field)
        return classify.eval_classify(model, tok, data[:opts.limit], batch_size=opts.eval_batch_size,
                                      max_len=opts.max_len)
    if task == "qa":
        return qa.eval_qa(model, tok, qa.read_squad(data_file, limit=opts.limit), opts.max_len, opts.doc_stride,
                          opts.eval_batch_size, opts.max_answer_length)
    pairs = seq2seq.read_parallel(data_file, opts.src_lang, opts.tgt_lang, limit=opts.limit)
    return seq2seq.eval_seq2seq(model, tok, pairs, opts.num_beams, opts.eval_batch_size, opts.max_new_tokens,
                                opts.max_len)


@torch.no_grad()
def perplexity(model_dir: str | Path, data_file, block_size: int | str = 512, batch_size: int | str = 8,
               limit: int | str | None = None, **unknown) -> dict[str, float]:
    """Perplexity of a decoder LM on a text corpus: the token stream cut into blocks of
    block_size (each token predicted from the previous ones of its block); `limit` tokens at most."""
    if unknown:
        raise ValueError(f"unknown perplexity option(s) {sorted(unknown)}; known: block_size, batch_size, limit")
    from lmforge.data.corpus import read_texts
    from lmforge.evaluate import perplexity as ppl
    block_size, batch_size = int(block_size), int(batch_size)
    model, tok = _load(model_dir)
    if model.cfg.family != "decoder" or model.cfg.task != "lm":
        raise ValueError(f"perplexity needs a decoder LM, got family={model.cfg.family!r} task={model.cfg.task!r}")
    ids = [i for text in read_texts(data_file) for i in tok.encode(text, add_special_tokens=False)]
    if limit is not None:
        ids = ids[:int(limit)]
    block_size = min(block_size, model.cfg.max_len)
    blocks = [ids[i:i + block_size] for i in range(0, len(ids) - 1, block_size)]
    blocks = [b for b in blocks if len(b) > 1]
    if not blocks:
        raise ValueError(f"{data_file}: fewer than 2 tokens")
    nll, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        chunk = blocks[i:i + batch_size]
        n = max(len(b) for b in chunk)
        x = torch.tensor([b + [0] * (n - len(b)) for b in chunk])
        mask = torch.tensor([[1] * len(b) + [0] * (n - len(b)) for b in chunk])
        logits = model(x, attention_mask=mask).float()  # (B, T, V)
        target = x[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100,
                                                 reduction="sum").item()
        count += int((target != -100).sum())
    return {"perplexity": ppl(nll / count), "nll": nll / count, "tokens": count}


def _texts(inputs) -> list[str]:
    """Inputs as a list of texts: a list, a file (.txt one per line, .jsonl 'text' field) or one text."""
    if isinstance(inputs, (list, tuple)):
        return [str(x) for x in inputs]
    p = Path(str(inputs))
    if len(str(inputs)) < 4096 and p.is_file():
        from lmforge.data.corpus import read_lines
        return read_lines(p, skip_empty=True)
    return [str(inputs)]


def predict_task(task: str, model_dir: str | Path, inputs, context: str | None = None,
                 **options) -> list[dict[str, Any]]:
    """Run a saved model on inputs (a text, a list of texts or a file: .txt one per line, .jsonl
    'text' field, .tsv/.csv text column for classify). classify → [{text, label, probs}]; seq2seq → [{source, translation}]; qa → [{id|question, answer}]: a
    SQuAD .json file, a .jsonl file of {question, context}, or question text(s) with `context`."""
    opts = coerce_options(task, options)
    model, tok = _load(model_dir)
    if task == "classify":
        p = Path(str(inputs))
        if not isinstance(inputs, (list, tuple)) and p.suffix in (".tsv", ".csv") and p.is_file():
            texts = [e.text for e in classify.read_classify(p, opts.text_field, label_field=None)]
        else:
            texts = _texts(inputs)
        preds = classify.predict_classify(model, tok, texts, batch_size=opts.eval_batch_size, max_len=opts.max_len)
        return [{"text": t, "label": label, "probs": probs} for t, (label, probs) in zip(texts, preds)]
    if task == "seq2seq":
        texts = _texts(inputs)
        outs = seq2seq.translate(model, tok, texts, opts.num_beams, opts.max_new_tokens, opts.eval_batch_size,
                                 opts.max_len)
        return [{"source": s, "translation": t} for s, t in zip(texts, outs)]
    questions = _qa_inputs(inputs, context)
    answers = qa.predict_qa(model, tok, questions, opts.max_len, opts.doc_stride, opts.eval_batch_size,
                            opts.max_answer_length)
    return [{"id": q.id, "question": q.question, "answer": answers[q.id]} for q in questions]


def _qa_inputs(inputs, context: str | None) -> list[qa.Question]:
    p = Path(str(inputs))
    if not isinstance(inputs, (list, tuple)) and p.suffix == ".json" and p.is_file():
        return qa.read_squad(p)
    if not isinstance(inputs, (list, tuple)) and p.suffix == ".jsonl" and p.is_file():
        out = []
        for n, row in jsonl_rows(p):
            if not isinstance(row.get("question"), str) or not isinstance(row.get("context"), str):
                raise ValueError(f"{p}:{n}: expected a JSON object with 'question' and 'context'")
            out.append(qa.Question(str(row.get("id", n)), row["question"], row["context"], []))
        return out
    if context is None:
        raise ValueError("qa prediction needs a context: pass context=TEXT, or a .json/.jsonl file")
    return [qa.Question(str(i), q, context, []) for i, q in enumerate(_texts(inputs))]
