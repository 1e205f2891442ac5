"""`GenerationConfig`: the one definition of the generation options.

The Python API (`generate(model, ids, config=...)` or the same options as keywords),
`api.generate_text`, the CLI (one flag per field, `lmforge.cli`) and the server (one
request field per option, `lmforge.serve`) all take these fields, with these defaults and
this validation. Each field's help text lives in its metadata. Importing this module does
not import torch (the CLI builds its flags from it).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from lmforge.generate.filters import SamplingParams

STRATEGIES = ("greedy", "sample", "beam")
DEFAULT_BEAMS = 4


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate; every field is checked at construction (ValueError names it)."""

    max_new_tokens: int = field(default=64, metadata=_help("new tokens per answer, at most"))
    strategy: Literal["greedy", "sample", "beam"] = field(
        default="greedy", metadata=_help("greedy (argmax), sample, or beam search"))
    num_beams: int | None = field(
        default=None, metadata=_help(f"beams of strategy beam; none means {DEFAULT_BEAMS}"))
    length_penalty: float = field(
        default=1.0, metadata=_help("beam: a finished answer scores sum(log p) / length**length_penalty"))
    early_stopping: bool | Literal["never"] = field(
        default=False, metadata=_help("beam: true stops once num_beams answers are done; false when the best "
                                      "running beam cannot win; never: when it could not win at max length",
                                      choices=(False, True, "never")))
    num_return_sequences: int = field(
        default=1, metadata=_help("answers per prompt (strategy sample or beam)"))
    temperature: float = field(default=1.0, metadata=_help("sample: divide the logits by this (> 0)"))
    top_k: int = field(default=0, metadata=_help("sample: keep the k most likely tokens (0: all)"))
    top_p: float = field(default=1.0, metadata=_help("sample: nucleus, keep the most likely tokens of this "
                                                     "probability mass (1: all)"))
    min_p: float = field(default=0.0, metadata=_help("sample: drop tokens below min_p x the top probability"))
    repetition_penalty: float = field(
        default=1.0, metadata=_help("penalise tokens already in the text (1: off; CTRL's 1.2)"))
    no_repeat_ngram_size: int = field(default=0, metadata=_help("never repeat an n-gram of this size (0: off)"))
    min_new_tokens: int = field(default=0, metadata=_help("no EOS before this many new tokens"))
    seed: int | None = field(default=None, metadata=_help("random seed of strategy sample; none: a fresh one each time"))
    stop: tuple[str, ...] = field(default=(), metadata=_help("stop string: the answer ends before it (repeatable)"))
    prompt_lookup: int = field(
        default=0, metadata=_help("greedy: guess this many tokens ahead from the prompt and check them in one "
                                  "step (same text, faster when it repeats)"))
    truncate: bool = field(default=False, metadata=_help("keep the last tokens of a prompt too long for the "
                                                         "model's context instead of failing"))
    compile: bool = field(default=False, metadata=_help("decode with a compiled step (torch.compile): the first "
                                                        "generation of each batch size and length compiles it "
                                                        "(seconds to minutes), later ones run faster; where lmforge's native "
                                                        "step applies (float32 or int4 on CPU) it runs instead"))
    # off by default: chunks agree with one pass within float rounding, not bit for bit (DecoderState.prefill)
    prefill_chunk: int = field(
        default=0, metadata=_help("run a decoder-only prompt through the model this many tokens at a time (0: all "
                                  "at once): less memory for long prompts, the same logits up to float rounding"))

    def __post_init__(self):
        if isinstance(self.stop, str) or isinstance(self.stop, list):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if self.prefill_chunk is None:  # the Python API's "no chunks", like 0
            object.__setattr__(self, "prefill_chunk", 0)
        _count("max_new_tokens", self.max_new_tokens, 1)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        beam = self.strategy == "beam"
        if self.num_beams is not None:
            _count("num_beams", self.num_beams, 1)
            if not beam and self.num_beams != 1:
                raise ValueError(f"num_beams={self.num_beams} needs strategy='beam', got strategy={self.strategy!r}")
        R = self.num_return_sequences
        _count("num_return_sequences", R, 1)
        if beam and R > self.beams:
            raise ValueError(f"num_return_sequences must be in [1, num_beams={self.beams}], got {R!r}")
        if self.strategy == "greedy" and R != 1:
            raise ValueError(f"num_return_sequences={R} needs strategy='sample' or 'beam' (greedy has one answer)")
        if not isinstance(self.length_penalty, (int, float)) or not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        self.sampling  # noqa: B018  (validates temperature, top_k, top_p, min_p and the penalties)
        if beam and (self.temperature not in (0, 1) or self.top_k or self.top_p != 1 or self.min_p):
            raise ValueError("beam search is deterministic: temperature, top_k, top_p and min_p apply only to "
                             "strategy='sample'")
        _count("min_new_tokens", self.min_new_tokens, 0)
        if self.seed is not None:
            _count("seed", self.seed, 0)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        _count("prompt_lookup", self.prompt_lookup, 0, "(tokens guessed per step)")
        if self.prompt_lookup and (self.strategy != "greedy" or self.stop or self.no_repeat_ngram_size
                                   or self.min_new_tokens or self.repetition_penalty != 1.0):
            raise ValueError("prompt_lookup works with greedy decoding of one prompt, without stop strings, "
                             "min_new_tokens, repetition penalty or no_repeat_ngram_size")
        if self.compile and self.prompt_lookup:
            raise ValueError("compile and prompt_lookup do not go together: prompt lookup checks several "
                             "tokens a step, which runs eagerly")
        _count("prefill_chunk", self.prefill_chunk, 0, "(prompt tokens per pass; 0: the whole prompt)")
        for name in ("truncate", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def beams(self) -> int:
        """The number of beams of strategy 'beam'."""
        return self.num_beams if self.num_beams is not None else DEFAULT_BEAMS

    @property
    def sampling(self) -> SamplingParams:
        """The logits filters these options ask for (penalties; warpers when sampling)."""
        from lmforge.generate.filters import SamplingParams  # torch, loaded when generating
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty,
                              no_repeat_ngram_size=self.no_repeat_ngram_size).validate(self.strategy == "sample")

    def replace(self, **options) -> GenerationConfig:
        """A copy with `options` changed; an unknown name is a ValueError that lists the known ones."""
        unknown = sorted(set(options) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown generation option(s) {', '.join(unknown)}; "
                             f"the options are {', '.join(FIELDS)}")
        return dataclasses.replace(self, **options) if options else self

    @classmethod
    def of(cls, config: GenerationConfig | None = None, **options) -> GenerationConfig:
        """`config` (default: the defaults) with `options` changed."""
        if config is not None and not isinstance(config, GenerationConfig):
            raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
        return (config or cls()).replace(**options)

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in FIELDS}


