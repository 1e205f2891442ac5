"""What one generation works on: its prompts, its stop conditions and its decoding state.

`prepare` validates and pads the prompts for a `GenerationConfig` (a `Prepared`);
`DecoderState.prefill` runs the (left-padded) prompt, in one pass or in chunks, or encodes
the source once and feeds `decoder_start_id`, and `step(tokens)` feeds one token per row into
the preallocated KV cache and returns the next-token logits (B, V), the same way for every
family. A state owns its generation's `RowBlocks` (small weights laid out for products of a
few rows), made anew for each generation, so a weight changed between two generations is
always seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmforge.generate.compiled import bucket_length, compiled_step
from lmforge.generate.config import GenerationConfig, _count
from lmforge.generate.native import FLOAT_ROWS_MAX, FloatStep, NativeStep, float_fits, native_fits
from lmforge.models import qkernel
from lmforge.models.heads import check_token_ids
from lmforge.nn.attention import KVCache
from lmforge.nn.linear import RowBlocks

TRUNCATE_HINT = "pass truncate=True (--truncate on the command line) to keep its last tokens"


# ---- prompts -----------------------------------------------------------------------------------
def _rows(input_ids, attention_mask) -> list[list[int]]:
    """Prompts as lists of real tokens, from a tensor (+ mask), a list of ids or a list of lists."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, S) or (S,), got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            return ids.tolist()
        mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
        return [[t for t, m in zip(r, mr) if m] for r, mr in zip(ids.tolist(), mask.tolist())]
    if attention_mask is not None:
        raise ValueError("attention_mask goes with a tensor of input_ids; lists are padded here")
    if len(input_ids) and all(isinstance(t, int) for t in input_ids):
        return [list(input_ids)]
    return [list(r) for r in input_ids]


def _check_lm(cfg) -> None:
    if cfg.family == "encoder" or cfg.task != "lm":
        raise ValueError(f"generation needs a decoder or encoder-decoder LM, got family={cfg.family!r} "
                         f"task={cfg.task!r}")


