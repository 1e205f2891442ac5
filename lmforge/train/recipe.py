"""Pretraining recipes: one YAML file (plus `key=value` overrides) → tokenizer, token file, model,
the training loop, a saved model directory.

    recipe = load_recipe("configs/main.yaml", ["train.lr=3e-4", "model.d_model=128"])
    result = run_pretraining(recipe)

A recipe has six parts (see configs/*.yaml):

    model:      preset: gpt-tiny, plus any ModelConfig field (d_model: 128, ...)
    tokenizer:  path of an existing tokenizer, or kind / vocab_size / family to train one
    data:       source (file, folder, list, or builtin:pydoc), val_fraction, block_size, ...
    objective:  name (causal_lm, mlm, mlm_nsp, span_corruption, denoising, translation) + options
    train:      TrainConfig fields (lr, max_steps, max_minutes, ...)
    out_dir:    where the run writes tokenizer/, model/, checkpoints/, log.jsonl, loss.png

Unknown keys are errors naming the key and the file. Relative paths are relative to the
current directory.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import torch

from lmforge.config import ModelConfig
from lmforge.data import batches as B
from lmforge.data.corpus import TokenArray, build_token_file, read_texts, source_files
from lmforge.models.heads import Model
from lmforge.models.io import save_model
from lmforge.objectives import causal_lm, masked_lm, mlm_nsp, seq2seq
from lmforge.tokenizer import Tokenizer, train_tokenizer_from_iterator
from lmforge.train import distributed
from lmforge.train.loop import TrainConfig, train

BUILTIN_PYDOC = "builtin:pydoc"  # the Python language reference shipped with CPython (pydoc_data.topics)


@dataclass
class TokenizerSpec:
    """Load a tokenizer (`path`) or train one on the recipe's corpus."""

    path: str | None = None  # an existing tokenizer directory; the fields below are then unused
    kind: Literal["bpe", "wordpiece", "unigram"] | None = None  # None → the family's usual kind
    vocab_size: int = 8000
    family: Literal["decoder", "encoder", "encoder-decoder", "t5", "bart"] | None = None  # None → from the model
    min_frequency: int = 2
    lowercase: bool = False


@dataclass
class DataSpec:
    """Where the text comes from and how it is cut."""

    source: str | list[str] = BUILTIN_PYDOC  # file, folder, list of them, "builtin:pydoc"; translation: prefix
    valid_source: str | list[str] | None = None  # separate validation text; None → the last val_fraction
    val_fraction: float = 0.1
    block_size: int = 128  # tokens per training sequence (the raw window for span corruption/denoising)
    split: Literal["file", "paragraph", "line"] = "file"  # what one document is in a plain-text file
    text_field: str = "text"  # the field of .jsonl records / dataset rows
    src_lang: str | None = None  # translation: source = <source>.<src_lang>, target = <source>.<tgt_lang>
    tgt_lang: str | None = None
    cache_dir: str | None = None  # token files; None → <out_dir>/cache
    eval_seed: int = 1234  # seed of the fixed validation batches


@dataclass
class ObjectiveSpec:
    """The pretraining objective and the options of its loss and its noising."""

    name: Literal["causal_lm", "mlm", "mlm_nsp", "span_corruption", "denoising", "translation"] = "causal_lm"
    label_smoothing: float = 0.0
    mlm_probability: float = 0.15  # BERT
    noise_density: float = 0.15  # T5
    mean_span_length: float = 3.0  # T5
    mask_ratio: float = 0.3  # BART
    poisson_lambda: float = 3.0  # BART
    permute_sentences: bool = True  # BART


@dataclass
class Recipe:
    """Everything a pretraining run needs; `load_recipe` builds one from YAML."""

    model: dict[str, Any] = field(default_factory=lambda: {"preset": "gpt-tiny"})
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    data: DataSpec = field(default_factory=DataSpec)
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "runs/pretrain"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_config(self, **defaults) -> ModelConfig:
        """The model config: the preset, then `defaults` (e.g. the tokenizer's ids), then the recipe's fields."""
        fields_ = {k: v for k, v in self.model.items() if k != "preset"}
        preset = self.model.get("preset")
        if preset is None:
            return ModelConfig.from_dict({**defaults, **fields_})
        return ModelConfig.preset(preset, **{**defaults, **fields_})