FIELDS = tuple(f.name for f in dataclasses.fields(GenerationConfig))


def _count(name: str, value, least: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}{' ' + note if note else ''}, got {value!r}")


# ---- the command line: one flag per field ---------------------------------------------------------
def add_arguments(parser, **defaults) -> None:
    """Add one argparse flag per field (--max-new-tokens, --top-k, --truncate, ...) with its help
    and default; `defaults` overrides a field's default for this command."""
    hints = typing.get_type_hints(GenerationConfig)
    for f in dataclasses.fields(GenerationConfig):
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        default = defaults.get(f.name, f.default)
        text = f.metadata["help"] + " (default: %(default)s)"
        args = typing.get_args(kind)
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=text)
        elif "choices" in f.metadata:
            parser.add_argument(flag, type=_choice(f.metadata["choices"]), choices=f.metadata["choices"],
                                default=default, help=text)
        elif typing.get_origin(kind) is Literal:
            parser.add_argument(flag, choices=args, default=default, help=text)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, action="append", default=None, metavar="TEXT", help=f.metadata["help"])
        else:
            number = int if int in (kind, *args) else float
            parser.add_argument(flag, type=number, default=default, metavar="N" if number is int else "X", help=text)


def from_arguments(namespace) -> GenerationConfig:
    """The GenerationConfig of flags parsed after `add_arguments`."""
    return GenerationConfig(**{name: getattr(namespace, name) or () if name == "stop" else getattr(namespace, name)
                               for name in FIELDS})


def _choice(choices):
    """argparse type: the choice whose text is the argument ("true" → True), else the text."""
    def parse(text: str):
        return next((c for c in choices if str(c).lower() == text.lower()), text)
    return parse
