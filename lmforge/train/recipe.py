"""Pretraining recipes, the schema: one YAML file (plus `key=value` overrides) → a validated
`Recipe`. `lmforge.train.pretrain.run_pretraining` runs one.

    recipe = load_recipe("configs/main.yaml", ["train.lr=3e-4", "model.d_model=128"])
    result = run_pretraining(recipe)

A recipe has six parts (see configs/*.yaml):

    model:      preset: gpt-tiny, plus any ModelConfig field (d_model: 128, ...)
    tokenizer:  path of an existing tokenizer, or kind / vocab_size / family to train one
    data:       source (file, folder, list, or builtin:pydoc), val_fraction, block_size, ...
    objective:  name (causal_lm, masked_lm, mlm_nsp, span_corruption, denoising, translation: names
                of lmforge.objectives.OBJECTIVES; "mlm" is accepted for masked_lm) + options
    train:      TrainConfig fields (lr, max_steps, max_minutes, ...)
    out_dir:    where the run writes tokenizer/, model/, checkpoints/, log.jsonl, loss.png

Unknown keys are errors naming the key and the file. Relative paths are relative to the
current directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

from lmforge.config import ModelConfig
from lmforge.objectives import ALIASES
from lmforge.train.loop import TrainConfig
from lmforge.train.overrides import apply_overrides, coerce, coerce_fields

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


# pretraining objective (a name in lmforge.objectives.OBJECTIVES) → (model family, model task) it trains
PRETRAINING_OBJECTIVES = {
    "causal_lm": ("decoder", "lm"), "masked_lm": ("encoder", "mlm"), "mlm_nsp": ("encoder", "pretraining"),
    "span_corruption": ("encoder-decoder", "lm"), "denoising": ("encoder-decoder", "lm"),
    "translation": ("encoder-decoder", "lm"),
}


@dataclass
class ObjectiveSpec:
    """The pretraining objective and the options of its loss and its noising."""

    name: str = "causal_lm"  # a key of PRETRAINING_OBJECTIVES (or an alias from lmforge.objectives)
    label_smoothing: float = 0.0
    mlm_probability: float = 0.15  # BERT
    noise_density: float = 0.15  # T5
    mean_span_length: float = 3.0  # T5
    mask_ratio: float = 0.3  # BART
    poisson_lambda: float = 3.0  # BART
    permute_sentences: bool = True  # BART

    def __post_init__(self):
        name = ALIASES.get(self.name, self.name)
        if name not in PRETRAINING_OBJECTIVES:
            raise ValueError(f"objective.name={self.name!r}: expected a pretraining objective, one of "
                             f"{', '.join(PRETRAINING_OBJECTIVES)} (or an alias: {', '.join(ALIASES)})")
        self.name = name


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


def _section(cls, values: dict, where: str, name: str):
    try:
        return cls(**coerce_fields(cls, values, where, name))
    except ValueError as e:
        raise ValueError(e if str(e).startswith(where) else f"{where}: {e}") from None


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
            out[key] = coerce(value, hints[key], f"{where}: model.{key}")
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
        kw["out_dir"] = coerce(d["out_dir"], str, f"{where}: out_dir")
    recipe = Recipe(**kw)
    try:
        recipe.model_config()  # an unknown preset or an impossible combination fails here, not after tokenizing
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: model: {e}") from None
    return recipe


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


