"""The Python API: load any supported checkpoint in one call, save in our format or HF's.

    model, tok = lmforge.load("path/to/dir")          # lmforge dir, HF dir, or a .gguf file
    logits = model(**batch)                           # head outputs for a padded batch
    lmforge.save(model, "out/", tokenizer=tok)        # lmforge format (or format="hf")
"""

from __future__ import annotations

from lmforge.interop.load import load, save  # noqa: F401  (the API's load/save; defined below it for lmforge.tasks)
from lmforge.models.heads import Model
from lmforge.tokenizer import Tokenizer


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