# ---- YAML + overrides --------------------------------------------------------------------------------
_SECTIONS = {"tokenizer": TokenizerSpec, "data": DataSpec, "objective": ObjectiveSpec, "train": TrainConfig}


def _coerce(value, tp, where: str):
    """A YAML or command-line value as the declared type (PyYAML reads 3e-4 as a string)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union or type(tp).__name__ == "UnionType":
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ValueError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}={value!r}: expected one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}={value!r}: expected a list")
        return [_coerce(v, args[0], where) for v in value] if args else value
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"{where}={value!r}: expected true or false")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{where}={value!r}: expected a number")
        try:
            number = float(value) if isinstance(value, str) else value
            if not isinstance(number, (int, float)):
                raise TypeError
        except (TypeError, ValueError):
            raise ValueError(f"{where}={value!r}: expected {tp.__name__}") from None
        if tp is int:
            if not float(number).is_integer():
                raise ValueError(f"{where}={value!r}: expected an integer")
            return int(number)
        return float(number)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ValueError(f"{where}={value!r}: expected a string")
        return str(value)
    return value


def _section(cls, values: dict, where: str, name: str):
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    out = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"{where}: unknown key '{name}.{key}'; {name} takes: {', '.join(known)}")
        out[key] = _coerce(value, hints[key], f"{where}: {name}.{key}")
    try:
        return cls(**out)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _model_section(values, where: str) -> dict:
    if isinstance(values, str):  # `model: gpt-tiny`
        values = {"preset": values}
    if not isinstance(values, dict):
        raise ValueError(f"{where}: 'model' must be a preset name or a mapping, got {values!r}")
    hints = get_type_hints(ModelConfig)
    out = {}
    for key, value in values.items():
        if key == "preset":
            out[key] = str(value)
        elif key in hints:
            out[key] = _coerce(value, hints[key], f"{where}: model.{key}")
        else:
            raise ValueError(f"{where}: unknown key 'model.{key}'; model takes 'preset' and the ModelConfig fields: "
                             f"{', '.join(hints)}")
    return out


def recipe_from_dict(d: dict, where: str = "<recipe>") -> Recipe:
    """A Recipe from nested dicts (as read from YAML); unknown keys are errors naming `where`."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: a recipe must be a mapping, got {type(d).__name__}")
    known = ["model", *_SECTIONS, "out_dir"]
    for key in d:
        if key not in known:
            raise ValueError(f"{where}: unknown key '{key}'; a recipe has: {', '.join(known)}")
    kw: dict[str, Any] = {}
    if "model" in d:
        kw["model"] = _model_section(d["model"], where)
    for name, cls in _SECTIONS.items():
        values = d.get(name) or {}
        if name == "objective" and isinstance(values, str):  # `objective: causal_lm`
            values = {"name": values}
        if not isinstance(values, dict):
            raise ValueError(f"{where}: '{name}' must be a mapping, got {values!r}")
        kw[name] = _section(cls, values, where, name)
    if "out_dir" in d:
        kw["out_dir"] = _coerce(d["out_dir"], str, f"{where}: out_dir")
    recipe = Recipe(**kw)
    try:
        recipe.model_config()  # an unknown preset or an impossible combination fails here, not after tokenizing
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: model: {e}") from None
    return recipe


