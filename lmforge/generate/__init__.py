"""Generation: one `GenerationConfig` of options, logits filters, greedy/sampling token stream,
beam search, prompt lookup, text streaming."""

from lmforge.generate.config import GenerationConfig
from lmforge.generate.filters import SamplingParams
from lmforge.generate.search import Generation, beam_search, generate, stream_tokens
from lmforge.generate.state import DecoderState, fit_to_context, prepare_prompts
from lmforge.generate.stream import stream_text, text_deltas

__all__ = ["GenerationConfig", "SamplingParams", "DecoderState", "Generation", "beam_search", "generate",
           "fit_to_context", "prepare_prompts", "stream_tokens", "stream_text", "text_deltas"]
