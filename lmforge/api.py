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


def generate_text(model: Model, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int = 64,
                  strategy: str = "greedy", num_beams: int = 4, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                  no_repeat_ngram_size: int = 0, seed: int | None = None, stop: list[str] | tuple = (),
                  stream: bool = False, truncate: bool = False, prompt_lookup: int = 0):
    """Text in, text out: the continuation of `prompt` (the target for an encoder-decoder's source).
    With stream=True, an iterator of text pieces (greedy or sampling). prompt_lookup=k: greedy
    decoding that guesses k tokens ahead from the prompt (same text, faster when it repeats)."""
    from lmforge.generate import SamplingParams, generate, stream_text
    if tokenizer is None:
        raise ValueError("text generation needs a tokenizer saved with the model")
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty)
    if stream:
        if strategy == "beam":
            raise ValueError("streaming works with strategy 'greedy' or 'sample', not 'beam'")
        return stream_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, strategy=strategy,
                           sampling=sampling, seed=seed, stop_strings=stop,
                           no_repeat_ngram_size=no_repeat_ngram_size, truncate=truncate, prompt_lookup=prompt_lookup)
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("the prompt is empty")
    out = generate(model, [tokenizer.encode(prompt)], max_new_tokens=max_new_tokens, strategy=strategy,
                   sampling=sampling, num_beams=num_beams if strategy == "beam" else 1,
                   no_repeat_ngram_size=no_repeat_ngram_size, seed=seed, stop_strings=stop,
                   tokenizer=tokenizer, truncate=truncate, prompt_lookup=prompt_lookup)
    return out.texts[0]
