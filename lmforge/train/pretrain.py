"""The pretraining run of a recipe (lmforge.train.recipe): tokenizer → token files → model → the
training loop → a saved model directory. What `lmforge pretrain --config configs/main.yaml` runs.

    result = run_pretraining(load_recipe("configs/main.yaml"))
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from lmforge.atomic import atomic_write
from lmforge.config import ModelConfig
from lmforge.data import batches as B
from lmforge.data.corpus import TokenArray, build_token_file, read_texts, source_files
from lmforge.data.parallel import Pair, read_parallel
from lmforge.models.heads import Model
from lmforge.models.io import save_model
from lmforge.objectives import get_objective
from lmforge.tokenizer import Tokenizer, train_tokenizer_from_iterator
from lmforge.train import distributed
from lmforge.train.loop import train
from lmforge.train.recipe import BUILTIN_PYDOC, PRETRAINING_OBJECTIVES, DataSpec, Recipe

_USUAL_KIND = {"decoder": "bpe", "encoder": "wordpiece", "encoder-decoder": "bpe", "t5": "unigram", "bart": "bpe"}


def _tokenizer_family(recipe: Recipe, cfg: ModelConfig) -> str:
    if recipe.tokenizer.family:
        return recipe.tokenizer.family
    if recipe.objective.name == "span_corruption" or cfg.hf_arch == "t5":
        return "t5"
    if recipe.objective.name == "denoising" or cfg.hf_arch == "bart":
        return "bart"
    return cfg.family


def _materialize_builtin(name: str, cache: Path) -> Path:
    """Write a built-in corpus as JSONL (one document per record) and return its path."""
    if name != BUILTIN_PYDOC:
        raise ValueError(f"unknown built-in corpus {name!r}; available: {BUILTIN_PYDOC}")
    from pydoc_data.topics import topics  # ~460 KB of English: the Python language reference
    path = cache / "builtin" / "pydoc.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)), encoding="utf-8")
        tmp.replace(path)
    return path


def _files(source, cache: Path) -> list[Path]:
    sources = source if isinstance(source, list) else [source]
    out = []
    for s in sources:
        out += [_materialize_builtin(s, cache)] if str(s).startswith("builtin:") else source_files(s)
    return out


def _parallel(source, spec: DataSpec) -> list[Pair]:
    """Translation pairs: data.source is a .jsonl file, 'SRC,TGT', a list of two files, or a prefix
    with data.src_lang and data.tgt_lang (lmforge.data.parallel)."""
    try:
        return read_parallel(source, spec.src_lang, spec.tgt_lang)
    except ValueError as e:
        raise ValueError(f"data.source={source!r}: {e}") from None


def _train_tokenizer(recipe: Recipe, family: str, texts) -> Tokenizer:
    t = recipe.tokenizer
    return train_tokenizer_from_iterator(texts, t.kind or _USUAL_KIND[family], t.vocab_size, family=family,
                                         min_frequency=t.min_frequency, lowercase=t.lowercase)


def _special_ids(tok: Tokenizer, family: str) -> dict:
    ids = {"pad_id": tok.pad_id}
    if family == "decoder":
        ids.update(bos_id=tok.eos_id, eos_id=tok.eos_id)  # GPT-2: <|endoftext|> separates documents
    elif family == "t5":
        ids.update(eos_id=tok.eos_id, decoder_start_id=tok.pad_id)
    elif family == "bart":
        ids.update(bos_id=tok.bos_id, eos_id=tok.eos_id, decoder_start_id=tok.eos_id)
    elif family == "encoder-decoder":
        ids.update(bos_id=tok.bos_id, eos_id=tok.eos_id, decoder_start_id=tok.bos_id)
    return ids


def _check_lengths(cfg: ModelConfig, block_size: int) -> None:
    if block_size < 4:
        raise ValueError(f"data.block_size={block_size} is too small (at least 4 tokens)")
    if block_size > cfg.max_len and cfg.position in ("learned", "sinusoidal"):
        raise ValueError(f"data.block_size={block_size} is longer than the model's max_len={cfg.max_len}: "
                         f"lower data.block_size or raise model.max_len")


def _streams(recipe: Recipe, tok: Tokenizer, cfg: ModelConfig, train_tokens, valid_tokens):
    """(training stream, fixed validation batches, objective function) for the recipe's objective."""
    d, o, t = recipe.data, recipe.objective, recipe.train
    n_eval, bs, block = t.eval_batches or 20, t.batch_size, d.block_size
    builders = {
        "causal_lm": lambda tokens, seed: B.lm_batches(tokens, block, bs, seed),
        "masked_lm": lambda tokens, seed: B.mlm_batches(tokens, block, bs, tok, o.mlm_probability, seed),
        "mlm_nsp": lambda tokens, seed: B.nsp_batches(tokens, block, bs, tok, o.mlm_probability, seed=seed),
        "span_corruption": lambda tokens, seed: B.span_batches(tokens, block, bs, tok, o.noise_density,
                                                               o.mean_span_length, seed),
        "denoising": lambda tokens, seed: B.denoising_batches(tokens, block, bs, tok, o.mask_ratio,
                                                              o.poisson_lambda, o.permute_sentences, seed),
        # translation: train_tokens/valid_tokens are encoded sentence pairs
        "translation": lambda pairs, seed: B.translation_batches(pairs, bs, tok.pad_id, seed),
    }
    make = builders[o.name]
    loss = get_objective(o.name, **({"label_smoothing": o.label_smoothing} if o.label_smoothing else {}))
    return make(train_tokens, t.seed), make(valid_tokens, d.eval_seed).take(n_eval), loss


