"""Generation: logits filters, greedy/sampling token stream, beam search, text streaming."""

from lmforge.generate.filters import SamplingParams
from lmforge.generate.search import (
    DecoderState,
    Generation,
    beam_search,
    generate,
    prepare_prompts,
    stream_tokens,
)
from lmforge.generate.stream import stream_text, text_deltas

__all__ = ["SamplingParams", "DecoderState", "Generation", "beam_search", "generate", "prepare_prompts",
           "stream_tokens", "stream_text", "text_deltas"]
