"""Generation: one `GenerationConfig` of options, logits filters, greedy/sampling token stream,
beam search, prompt lookup, text streaming.

    config.py    GenerationConfig: the options, their defaults, help and validation
    filters.py   logits filters (penalties, temperature, top-k, top-p, min-p) = HF's
    state.py     prompts, stop conditions, DecoderState (prefill / step / reorder / rewind)
    sampling.py  the greedy and sampling loop
    beam.py      beam search
    lookup.py    prompt lookup decoding
    search.py    generate, stream_tokens, beam_search: the entry points
    stream.py    text streaming that never splits a character

The names below are imported on first use, so `lmforge.generate.config` (the CLI's flags)
loads without torch.
"""

from importlib import import_module

_EXPORTS = {"GenerationConfig": "config", "SamplingParams": "filters", "DecoderState": "state",
            "fit_to_context": "state", "prepare_prompts": "state", "Generation": "search",
            "beam_search": "search", "generate": "search", "stream_tokens": "search",
            "stream_text": "stream", "text_deltas": "stream"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmforge.generate' has no attribute {name!r}")
    return getattr(import_module(f"lmforge.generate.{_EXPORTS[name]}"), name)


def __dir__():
    return sorted(list(globals()) + __all__)