def run_pretraining(recipe: Recipe) -> dict:
    """Train (or load) the tokenizer, build the token files, build the model and train it with the
    recipe's objective, then save the model and tokenizer to <out_dir>/model.

    Returns {out_dir, model_dir, tokenizer_dir, log, plot, checkpoint, parameters, train_tokens,
    valid_tokens, metrics (the loop's result: train/valid loss, valid_perplexity, tokens/s, ...)}.
    Under torchrun, rank 0 trains the tokenizer and builds the token files first (the other
    processes then read them), every process trains its share, and rank 0 writes the model.
    """
    d, _ = distributed.setup(recipe.train.device)
    with distributed.main_first(d):
        prepared = _prepare(recipe, d)
    tok, cfg, train_data, valid_data, stream, valid_batches, objective = prepared
    out = Path(recipe.out_dir)
    tok_dir = out / "tokenizer"

    # 4. model and the loop
    torch.manual_seed(recipe.train.seed)
    model = Model(cfg)
    tcfg = dataclasses.replace(recipe.train, out_dir=str(out))
    result = train(model, objective, stream, tcfg, eval_batches=valid_batches)

    # 5. the final model directory: weights + config + tokenizer
    model_dir = out / "model"
    summary = {"out_dir": str(out), "model_dir": str(model_dir), "tokenizer_dir": str(tok_dir),
               "log": result["log"], "plot": result["plot"], "checkpoint": result["checkpoint"],
               "parameters": model.num_parameters(), "train_tokens": _size(train_data),
               "valid_tokens": _size(valid_data), "metrics": result}
    if d.main:
        save_model(model.to("cpu").eval(), model_dir)
        tok.save(model_dir)
        text = json.dumps(summary, indent=2, default=_json_default)
        atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(text))
    distributed.barrier()
    return summary


