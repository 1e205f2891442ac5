"""Fine-tuning options, and the shape every task module (classify.py, qa.py, seq2seq.py) fills in.

Options are keyword arguments or `key=value` strings from the command line; `coerce_options`
turns strings into each option's declared type with the one typed parser
(lmforge.train.overrides). `model.<field>=value` options override fields of a preset's config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from lmforge.config import ModelConfig
from lmforge.models.heads import Model
from lmforge.tokenizer import Tokenizer
from lmforge.train.overrides import coerce, coerce_fields

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
    if task not in TASK_DEFAULTS:
        raise ValueError(f"task={task!r}; expected one of {', '.join(TASK_DEFAULTS)}")
    model_hints = get_type_hints(ModelConfig)
    values: dict[str, Any] = {"model": {}}
    for key, value in options.items():
        if key.startswith("model."):
            name = key[len("model."):]
            if name not in model_hints:
                raise ValueError(f"unknown option {key!r}; model.<field> takes the ModelConfig fields: "
                                 f"{', '.join(model_hints)}")
            values["model"][name] = coerce(value, model_hints[name], f"option {key}")
        elif key == "model":
            raise ValueError("option 'model' takes model.<field>=value, e.g. model.d_model=256")
        else:
            try:
                values.update(coerce_fields(Options, {key: value}, ""))
            except ValueError as e:
                if "unknown key" not in str(e):
                    raise ValueError(f"option {e}") from None
                known = ", ".join(sorted(f.name for f in dataclasses.fields(Options) if f.name != "model"))
                raise ValueError(f"unknown option {key!r}; known: {known} and model.<config field>") from None
    opts = Options(**{**TASK_DEFAULTS[task], **values})
    for name in ("lr", "batch_size", "max_len", "epochs"):
        if getattr(opts, name) is not None and getattr(opts, name) <= 0:
            raise ValueError(f"option {name}={getattr(opts, name)} must be > 0")
    return opts


@dataclass
class Prepared:
    """A task ready for the training loop: what `Task.build` returns."""

    model: Model
    tok: Tokenizer
    objective: Callable  # (model, batch) -> (loss, metrics)
    n_train: int  # training examples (windows for QA)
    train_batches: Callable[[int, int], Iterator[dict]]  # (batch_size, seed) -> endless batches
    valid_batches: list  # batches for the validation loss
    evaluate: Callable[[Model], dict]  # model -> task metrics on the validation data ({} without it)


@dataclass(frozen=True)
class Task:
    """What a task module provides to `lmforge.tasks.finetune`'s dispatch table."""

    build: Callable[..., Prepared]  # (model_dir, train_file, valid_file, opts) -> Prepared
    evaluate: Callable[..., dict]  # (model, tok, data_file, opts) -> metrics
    predict: Callable[..., list[dict]]  # (model, tok, inputs, context, opts) -> one row per input


def input_texts(inputs) -> list[str]:
    """Inputs as a list of texts: a list, a file (.txt one per line, .jsonl 'text' field) or one text."""
    if isinstance(inputs, (list, tuple)):
        return [str(x) for x in inputs]
    if is_file(inputs):
        from lmforge.data.corpus import read_lines
        return read_lines(Path(str(inputs)), skip_empty=True)
    return [str(inputs)]


def is_file(inputs, *suffixes: str) -> bool:
    """Whether `inputs` names an existing file (with one of `suffixes`, when given), not a text or a list."""
    if isinstance(inputs, (list, tuple)) or len(str(inputs)) >= 4096:
        return False
    p = Path(str(inputs))
    return p.is_file() and (not suffixes or p.suffix in suffixes)
