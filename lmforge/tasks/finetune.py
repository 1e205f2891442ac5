"""Fine-tuning, evaluation and prediction for the CLI: data file → objective → the one training loop
→ save → evaluate. Each task lives in its own module (classify.py, qa.py, seq2seq.py) and is
reached through one table, `TASKS`.

    finetune("classify", "all-MiniLM-L6-v2/", "train.tsv", "dev.tsv", "out/", lr=1e-4, epochs=1)
    evaluate_task("qa", "out/", "dev.json")
    predict_task("seq2seq", "out/", ["A dog runs."])

Options (lmforge.tasks.options) are keyword arguments or `key=value` strings from the command
line. `lora=True` trains low-rank adapters (and the task head) only and merges them before
saving, so the checkpoint is a plain model. For seq2seq, `model="preset:transformer-tiny"`
builds a fresh model and first trains a joint BPE tokenizer on both sides of the training data;
`model.<field>=value` options override fields of the preset's config.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.interop.load import load_with_tokenizer, save
from lmforge.lora import apply_lora, lora_parameters, merge_lora
from lmforge.models.heads import Model
from lmforge.tasks import classify, qa, seq2seq
from lmforge.tasks.options import Options, Task, coerce_options
from lmforge.tasks.perplexity import perplexity
from lmforge.train import distributed
from lmforge.train.loop import TrainConfig, evaluate, train

TASKS: dict[str, Task] = {"classify": classify.TASK, "qa": qa.TASK, "seq2seq": seq2seq.TASK}


def _with_dropout(model: Model, p: float | None) -> Model:
    """Set every dropout probability (a fine-tuning choice, not saved in the weights)."""
    if p is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = p
        model.cfg = model.cfg.replace(dropout=p)
    return model


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
    t = TASKS[task].build(model_dir, train_file, valid_file, opts)
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
    save(model, out_dir, tokenizer=t.tok)
    metrics = {**result, **t.evaluate(model), "train_examples": t.n_train,
               "total_seconds": round(time.time() - t0, 1)}
    Path(out_dir, "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    distributed.barrier()
    return metrics


def _train(model, objective, batches, valid_batches, steps: int, opts: Options, out_dir: Path) -> dict[str, Any]:
    """The validation loss before training, then the one training loop for `steps` updates;
    returns {valid_loss_start, train_loss, valid_loss, valid_* metrics, steps, tokens_per_s, ...}."""
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


def _task(task: str) -> Task:
    if task not in TASKS:
        raise ValueError(f"task={task!r}; expected one of {', '.join(TASKS)}")
    return TASKS[task]


def evaluate_task(task: str, model_dir: str | Path, data_file, **options) -> dict[str, Any]:
    """Task metrics of a saved model on a data file: classify → accuracy/macro_f1; qa → exact_match/f1;
    seq2seq → bleu/chrf(/rouge); perplexity → perplexity of a decoder LM on a text file."""
    if task == "perplexity":  # not a fine-tuning task: it takes its own options
        return perplexity(model_dir, data_file, **options)
    handlers, opts = _task(task), coerce_options(task, options)
    model, tok = load_with_tokenizer(model_dir)
    return handlers.evaluate(model, tok, data_file, opts)


def predict_task(task: str, model_dir: str | Path, inputs, context: str | None = None,
                 **options) -> list[dict[str, Any]]:
    """Run a saved model on inputs (a text, a list of texts or a file: .txt one per line, .jsonl
    'text' field, .tsv/.csv text column for classify). classify → [{text, label, probs}];
    seq2seq → [{source, translation}]; qa → [{id, question, answer}]: a SQuAD .json file, a .jsonl
    file of {question, context}, or question text(s) with `context`."""
    handlers, opts = _task(task), coerce_options(task, options)
    model, tok = load_with_tokenizer(model_dir)
    return handlers.predict(model, tok, inputs, context, opts)