def apply_overrides(d: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set dotted keys in a recipe dict from `key=value` strings (values parsed as YAML scalars)."""
    import yaml
    d = copy.deepcopy(d)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value, e.g. train.lr=3e-4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = d
        for p in parts[:-1]:
            if p == "model" and isinstance(node.get(p), str):
                node[p] = {"preset": node[p]}
            if p == "objective" and isinstance(node.get(p), str):
                node[p] = {"name": node[p]}
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: '{p}' is not a section")
        node[parts[-1]] = value
    return d


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe (None → all defaults) and apply `key=value` overrides (dotted keys)."""
    import yaml
    d: dict = {}
    where = "command-line overrides"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} not found")
        try:
            d = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a recipe must be a mapping, got {type(d).__name__}")
        recipe_from_dict(d, str(path))  # unknown keys in the file are reported against the file
        where = f"{path} with overrides"
    if not overrides:
        where = str(path) if path is not None else "<default recipe>"
    return recipe_from_dict(apply_overrides(d, overrides), where)


# ---- the run -------------------------------------------------------------------------------------
_OBJECTIVE_MODEL = {  # objective → (model family, model task) it trains
    "causal_lm": ("decoder", "lm"), "mlm": ("encoder", "mlm"), "mlm_nsp": ("encoder", "pretraining"),
    "span_corruption": ("encoder-decoder", "lm"), "denoising": ("encoder-decoder", "lm"),
    "translation": ("encoder-decoder", "lm"),
}
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


def _parallel(source, spec: DataSpec) -> list[tuple[str, str]]:
    if isinstance(source, list) and len(source) == 2:
        return B.read_parallel_lines(*source)
    if isinstance(source, str) and "," in source:
        return B.read_parallel_lines(*source.split(",", 1))
    if isinstance(source, str) and spec.src_lang and spec.tgt_lang:
        return B.read_parallel_lines(f"{source}.{spec.src_lang}", f"{source}.{spec.tgt_lang}")
    raise ValueError(f"data.source={source!r}: translation needs two files ('SRC,TGT' or a list) "
                     "or a prefix with data.src_lang and data.tgt_lang")


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
    name = o.name
    if name == "causal_lm":
        make = lambda tokens, seed: B.lm_batches(tokens, block, bs, seed)  # noqa: E731
        loss = causal_lm
    elif name == "mlm":
        make = lambda tokens, seed: B.mlm_batches(tokens, block, bs, tok, o.mlm_probability, seed)  # noqa: E731
        loss = masked_lm
    elif name == "mlm_nsp":
        make = lambda tokens, seed: B.nsp_batches(tokens, block, bs, tok, o.mlm_probability, seed=seed)  # noqa: E731
        loss = mlm_nsp
    elif name == "span_corruption":
        make = lambda tokens, seed: B.span_batches(tokens, block, bs, tok, o.noise_density,  # noqa: E731
                                                   o.mean_span_length, seed)
        loss = seq2seq
    elif name == "denoising":
        make = lambda tokens, seed: B.denoising_batches(tokens, block, bs, tok, o.mask_ratio,  # noqa: E731
                                                        o.poisson_lambda, o.permute_sentences, seed)
        loss = seq2seq
    else:  # translation: train_tokens/valid_tokens are encoded sentence pairs
        make = lambda pairs, seed: B.translation_batches(pairs, bs, tok.pad_id, seed)  # noqa: E731
        loss = seq2seq
    if o.label_smoothing:
        loss = functools.partial(loss, label_smoothing=o.label_smoothing)
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
        (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    distributed.barrier()
    return summary


def _prepare(recipe: Recipe, rank: distributed.Dist):
    """Steps 1-3 of `run_pretraining`: tokenizer, model config, token data and batch streams."""
    out = Path(recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(recipe.data.cache_dir) if recipe.data.cache_dir else out / "cache"
    d, name = recipe.data, recipe.objective.name
    base = recipe.model_config()
    family, task = _OBJECTIVE_MODEL[name]
    if (base.family, base.task) != (family, task):
        raise ValueError(f"objective {name!r} trains a {family} model with task {task!r}; the recipe's model is "
                         f"family={base.family!r} task={base.task!r}")
    _check_lengths(base, d.block_size)
    if rank.main:
        _save_yaml(recipe.to_dict(), out / "recipe.yaml")

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
    if rank.main:
        tok.save(tok_dir)

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
