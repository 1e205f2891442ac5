"""ModelConfig: one flat dataclass that describes a checkpoint completely.

A config round-trips through JSON and YAML. Variants are `Literal` strings.
Impossible combinations are rejected at construction with a message that
names the field and the value.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

Family = Literal["encoder", "decoder", "encoder-decoder"]
Position = Literal["sinusoidal", "learned", "rope", "relative", "none"]
Norm = Literal["layernorm", "rmsnorm"]
NormPlacement = Literal["pre", "post"]
Activation = Literal["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"]
Task = Literal["lm", "mlm", "pretraining", "classify", "qa", "embed"]
Pooling = Literal["mean", "cls", "last"]


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model, and nothing else.

    `n_encoder_layers`/`n_decoder_layers` say which stacks exist: an encoder
    has no decoder layers, a decoder no encoder layers.
    `task` picks the head over the shared backbone: `lm` (causal or
    sequence-to-sequence LM), `mlm`, `pretraining` (MLM + NSP), `classify`,
    `qa` (extractive span) and `embed` (pooled sentence embeddings).
    """

    family: Family = "decoder"
    vocab_size: int = 32000
    d_model: int = 512
    n_heads: int = 8
    n_kv_heads: int | None = None  # None → n_heads (MHA); 1 → MQA; else GQA
    head_dim: int | None = None  # None → d_model // n_heads (T5 v1.1 sets it)
    n_encoder_layers: int = 0
    n_decoder_layers: int = 6
    d_ff: int = 2048
    max_len: int = 1024
    position: Position = "learned"
    pos_offset: int = 0  # BART's learned positions start at index 2
    rope_theta: float = 10000.0
    rel_buckets: int = 32
    rel_max_distance: int = 128
    norm: Norm = "layernorm"
    norm_placement: NormPlacement = "pre"
    norm_eps: float = 1e-5
    embed_norm: bool = False  # LayerNorm right after the embeddings (BERT, BART)
    activation: Activation = "gelu"
    bias: bool = True  # biases of attention and feed-forward projections
    attn_scale: float | None = None  # None → 1/sqrt(head_dim); T5 uses 1.0
    embed_scale: bool = False  # multiply embeddings by sqrt(d_model) (paper, Marian)
    tie_embeddings: bool = True  # LM head shares the token embedding matrix
    logit_scale: float = 1.0  # T5 v1.0 scales the tied head's input by d_model**-0.5
    lm_head_bias: bool = False  # BART/Marian final_logits_bias, BERT MLM decoder bias
    type_vocab_size: int = 0  # segment (token-type) embeddings; 0 → none
    pooler: bool = False  # BERT pooler: tanh(W h_[CLS] + b)
    dropout: float = 0.0
    attn_dropout: float = 0.0
    init_std: float = 0.02
    # task head
    task: Task = "lm"
    num_labels: int = 2
    labels: list[str] | None = None
    pooling: Pooling = "mean"
    # special ids used by objectives and generation
    pad_id: int | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    decoder_start_id: int | None = None
    # where the checkpoint came from ("bert", "gpt2", "llama", "t5", "bart", "marian"), for export
    hf_arch: str | None = None

    def __post_init__(self):
        hints = get_type_hints(type(self))
        for f in fields(self):
            allowed = _literal_values(hints[f.name])
            value = getattr(self, f.name)
            if allowed and value not in allowed:
                raise ValueError(f"ModelConfig.{f.name}={value!r} is not one of {sorted(allowed)}")
            if not allowed and not _has_type(value, hints[f.name]):
                raise ValueError(f"ModelConfig.{f.name}={value!r} has type {type(value).__name__}; "
                                 f"expected {_type_name(hints[f.name])}")
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "max_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)} must be > 0")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.d_model // self.n_heads
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for rotary positions")
        if self.position == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"ModelConfig.d_model={self.d_model} must be even for sinusoidal positions")
        enc, dec = self.n_encoder_layers, self.n_decoder_layers
        if enc < 0 or dec < 0:
            raise ValueError(f"ModelConfig layer counts must be >= 0, got n_encoder_layers={enc}, n_decoder_layers={dec}")
        need = {"encoder": (enc > 0 and dec == 0), "decoder": (dec > 0 and enc == 0),
                "encoder-decoder": (enc > 0 and dec > 0)}[self.family]
        if not need:
            raise ValueError(
                f"ModelConfig.family={self.family!r} does not fit n_encoder_layers={enc}, n_decoder_layers={dec}")
        if self.task in ("mlm", "pretraining", "qa") and self.family != "encoder":
            raise ValueError(f"ModelConfig.task={self.task!r} needs family 'encoder', got {self.family!r}")
        if self.task == "pretraining" and not self.pooler:
            raise ValueError("ModelConfig.task='pretraining' (MLM+NSP) needs pooler=True")
        if self.task == "classify":
            if self.num_labels < 1:
                raise ValueError(f"ModelConfig.num_labels={self.num_labels} must be >= 1")
            if self.labels is not None and len(self.labels) != self.num_labels:
                raise ValueError(
                    f"ModelConfig.labels has {len(self.labels)} names but num_labels={self.num_labels}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)} must be in [0, 1)")

    # ---- derived -------------------------------------------------------
    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    @property
    def causal(self) -> bool:
        return self.family == "decoder"

    @property
    def n_layers(self) -> int:
        return self.n_encoder_layers + self.n_decoder_layers

    # ---- serialisation -------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return self.from_dict({**self.to_dict(), **changes})

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = (_yaml().safe_dump(self.to_dict(), sort_keys=False) if path.suffix in (".yaml", ".yml")
                else json.dumps(self.to_dict(), indent=2) + "\n")
        path.write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            d = (_yaml().safe_load(path.read_text()) if path.suffix in (".yaml", ".yml")
                 else json.loads(path.read_text()))
        except (ValueError, Exception) as e:  # json.JSONDecodeError, yaml.YAMLError
            raise ValueError(f"{path}: cannot parse config: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"{path}: config must be a mapping, got {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """The config of a named preset (`PRESETS`), with `overrides` applied."""
        if name not in PRESETS:
            import difflib
            close = difflib.get_close_matches(str(name), PRESETS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown preset {name!r}; {hint}available: {', '.join(sorted(PRESETS))}")
        return cls.from_dict({**PRESETS[name], **overrides})


def _literal_values(tp) -> set:
    """The allowed strings of a Literal type (or of a Literal inside Optional); else empty."""
    if get_origin(tp) is Literal:
        return set(get_args(tp))
    return set().union(*(_literal_values(a) for a in get_args(tp))) if get_args(tp) else set()


def _has_type(value, tp) -> bool:
    """Whether `value` fits the annotation `tp` (numpy numbers count as numbers; a bool is no number)."""
    if get_origin(tp) is Literal:
        return value in get_args(tp)
    if get_args(tp) and get_origin(tp) is not list:  # Optional[...] / X | None
        return any(_has_type(value, a) for a in get_args(tp))
    if get_origin(tp) is list:
        return isinstance(value, list) and all(_has_type(v, get_args(tp)[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float):
        return not isinstance(value, bool) and isinstance(value, numbers.Integral if tp is int else numbers.Real)
    return isinstance(value, tp)


def _type_name(tp) -> str:
    if get_args(tp) and get_origin(tp) is not list:
        return " or ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _yaml():
    import yaml
    return yaml


_BERT = dict(family="encoder", vocab_size=30522, d_model=768, n_heads=12, n_encoder_layers=12,
             n_decoder_layers=0, d_ff=3072, max_len=512, position="learned", norm="layernorm",
             norm_placement="post", norm_eps=1e-12, embed_norm=True, activation="gelu",
             type_vocab_size=2, pooler=True, task="embed", pad_id=0, hf_arch="bert")
_GPT2 = dict(family="decoder", vocab_size=50257, d_model=768, n_heads=12, n_decoder_layers=12,
             d_ff=3072, max_len=1024, position="learned", norm="layernorm", norm_placement="pre",
             activation="gelu_tanh", bos_id=50256, eos_id=50256, hf_arch="gpt2")
_T5 = dict(family="encoder-decoder", vocab_size=32128, d_model=512, n_heads=8, n_encoder_layers=6,
           n_decoder_layers=6, d_ff=2048, max_len=512, position="relative", norm="rmsnorm",
           norm_placement="pre", norm_eps=1e-6, activation="relu", bias=False, attn_scale=1.0,
           tie_embeddings=True, logit_scale=512 ** -0.5, pad_id=0, eos_id=1, decoder_start_id=0,
           hf_arch="t5")
_BART = dict(family="encoder-decoder", vocab_size=50265, d_model=768, n_heads=12, n_encoder_layers=6,
             n_decoder_layers=6, d_ff=3072, max_len=1024, position="learned", pos_offset=2,
             norm="layernorm", norm_placement="post", embed_norm=True, activation="gelu",
             lm_head_bias=True, pad_id=1, bos_id=0, eos_id=2, decoder_start_id=2, hf_arch="bart")
_LLAMA = dict(family="decoder", vocab_size=49152, d_model=576, n_heads=9, n_kv_heads=3,
              n_decoder_layers=30, d_ff=1536, max_len=8192, position="rope", rope_theta=100000.0,
              norm="rmsnorm", norm_placement="pre", norm_eps=1e-5, activation="swiglu", bias=False,
              tie_embeddings=True, hf_arch="llama")
# "Attention Is All You Need", base model: 6+6 layers, d_model 512, 8 heads, d_ff 2048,
# sinusoidal positions, post-norm, shared 37k BPE vocabulary with three-way weight tying.
_PAPER = dict(family="encoder-decoder", vocab_size=37000, d_model=512, n_heads=8, n_encoder_layers=6,
              n_decoder_layers=6, d_ff=2048, max_len=512, position="sinusoidal", norm="layernorm",
              norm_placement="post", norm_eps=1e-6, activation="relu", embed_scale=True, dropout=0.1,
              attn_dropout=0.0)

PRESETS: dict[str, dict] = {
    "transformer-base": _PAPER,
    "bert-base": _BERT,
    "gpt2": _GPT2,
    "t5-small": _T5,
    "bart-base": _BART,
    "llama-small": _LLAMA,
    # tiny variants for tests and CPU experiments
    "transformer-tiny": {**_PAPER, "vocab_size": 8000, "d_model": 256, "n_heads": 4, "d_ff": 1024,
                         "n_encoder_layers": 3, "n_decoder_layers": 3},
    "bert-tiny": {**_BERT, "vocab_size": 1000, "d_model": 64, "n_heads": 4, "n_encoder_layers": 2,
                  "d_ff": 128, "max_len": 128, "task": "pretraining"},
    "gpt-tiny": {**_GPT2, "vocab_size": 1000, "d_model": 64, "n_heads": 4, "n_decoder_layers": 2,
                 "d_ff": 256, "max_len": 128, "bos_id": None, "eos_id": None},
    "t5-tiny": {**_T5, "vocab_size": 1000, "d_model": 64, "n_heads": 4, "n_encoder_layers": 2,
                "n_decoder_layers": 2, "d_ff": 128, "logit_scale": 64 ** -0.5},
    "bart-tiny": {**_BART, "vocab_size": 1000, "d_model": 64, "n_heads": 4, "n_encoder_layers": 2,
                  "n_decoder_layers": 2, "d_ff": 128, "max_len": 128},
    "llama-tiny": {**_LLAMA, "vocab_size": 1000, "d_model": 64, "n_heads": 4, "n_kv_heads": 2,
                   "n_decoder_layers": 2, "d_ff": 128, "max_len": 256},
}