def prepare_prompts(model, input_ids, attention_mask=None, *, max_new_tokens: int, truncate: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate and pad prompts: (ids (B, S), mask (B, S) or None when nothing is padded).

    Decoder-only prompts are left-padded (the last column is every row's last token);
    encoder sources are right-padded. The context window is `cfg.max_len`: a decoder-only
    prompt plus max_new_tokens, or an encoder source, must fit in it, else ValueError
    unless truncate=True, which keeps the last tokens of each prompt.
    """
    cfg = model.cfg
    _check_lm(cfg)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be an int > 0, got {max_new_tokens!r}")
    rows = _rows(input_ids, attention_mask)
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("empty prompt: every prompt needs at least one token")
    decoder_only = cfg.family == "decoder"
    if decoder_only:
        if max_new_tokens >= cfg.max_len:  # about the option, whatever the prompt
            raise ValueError(f"max_new_tokens={max_new_tokens} does not fit the model's context of "
                             f"{cfg.max_len} tokens with a prompt of at least one token; "
                             f"use at most {cfg.max_len - 1}")
        window = cfg.max_len - max_new_tokens
        what = f"{cfg.max_len} tokens of context minus max_new_tokens={max_new_tokens}"
    else:
        if max_new_tokens + 1 > cfg.max_len:
            raise ValueError(f"max_new_tokens={max_new_tokens} does not fit the decoder's context of "
                             f"{cfg.max_len} tokens (one position goes to the start token); "
                             f"use at most {cfg.max_len - 1}")
        window, what = cfg.max_len, f"the model's context of {cfg.max_len} tokens"
    longest = max(len(r) for r in rows)
    if longest > window:
        if not truncate:
            raise ValueError(f"the prompt of {longest} tokens does not fit: {window} are left for it "
                             f"({what}); {TRUNCATE_HINT}")
        rows = [r[-window:] for r in rows]
        longest = window
    pad = cfg.pad_id if cfg.pad_id is not None else 0
    dev = model.backbone.tokens.weight.device
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(longest - len(r), longest) if decoder_only else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    check_token_ids(ids, cfg.vocab_size, "the prompt")
    return ids.to(dev), (None if bool(mask.all()) else mask.to(dev))


def fit_to_context(model, prompt_len: int, config: GenerationConfig) -> tuple[GenerationConfig, str | None]:
    """`config` with max_new_tokens clipped to what the model's context leaves beside a prompt of
    `prompt_len` tokens, and a one-line note saying so (None when nothing changed).

    A decoder-only prompt keeps its tokens: the answer gets the rest of the context. With
    truncate=True a long prompt gives up its first tokens down to half the context; without
    it, a prompt that fills the context is a ValueError."""
    cfg, n = model.cfg, config.max_new_tokens
    _check_lm(cfg)
    if cfg.family == "decoder":
        room = cfg.max_len - prompt_len
        if config.truncate:
            room = max(room, cfg.max_len // 2)
        elif room < 1:
            raise ValueError(f"the prompt of {prompt_len} tokens does not fit the model's context of "
                             f"{cfg.max_len} tokens; {TRUNCATE_HINT}")
    else:
        room = cfg.max_len - 1  # the decoder's start token takes one position
    if room < 1 or n <= room:
        return config, None
    beside = f" beside a prompt of {prompt_len}" if cfg.family == "decoder" else ""
    return config.replace(max_new_tokens=room), (
        f"note: max_new_tokens {n} -> {room}, what the model's context of {cfg.max_len} tokens leaves{beside}")


# ---- stop conditions ---------------------------------------------------------------------------
def eos_list(model, eos_ids) -> list[int]:
    """The EOS ids of a generation: `eos_ids`, else the model's eos_id, else none."""
    if eos_ids is None:
        eos_ids = model.cfg.eos_id
    if eos_ids is None:
        return []
    ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"eos_ids must be an int or a list of ints, got {eos_ids!r}")
    return ids


class StopStrings:
    """Stops a row once the decoded text of its new tokens contains one of `strings`."""

    def __init__(self, tokenizer, strings: Sequence[str]):
        if isinstance(strings, str):
            strings = [strings]
        if strings and tokenizer is None:
            raise ValueError("stop strings need a tokenizer (anything with decode(ids) -> str)")
        if any(not isinstance(s, str) or not s for s in strings):
            raise ValueError(f"stop strings must be non-empty strings, got {list(strings)!r}")
        self.tokenizer, self.strings = tokenizer, list(strings)

    def __bool__(self) -> bool:
        return bool(self.strings)

    def find(self, text: str) -> int:
        """Index of the earliest stop string in text, or -1."""
        hits = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return min(hits) if hits else -1

    def hits(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (N, T) new tokens → (N,) bool: the text of the row contains a stop string."""
        return torch.tensor([self.find(self.tokenizer.decode(r)) >= 0 for r in rows.tolist()],
                            dtype=torch.bool, device=rows.device)

    def cut(self, text: str) -> str:
        i = self.find(text) if self.strings else -1
        return text if i < 0 else text[:i]


@dataclass
class Prepared:
    """One generation's inputs, checked: padded prompts, EOS ids, stop strings, random generator."""

    config: GenerationConfig
    ids: torch.Tensor  # (B, S)
    mask: torch.Tensor | None  # (B, S) or None when nothing is padded
    eos: list[int]
    stop: StopStrings
    pad: int  # the token of rows that have ended
    generator: torch.Generator | None = None
    tokenizer: object = None


def prepare(model, input_ids, attention_mask, config: GenerationConfig, *, eos_ids=None, generator=None,
            tokenizer=None) -> Prepared:
    """Check and pad everything a generation needs (errors before the first step)."""
    eos = eos_list(model, eos_ids)
    stop = StopStrings(tokenizer, config.stop)
    ids, mask = prepare_prompts(model, input_ids, attention_mask, max_new_tokens=config.max_new_tokens,
                                truncate=config.truncate)
    if config.prompt_lookup and ids.shape[0] != 1:
        raise ValueError("prompt_lookup works with greedy decoding of one prompt, not a batch of "
                         f"{ids.shape[0]}")
    if generator is None and config.seed is not None:
        generator = torch.Generator(device=ids.device).manual_seed(config.seed)
    pad = model.cfg.pad_id if model.cfg.pad_id is not None else (eos[0] if eos else 0)
    return Prepared(config, ids, mask, eos, stop, pad, generator, tokenizer)


# ---- one decoding step for every family ---------------------------------------------------------
class DecoderState:
    """Everything one decoding step needs: the model, its KV cache (which carries the
    generation's RowBlocks to every layer) and, for encoder-decoders, the encoder memory; for
    left-padded decoder batches the growing attention mask and the next position of each
    row (HF: position = cumsum(mask) - 1)."""

    def __init__(self, model, cache: KVCache, memory=None, memory_mask=None, mask=None, positions=None,
                 compiled: bool = False):
        self.model, self.cache = model, cache
        self.memory, self.memory_mask = memory, memory_mask  # (B, S, d), (B, S) or None
        self.mask = mask  # (B, cache length) 1 for real tokens, or None when unpadded
        self.positions = positions  # (B, 1) position of the next token, or None when unpadded
        self.compiled = compiled  # steps through `compiled_step` (after the first, for encoder-decoders)
        self._step = None  # (shape, its compiled step): the weights do not change within a generation
        self._native = None  # a `NativeStep` where it applies (one unpadded row; see lmforge.generate.native)
        self._float = None  # a `FloatStep` where it applies (float32 on CPU; see lmforge.generate.native)

    @classmethod
    @torch.inference_mode()
    def prefill(cls, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                max_new_tokens: int, compiled: bool = False, chunk: int | None = None
                ) -> tuple[DecoderState, torch.Tensor]:
        """Run the prompt (decoder) or encode the source and feed the start token (encoder-decoder).

        input_ids (B, S) as `prepare_prompts` returns them. Returns the state and the logits
        (B, V) of the first new token. compiled=True: the steps after that go through
        `lmforge.generate.compiled` (the prompt itself runs eagerly). chunk (decoder only;
        0 or None: one pass) runs the prompt `chunk` positions at a time, each pass writing
        its keys and values to the cache and attending to those before it, the way a decoding
        step does: the peak memory of a pass grows with chunk x S instead of S x S. It is not
        on by default because other kernels reduce in another order: the logits agree with one
        pass within float rounding, not bit for bit, so a near tie could pick another token.
        """
        _count("prefill_chunk", chunk or 0, 0)
        cfg, bb = model.cfg, model.backbone
        B, S = input_ids.shape
        dtype, dev = bb.tokens.weight.dtype, input_ids.device
        blocks = RowBlocks()  # this generation's: made on first use, dropped with the state
        seq2seq = cfg.family == "encoder-decoder"
        length = max_new_tokens + 1 if seq2seq else S + max_new_tokens
        native = B == 1 and attention_mask is None and native_fits(model)
        floating = not native and float_fits(model, B)
        compiled = compiled and not (native or floating)  # a native step is the faster where it applies
        if compiled:  # a length that later generations share (one compiled graph per length)
            length = bucket_length(length, cfg.max_len)
        # a native step reads the weights as they are: the prompt (or T5's start token) then runs
        # without RowBlocks, whose stacked copies it would make for nothing (3.6 ms on the GPT-2-like
        # model of bench/decode.py, a fifth of its 32-token prompt); an eager step after it has them
        cache = KVCache.for_model(cfg, B, length, dtype, dev, None if native or floating else blocks,
                                  per_layer=compiled)
        if seq2seq:
            if cfg.decoder_start_id is None:
                raise ValueError("ModelConfig.decoder_start_id is needed to generate with an encoder-decoder")
            memory = bb.encode(input_ids, attention_mask)  # (B, S, d)
            state = cls(model, cache, memory, attention_mask)
            start = torch.full((B,), cfg.decoder_start_id, dtype=torch.long, device=dev)
            logits = state.step(start)  # eager: it projects the encoder memory for cross-attention
            state.compiled = compiled
            if floating:
                state._float = FloatStep(model)
                cache.gather_rows = qkernel.gather_rows  # beam reorders, copied by the kernels' threads
            cache.blocks = blocks
            return state, logits
        if attention_mask is None:
            state, positions = cls(model, cache, compiled=compiled), None
        else:
            mask = torch.ones(B, length, dtype=torch.long, device=dev)
            mask[:, :S] = attention_mask
            positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)  # (B, S)
            state = cls(model, cache, mask=mask, positions=positions[:, -1:] + 1, compiled=compiled)
        size = chunk or S
        for start in range(0, S, size):  # the mask covers the cached columns too: (B, end)
            end = min(start + size, S)
            hidden = bb.decode(input_ids[:, start:end], cache=cache,
                               attention_mask=None if attention_mask is None else attention_mask[:, :end],
                               position_ids=None if positions is None else positions[:, start:end])
        cache.blocks = blocks
        if native:
            state._native = NativeStep(model, cache.buf)
        if floating:
            state._float = FloatStep(model)
            cache.gather_rows = qkernel.gather_rows
        return state, model.logits(hidden[:, -1:])[:, 0].float()  # only the last position's

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row, tokens (B,); return the next-token logits (B, V) in float32."""
        if not torch.is_inference_mode_enabled():  # the loops call it inside: entering it costs µs a step
            with torch.inference_mode():
                return self._feed(tokens)
        return self._feed(tokens)

    def _feed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._native is not None:
            if self._native.serves(self.cache.buf) and self.cache.batch == 1:
                logits = self._native(int(tokens.reshape(-1)[0]), self.cache.pos)
                self.cache.pos += 1
                return logits
            self._native = None  # beam search made rows of the cache: the eager step from now on
        if self._float is not None and tokens.numel() <= FLOAT_ROWS_MAX:
            logits = self._float(tokens, self.cache, self.mask, self.positions, self.memory_mask)
            self.cache.pos += 1
            if self.positions is not None:
                self.positions = self.positions + 1
            return logits
        if self.compiled:
            return self._compiled_step(tokens)
        cache, mask = self.cache, self.mask
        hidden = self.model.backbone.decode(
            tokens.view(-1, 1), memory=self.memory, memory_mask=self.memory_mask,
            attention_mask=None if mask is None else mask[:, :cache.pos + 1],
            position_ids=self.positions, cache=cache)  # (B, 1, d)
        logits = self.model.logits(hidden)[:, 0].float()
        if self.positions is not None:
            self.positions = self.positions + 1
        return logits

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The greedy tokens logits.argmax(-1) (B,): the float step's own when `logits` are what
        its last step returned, unchanged (it takes them in the same call)."""
        return self._float.argmax(logits) if self._float is not None else logits.argmax(-1)

    def _compiled_step(self, tokens: torch.Tensor) -> torch.Tensor:
        cache, B = self.cache, tokens.shape[0]
        tokens = tokens.to(torch.long).clone()  # always the same kind of input (an inference tensor)
        at = torch.tensor(cache.pos, device=tokens.device)
        positions = self.positions if self.positions is not None else at.view(1, 1).expand(B, 1)
        key_mask = self.mask  # None: nothing padded, every column is a real token once written
        if key_mask is None:
            key_mask = torch.ones(B, cache.max_len, dtype=torch.long, device=tokens.device)
        memory = self.memory
        shape = (B, cache.max_len, None if memory is None else tuple(memory.shape), self.memory_mask is None)
        if self._step is None or self._step[0] != shape:  # looked up once per shape (beam search grows B)
            self._step = shape, compiled_step(self.model, shape)
        step = self._step[1]
        logits = step(cache.kv, at, tokens, positions, key_mask, memory, self.memory_mask,
                      cache.cross, cache.rel_bias)
        cache.pos += 1
        if self.positions is not None:
            self.positions = self.positions + 1
        return logits

    @torch.inference_mode()
    def step_many(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed T tokens of one unpadded row, tokens (T,); return the logits after each (T, V).
        With `rewind` this verifies guessed continuations (prompt lookup decoding)."""
        if self.mask is not None or self.cache.batch != 1:
            raise ValueError("step_many feeds one unpadded row")
        hidden = self.model.backbone.decode(tokens.view(1, -1), memory=self.memory,
                                            memory_mask=self.memory_mask, cache=self.cache)
        return self.model.logits(hidden)[0].float()

    def rewind(self, pos: int) -> None:
        """Forget every cached position from `pos` on (they are overwritten by the next step)."""
        if not 0 <= pos <= self.cache.pos:
            raise ValueError(f"cannot rewind to position {pos}; the cache holds {self.cache.pos}")
        self.cache.pos = pos

    def reorder(self, index: torch.Tensor, same_source: bool = False) -> None:
        """Keep rows `index` (B',): repeat each prompt for its beams, or reorder beams.

        same_source: row i and row index[i] come from the same prompt (beams of one prompt),
        so everything that depends only on the prompt (encoder memory, cross-attention k/v,
        padding, positions) stays and only the self-attention cache moves.
        """
        self.cache.reorder(index, cross=not same_source)
        if not same_source:
            pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
            self.memory, self.memory_mask = pick(self.memory), pick(self.memory_mask)
            self.mask, self.positions = pick(self.mask), pick(self.positions)