def _prepare(recipe: Recipe, rank: distributed.Dist):
    """Steps 1-3 of `run_pretraining`: tokenizer, model config, token data and batch streams."""
    out = Path(recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(recipe.data.cache_dir) if recipe.data.cache_dir else out / "cache"
    d, name = recipe.data, recipe.objective.name
    base = recipe.model_config()
    family, task = PRETRAINING_OBJECTIVES[name]
    if (base.family, base.task) != (family, task):
        raise ValueError(f"objective {name!r} trains a {family} model with task {task!r}; the recipe's model is "
                         f"family={base.family!r} task={base.task!r}")
    _check_lengths(base, d.block_size)

    # 1. text and tokenizer
    if name == "translation":
        pairs = _parallel(d.source, d)
        valid_pairs = _parallel(d.valid_source, d) if d.valid_source else None
        texts = lambda: (s for pair in pairs for s in pair)  # noqa: E731
    else:
        files = _files(d.source, cache)
        texts = lambda: read_texts(files, split=d.split, text_field=d.text_field)  # noqa: E731
    tok_family = _tokenizer_family(recipe, base)
    tok_dir = out / "tokenizer"
    if recipe.tokenizer.path:
        tok = Tokenizer.load(recipe.tokenizer.path)
    elif (recipe.train.resume or not rank.main) and (tok_dir / "tokenizer.json").is_file():
        tok = Tokenizer.load(tok_dir)  # a resumed run (or another process) must see the same token ids
    else:
        for _ in texts():  # read once first: an empty, binary or non-UTF-8 corpus fails with its own message
            pass
        tok = _train_tokenizer(recipe, tok_family, texts())

    # 2. model config from the preset, the tokenizer's vocabulary and special ids, and the recipe's fields
    cfg = recipe.model_config(vocab_size=tok.vocab_size, **_special_ids(tok, tok_family))
    if cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")

    # 3. token files (or encoded pairs) and batch streams
    if name == "translation":
        encoded = B.encode_pairs(pairs, tok, d.block_size)
        if valid_pairs is not None:
            train_data, valid_data = encoded, B.encode_pairs(valid_pairs, tok, d.block_size)
        else:
            cut = len(encoded) - max(1, round(len(encoded) * d.val_fraction))
            if cut <= 0:
                raise ValueError(f"data.val_fraction={d.val_fraction} leaves no training pairs of {len(encoded)}")
            train_data, valid_data = encoded[:cut], encoded[cut:]
    else:
        tokens = build_token_file(files, tok, cache, split=d.split, text_field=d.text_field,
                                  progress=recipe.train.progress)
        if d.valid_source:
            train_data = tokens
            valid_data = build_token_file(_files(d.valid_source, cache), tok, cache, split=d.split,
                                          text_field=d.text_field, progress=recipe.train.progress)
        else:
            train_data, valid_data = tokens.split(d.val_fraction, by="token")
    stream, valid_batches, objective = _streams(recipe, tok, cfg, train_data, valid_data)
    if rank.main:  # only now that the data and settings are checked: a failed start leaves out_dir as it was
        tok.save(tok_dir)
        atomic_write(out / "recipe.yaml", lambda tmp: _save_yaml(recipe.to_dict(), Path(tmp)))
    return tok, cfg, train_data, valid_data, stream, valid_batches, objective


def _size(data) -> int:
    if isinstance(data, TokenArray):
        return len(data)
    return sum(len(s) + len(t) for s, t in data)


def _json_default(x):
    return None if isinstance(x, float) and not math.isfinite(x) else str(x)


def _save_yaml(d: dict, path: Path) -> None:
    import yaml
    path.write_text(yaml.safe_dump(d, sort_keys=False))


def stop_message(result: dict, recipe: Recipe, command: str) -> str:
    """Why the run stopped and what to type to go on, in recipe terms. `command` reruns this
    recipe (e.g. "lmforge pretrain --config configs/main.yaml"); the lines add the overrides."""
    m, t = result["metrics"], recipe.train
    steps, budget = m["steps"], t.max_minutes
    more_steps = f"train.max_steps={max(2 * t.max_steps, steps + t.max_steps)}"
    more_time = f"train.max_minutes={2 * budget:g}" if budget is not None else ""
    extend = f"{command} train.resume=true {more_time if m['stopped'] == 'max_minutes' else more_steps}"
    if m.get("resumed_from") and m.get("resumed_step") == steps:
        why = (f"its train.max_minutes={budget:g} budget is used up" if m["stopped"] == "max_minutes"
               else f"it is at train.max_steps={t.max_steps}" if m["stopped"] == "max_steps"
               else "the training data is used up")
        return (f"nothing left to do: the run resumed from {m['resumed_from']} (step {steps}) and {why}.\n"
                f"to extend the run: {extend}")
    if m["stopped"] == "max_minutes":
        return (f"stopped: the time budget train.max_minutes={budget:g} ran out at step {steps} of "
                f"train.max_steps={t.max_steps}; the learning-rate schedule was laid over the budget and has ended.\n"
                f"to continue: {extend}  (or train.max_minutes=null to run all {t.max_steps} steps)")
    if m["stopped"] == "data":
        return f"stopped: the training data ran out at step {steps} of train.max_steps={t.max_steps}."
    return (f"stopped: all train.max_steps={t.max_steps} steps done.\n"
            f"to train further: {extend}")
