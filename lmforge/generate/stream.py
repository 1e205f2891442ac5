"""Text streaming: turn a token stream into text pieces that never split a character.

A byte-level tokenizer can end a token in the middle of a UTF-8 character; decoding such a
prefix gives U+FFFD. `text_deltas` decodes the whole sequence so far and emits only the new
stable suffix, holding text back while it ends in U+FFFD or could be the start of a stop
string (`Detokenizer` does the same one token at a time). The concatenated pieces equal the non-streaming `generate(...).texts[0]`.
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


class Detokenizer:
    """Push-based `text_deltas`: feed token ids one at a time, get the stable new text.

    push(token) -> the text to emit now ("" while a character or a possible stop string is
    held back); `stopped` turns True once a stop string appears (the text is cut before it
    and later pushes are ignored); flush() -> what was held back, at the end of the stream.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.stop = StopStrings(tokenizer, stop_strings)
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters already emitted
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token))
        self.text = text = self.tokenizer.decode(self.ids)
        cut = self.stop.find(text) if self.stop else -1
        if cut >= 0:
            self.stopped = True
            piece = text[self.sent:cut] if cut > self.sent else ""
            self.sent = max(self.sent, cut)
            return piece
        end = len(text) - _held_back(text, self.stop.strings)
        if end <= self.sent:
            return ""
        piece, self.sent = text[self.sent:end], end
        return piece

    def flush(self) -> str:
        """The text held back, once the stream has ended (nothing after a stop string)."""
        if self.stopped or len(self.text) <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece


def text_deltas(tokenizer, tokens: Iterable[int], stop_strings: Sequence[str] = ()) -> Iterator[str]:
    """Decode a stream of token ids into text pieces; stop (and cut) at the first stop string.

    tokenizer: anything with decode(ids) -> str. The stream should not contain EOS.
    """
    d = Detokenizer(tokenizer, stop_strings)
    for t in tokens:
        piece = d.push(t)
        if piece:
            yield piece
        if d.stopped:
            return
    piece = d.flush()
    if piece:
        yield piece


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
