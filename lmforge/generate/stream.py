"""Text streaming: turn a token stream into text pieces that never split a character.

A byte-level tokenizer can end a token in the middle of a UTF-8 character; decoding such a
prefix gives U+FFFD. `text_deltas` decodes the whole sequence so far and emits only the new
stable suffix, holding text back while it ends in U+FFFD or could be the start of a stop
string. The concatenated pieces equal the non-streaming `generate(...).texts[0]`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from lmforge.generate.config import GenerationConfig
from lmforge.generate.search import stream_tokens
from lmforge.generate.state import StopStrings, eos_list

REPLACEMENT = "\ufffd"


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """How many trailing characters of text to keep back: a partial character (U+FFFD) or a
    suffix that could still grow into a stop string."""
    stable = text.rstrip(REPLACEMENT)
    hold = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(stable)), 0, -1):
            if stable.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - len(stable) + hold


def text_deltas(tokenizer, tokens: Iterable[int], stop_strings: Sequence[str] = ()) -> Iterator[str]:
    """Decode a stream of token ids into text pieces; stop (and cut) at the first stop string.

    tokenizer: anything with decode(ids) -> str. The stream should not contain EOS.
    """
    stop = StopStrings(tokenizer, stop_strings)
    ids: list[int] = []
    sent = 0  # characters already emitted
    text = ""
    for t in tokens:
        ids.append(int(t))
        text = tokenizer.decode(ids)
        cut = stop.find(text) if stop else -1
        if cut >= 0:
            if cut > sent:
                yield text[sent:cut]
            return
        end = len(text) - _held_back(text, stop.strings)
        if end > sent:
            yield text[sent:end]
            sent = end
    if len(text) > sent:  # the stream ended: flush what was held back
        yield text[sent:]


def stream_text(model, tokenizer, prompt: str, config: GenerationConfig | None = None, *,
                eos_ids: int | Sequence[int] | None = None, **options) -> Iterator[str]:
    """Yield the continuation of `prompt` (or, for an encoder-decoder, the output for the source)
    as text pieces while it is generated, with greedy decoding or sampling (`config`, or its
    fields as keywords).

    tokenizer: anything with encode(text) -> list[int] and decode(ids) -> str. Ends on EOS
    (not part of the text), after max_new_tokens, or before the first stop string.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    config = GenerationConfig.of(config, **options)
    eos = set(eos_list(model, eos_ids))
    # stop strings are found in the text here; the token stream runs without them
    stream = stream_tokens(model, tokenizer.encode(prompt), config=config.replace(stop=()), eos_ids=eos_ids)
    stop_strings = config.stop

    def ids():
        for tokens in stream:
            t = int(tokens[0])
            if t in eos:
                return
            yield t

    def pieces():
        try:
            yield from text_deltas(tokenizer, ids(), stop_strings)
        finally:
            stream.close()
    return pieces()
