"""Greedy decoding, sampling and beam search over one decoding step shared by every family.

A `DecoderState` hides the difference between decoder-only and encoder-decoder models:
`DecoderState.prefill` runs the (left-padded) prompt, or encodes the source once and feeds
`decoder_start_id`; `step(tokens)` feeds one token per row into the preallocated KV cache
and returns the next-token logits (B, V). The strategies are free functions on top of it:

    stream_tokens  greedy (argmax) or sampling: one (B,) tensor of tokens per step
    beam_search    beam search with HF transformers' semantics and scores
    generate       the one entry point: validation, strategy, stop conditions, result

Prompt lookup decoding (`prompt_lookup=K`) checks K guessed tokens with one `step_many` and
`rewind`s the cache past the first wrong guess.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lmforge.generate.filters import (
    SamplingParams,
    min_new_tokens_filter,
    no_repeat_ngram_filter,
    repetition_penalty,
    sample_next,
)
from lmforge.nn.attention import KVCache
from lmforge.nn.layers import RowBlocks

STRATEGIES = ("greedy", "sample", "beam")


@dataclass
class Generation:
    """What `generate` returns. Rows are prompt-major: row i*R + r is answer r of prompt i.

    sequences: (N, T) new tokens, `pad` after a row has ended (its EOS token included).
    lengths: (N,) number of new tokens of each row, EOS included.
    scores: (N,) beam scores (sum of log-probs / length**length_penalty), beam search only.
    texts: decoded rows (without EOS, cut before a stop string) when a tokenizer was given.
    """

    sequences: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor | None = None
    texts: list[str] | None = None

    def tolist(self) -> list[list[int]]:
        """The rows as lists of new tokens, without the padding after their end."""
        return [row[:n] for row, n in zip(self.sequences.tolist(), self.lengths.tolist())]


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


def prepare_prompts(model, input_ids, attention_mask=None, *, max_new_tokens: int, truncate: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate and pad prompts: (ids (B, S), mask (B, S) or None when nothing is padded).

    Decoder-only prompts are left-padded (the last column is every row's last token);
    encoder sources are right-padded. The context window is `cfg.max_len`: a decoder-only
    prompt plus max_new_tokens, or an encoder source, must fit in it, else ValueError
    unless truncate=True, which keeps the last tokens of each prompt.
    """
    cfg = model.cfg
    if cfg.family == "encoder" or cfg.task != "lm":
        raise ValueError(f"generation needs a decoder or encoder-decoder LM, got family={cfg.family!r} "
                         f"task={cfg.task!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be an int > 0, got {max_new_tokens!r}")
    rows = _rows(input_ids, attention_mask)
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("empty prompt: every prompt needs at least one token")
    decoder_only = cfg.family == "decoder"
    if decoder_only:
        window, what = cfg.max_len - max_new_tokens, f"max_len={cfg.max_len} minus max_new_tokens={max_new_tokens}"
    else:
        if max_new_tokens + 1 > cfg.max_len:
            raise ValueError(f"max_new_tokens={max_new_tokens} does not fit the decoder's context window "
                             f"(max_len={cfg.max_len}, one position goes to the start token)")
        window, what = cfg.max_len, f"max_len={cfg.max_len}"
    longest = max(len(r) for r in rows)
    if longest > window:
        if not truncate:
            raise ValueError(f"prompt of {longest} tokens is longer than the context window ({what}); "
                             f"pass truncate=True to keep its last tokens")
        if window <= 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt (max_len={cfg.max_len})")
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
    return ids.to(dev), (None if bool(mask.all()) else mask.to(dev))


# ---- one decoding step for every family ---------------------------------------------------------
class DecoderState:
    """Everything one decoding step needs: the model, its KV cache and, for encoder-decoders,
    the encoder memory; for left-padded decoder batches the growing attention mask and the
    next position of each row (HF: position = cumsum(mask) - 1)."""

    def __init__(self, model, cache: KVCache, memory=None, memory_mask=None, mask=None, positions=None):
        self.model, self.cache = model, cache
        self.blocks = RowBlocks.of(model)  # small weights laid out for GEMMs of a few rows
        self.memory, self.memory_mask = memory, memory_mask  # (B, S, d), (B, S) or None
        self.mask = mask  # (B, prompt + max_new) 1 for real tokens, or None when unpadded
        self.positions = positions  # (B, 1) position of the next token, or None when unpadded

    @classmethod
    @torch.inference_mode()
    def prefill(cls, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                max_new_tokens: int) -> tuple[DecoderState, torch.Tensor]:
        """Run the prompt (decoder) or encode the source and feed the start token (encoder-decoder).

        input_ids (B, S) as `prepare_prompts` returns them. Returns the state and the logits
        (B, V) of the first new token.
        """
        cfg, bb = model.cfg, model.backbone
        B, S = input_ids.shape
        dtype, dev = bb.tokens.weight.dtype, input_ids.device
        if cfg.family == "encoder-decoder":
            if cfg.decoder_start_id is None:
                raise ValueError("ModelConfig.decoder_start_id is needed to generate with an encoder-decoder")
            memory = bb.encode(input_ids, attention_mask)  # (B, S, d)
            cache = KVCache.for_model(cfg, B, max_new_tokens + 1, dtype, dev)
            state = cls(model, cache, memory, attention_mask)
            start = torch.full((B,), cfg.decoder_start_id, dtype=torch.long, device=dev)
            return state, state.step(start)
        cache = KVCache.for_model(cfg, B, S + max_new_tokens, dtype, dev)
        if attention_mask is None:
            state, positions = cls(model, cache), None
        else:
            mask = torch.ones(B, S + max_new_tokens, dtype=torch.long, device=dev)
            mask[:, :S] = attention_mask
            positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)  # (B, S)
            state = cls(model, cache, mask=mask, positions=positions[:, -1:] + 1)
        with state.blocks:
            hidden = bb.decode(input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache)
            return state, model.logits(hidden[:, -1:])[:, 0].float()

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row, tokens (B,); return the next-token logits (B, V) in float32."""
        cache, mask = self.cache, self.mask
        with self.blocks:
            hidden = self.model.backbone.decode(
                tokens.view(-1, 1), memory=self.memory, memory_mask=self.memory_mask,
                attention_mask=None if mask is None else mask[:, :cache.pos + 1],
                position_ids=self.positions, cache=cache)  # (B, 1, d)
            logits = self.model.logits(hidden)[:, 0].float()
        if self.positions is not None:
            self.positions = self.positions + 1
        return logits

    @torch.inference_mode()
    def step_many(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed T tokens of one unpadded row, tokens (T,); return the logits after each (T, V).
        With `rewind` this verifies guessed continuations (prompt lookup decoding)."""
        if self.mask is not None or self.cache.batch != 1:
            raise ValueError("step_many feeds one unpadded row")
        with self.blocks:
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


# ---- stop conditions ---------------------------------------------------------------------------
def _eos_list(model, eos_ids) -> list[int]:
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
            raise ValueError("stop_strings need a tokenizer (anything with decode(ids) -> str)")
        if any(not isinstance(s, str) or not s for s in strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {list(strings)!r}")
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


def _history(model, input_ids, attention_mask, max_new_tokens):
    """Token history the penalties see, (B, P + max_new): the prompt (decoder-only; left pads
    become the out-of-vocabulary id V, so they never count) or the start token (encoder-decoder)."""
    cfg = model.cfg
    if cfg.family == "encoder-decoder":
        prompt = torch.full((input_ids.shape[0], 1), cfg.decoder_start_id, dtype=torch.long, device=input_ids.device)
    else:
        prompt = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, cfg.vocab_size)
    hist = torch.zeros(prompt.shape[0], prompt.shape[1] + max_new_tokens, dtype=torch.long, device=prompt.device)
    hist[:, :prompt.shape[1]] = prompt
    return hist, prompt.shape[1]


def _penalties(logits, hist, params: SamplingParams, ngram: int):
    """Repetition penalty and no-repeat-ngram (the processors greedy and beam search apply)."""
    logits = repetition_penalty(logits, hist, params.repetition_penalty)
    return no_repeat_ngram_filter(logits, hist, ngram)


def _ngram(sampling: SamplingParams, no_repeat_ngram_size: int) -> int:
    n, m = no_repeat_ngram_size, sampling.no_repeat_ngram_size
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"no_repeat_ngram_size must be an int >= 0, got {n!r}")
    if n and m and n != m:
        raise ValueError(f"no_repeat_ngram_size={n} disagrees with sampling.no_repeat_ngram_size={m}")
    return n or m


# ---- greedy and sampling -----------------------------------------------------------------------
def _token_loop(model, input_ids, attention_mask, *, max_new_tokens, sampling, do_sample, eos_ids,
                min_new_tokens, generator, stop, ngram):
    """Yields (tokens (B,), done (B,) bool after this token) per step. Inputs already prepared."""
    state, logits = DecoderState.prefill(model, input_ids, attention_mask, max_new_tokens)
    B = input_ids.shape[0]
    eos = torch.tensor(eos_ids, dtype=torch.long, device=input_ids.device)
    pad = model.cfg.pad_id if model.cfg.pad_id is not None else (eos_ids[0] if eos_ids else 0)
    penalised = sampling.repetition_penalty != 1.0 or ngram > 0
    hist, P = _history(model, input_ids, attention_mask, max_new_tokens) if penalised or stop else (None, 0)
    params = dataclasses.replace(sampling, no_repeat_ngram_size=ngram)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    can_end = bool(eos_ids) or bool(stop)  # else every row runs to max_new_tokens: no bookkeeping
    for t in range(max_new_tokens):
        with torch.inference_mode():
            if eos_ids and t < min_new_tokens:
                logits = min_new_tokens_filter(logits, eos_ids, t, min_new_tokens)
            h = hist[:, :P + t] if penalised else None
            if do_sample:
                tokens = sample_next(params.process(logits, h if h is not None else _no_history(logits)), generator)
            else:
                tokens = (_penalties(logits, h, params, ngram) if penalised else logits).argmax(-1)
            if can_end:
                tokens = tokens.masked_fill(done, pad)  # finished rows emit pad
            if hist is not None:
                hist[:, P + t] = tokens
            if can_end:
                ended = torch.isin(tokens, eos) if eos_ids else torch.zeros_like(done)
                if stop:
                    ended |= stop.hits(hist[:, P:P + t + 1]) & ~done
                done = done | ended
        yield tokens, done
        if t + 1 == max_new_tokens or (can_end and bool(done.all())):
            return
        logits = state.step(tokens)


def lookup(seq: list[int], n_max: int, k: int) -> list[int]:
    """Prompt lookup (Saxena 2023, HF's `prompt_lookup_num_tokens`): the k tokens that followed
    the earliest earlier occurrence of the sequence's last n tokens (n = n_max down to 1), or []."""
    for n in range(min(n_max, len(seq) - 1), 0, -1):
        tail = seq[-n:]
        for i in range(len(seq) - n):
            if seq[i:i + n] == tail:
                return seq[i + n:i + n + k]
    return []


def _lookup_loop(model, input_ids, *, max_new_tokens, eos_ids, num_tokens, ngram_size=2):
    """Greedy decoding of one prompt that guesses `num_tokens` tokens ahead by prompt lookup and
    verifies them in one step: the greedy tokens, with fewer decoding steps when the output
    repeats its input. Yields (token (1,), done (1,)) per token, like `_token_loop`."""
    state, logits = DecoderState.prefill(model, input_ids, None, max_new_tokens)
    seq = input_ids[0].tolist()  # decoder: the prompt; encoder-decoder: the source, to copy from
    emitted, dev = 0, input_ids.device
    while True:
        token = int(logits.argmax(-1)[0])
        seq.append(token)
        emitted += 1
        done = token in eos_ids
        yield torch.tensor([token], device=dev), torch.tensor([done], device=dev)
        if done or emitted == max_new_tokens:
            return
        guess = lookup(seq, ngram_size, min(num_tokens, max_new_tokens - emitted - 1))
        if not guess:
            logits = state.step(torch.tensor([token], device=dev))
            continue
        start = state.cache.pos
        many = state.step_many(torch.tensor([token] + guess, device=dev))  # (1 + k, V)
        predicted = many.argmax(-1).tolist()  # predicted[i]: the greedy token after guess[:i]
        accepted = 0
        while accepted < len(guess) and guess[accepted] == predicted[accepted]:
            accepted += 1
        for t in guess[:accepted]:
            seq.append(t)
            emitted += 1
            done = t in eos_ids
            yield torch.tensor([t], device=dev), torch.tensor([done], device=dev)
            if done:
                return
        state.rewind(start + 1 + accepted)
        logits = many[accepted:accepted + 1]


def _check_lookup(k, strategy, ids, stop, ngram, min_new_tokens, sampling) -> bool:
    """Is prompt lookup asked for (k > 0), and possible with these arguments?"""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"prompt_lookup must be an int >= 0 (tokens guessed per step), got {k!r}")
    if k and (strategy != "greedy" or ids.shape[0] != 1 or stop or ngram or min_new_tokens
              or sampling.repetition_penalty != 1.0):
        raise ValueError("prompt_lookup works with greedy decoding of one prompt, without stop strings, "
                         "min_new_tokens, repetition penalty or no_repeat_ngram_size")
    return k > 0


def _no_history(logits: torch.Tensor) -> torch.Tensor:
    """An empty (B, 0) history, for sampling without penalties."""
    return torch.zeros(logits.shape[0], 0, dtype=torch.long, device=logits.device)


def _check_sampling(sampling: SamplingParams | None, do_sample: bool) -> SamplingParams:
    sampling = sampling if sampling is not None else SamplingParams()
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    return sampling.validate(sampling=do_sample)


def stream_tokens(model, input_ids, attention_mask=None, *, max_new_tokens: int, strategy: str = "greedy",
                  sampling: SamplingParams | None = None, eos_ids: int | Sequence[int] | None = None,
                  min_new_tokens: int = 0, seed: int | None = None, generator: torch.Generator | None = None,
                  stop_strings: Sequence[str] = (), tokenizer=None, no_repeat_ngram_size: int = 0,
                  truncate: bool = False, prompt_lookup: int = 0) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt, a (B,) tensor, once per step.

    strategy "greedy" takes the argmax after the penalties; "sample" draws from the
    distribution `sampling` shapes (temperature, top-k, top-p, min-p). A row ends on one of
    `eos_ids` (default `model.cfg.eos_id`; the EOS token is yielded) or once its decoded text
    contains a stop string; it then yields pad. Iteration stops when every row has ended or
    after max_new_tokens steps. Arguments are checked at the call, not at the first step.
    """
    if strategy not in ("greedy", "sample"):
        raise ValueError(f"stream_tokens streams strategy 'greedy' or 'sample', got {strategy!r}")
    do_sample = strategy == "sample"
    eos_ids, stop, ngram, sampling, generator, ids, mask = _setup(
        model, input_ids, attention_mask, max_new_tokens, sampling, do_sample, eos_ids, min_new_tokens,
        seed, generator, stop_strings, tokenizer, no_repeat_ngram_size, truncate)
    if _check_lookup(prompt_lookup, strategy, ids, stop, ngram, min_new_tokens, sampling):
        loop = _lookup_loop(model, ids, max_new_tokens=max_new_tokens, eos_ids=eos_ids, num_tokens=prompt_lookup)
    else:
        loop = _token_loop(model, ids, mask, max_new_tokens=max_new_tokens, sampling=sampling,
                           do_sample=do_sample, eos_ids=eos_ids, min_new_tokens=min_new_tokens,
                           generator=generator, stop=stop, ngram=ngram)
    return _in_eval_mode(model, (tokens for tokens, _ in loop))


def _in_eval_mode(model, steps: Iterator):
    """Run a lazy decoding loop with the model in eval mode (no dropout), restoring its mode after."""
    was_training = model.training
    model.eval()
    try:
        yield from steps
    finally:
        model.train(was_training)


def _setup(model, input_ids, attention_mask, max_new_tokens, sampling, do_sample, eos_ids, min_new_tokens,
           seed, generator, stop_strings, tokenizer, no_repeat_ngram_size, truncate):
    """Shared validation of every entry point."""
    sampling = _check_sampling(sampling, do_sample)
    if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be an int >= 0, got {min_new_tokens!r}")
    ngram = _ngram(sampling, no_repeat_ngram_size)
    eos = _eos_list(model, eos_ids)
    stop = StopStrings(tokenizer, stop_strings)
    ids, mask = prepare_prompts(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, truncate=truncate)
    if generator is None and seed is not None:
        generator = torch.Generator(device=ids.device).manual_seed(seed)
    return eos, stop, ngram, sampling, generator, ids, mask


# ---- beam search -------------------------------------------------------------------------------
def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B, K, ...) rows idx (B, K') along dim 1."""
    return torch.take_along_dim(t, idx.view(*idx.shape, *([1] * (t.dim() - 2))), dim=1)


@torch.inference_mode()
def _beam_loop(model, ids, mask, *, max_new_tokens, num_beams, length_penalty, early_stopping,
               eos_ids, min_new_tokens, sampling, ngram, stop):
    """HF transformers' `_beam_search` (v4.50+ vectorised form) on a DecoderState.

    Each step keeps the K = max(2, 1 + #eos) * num_beams best continuations of all beams; the
    best num_beams that did not stop keep running, and those among the top num_beams that
    stopped (EOS, stop string, length) enter the finished set with score
    sum(log p) / (new tokens incl. EOS) ** length_penalty.
    """
    B, nb, T = ids.shape[0], num_beams, max_new_tokens
    dev = ids.device
    state, logits = DecoderState.prefill(model, ids, mask, T)
    grow = torch.arange(B, device=dev).repeat_interleave(nb)  # each prompt's cache, once per beam
    state.reorder(grow)
    logits = logits.index_select(0, grow)
    penalised = sampling.repetition_penalty != 1.0 or ngram > 0
    if penalised or stop:
        hist, P = _history(model, ids, mask, T)
        hist = hist.index_select(0, grow)
    V = logits.shape[-1]
    K = max(2, 1 + len(eos_ids)) * nb
    top_nb = torch.arange(K, device=dev) < nb  # (K,)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=dev)
    pad = model.cfg.pad_id if model.cfg.pad_id is not None else (eos_ids[0] if eos_ids else 0)

    run_seq = torch.full((B, nb, T), pad, dtype=torch.long, device=dev)
    run_scores = torch.zeros(B, nb, device=dev)
    run_scores[:, 1:] = -1e9  # only beam 0 is live at first: the beams start identical
    fin_seq, fin_len = run_seq.clone(), torch.zeros(B, nb, dtype=torch.long, device=dev)
    fin_scores = torch.full((B, nb), -1e9, device=dev)
    fin = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    open_ = torch.ones(B, 1, dtype=torch.bool, device=dev)  # can the finished set still improve?
    offset = (torch.arange(B, device=dev) * nb)[:, None]
    for t in range(T):
        logp = torch.log_softmax(logits, dim=-1)  # (B*nb, V)
        if eos_ids and t < min_new_tokens:
            logp = min_new_tokens_filter(logp, eos_ids, t, min_new_tokens)
        if penalised:
            logp = _penalties(logp, hist[:, :P + t], sampling, ngram)
        logp = (logp.view(B, nb, V) + run_scores[:, :, None]).view(B, nb * V)
        top_scores, top_idx = torch.topk(logp, K)  # (B, K)
        src, tok = top_idx // V, top_idx % V
        top_seq = None  # the K candidates' sequences, built only when needed

        def candidates():
            seq = _gather(run_seq, src)
            seq[:, :, t] = tok
            return seq
        hits = torch.isin(tok, eos) if eos_ids else torch.zeros_like(tok, dtype=torch.bool)
        if t + 1 >= T:
            hits = torch.ones_like(hits)
        elif stop:
            top_seq = candidates()
            hits |= stop.hits(top_seq[:, :, :t + 1].reshape(B * K, t + 1)).view(B, K)
        # the best num_beams continuations that did not stop keep running
        run_lp = top_scores + hits.float() * -1.0e9
        keep = torch.topk(run_lp, nb).indices  # (B, nb)
        run_src, run_scores = _gather(src, keep), _gather(run_lp, keep)
        next_seq = _gather(run_seq, run_src)
        next_seq[:, :, t] = _gather(tok, keep)
        # stopped ones among the top num_beams join the finished set if they beat it (most
        # steps none did: then the finished set stays as it is)
        just = hits & top_nb[None]
        if bool(just.any()):
            top_seq = candidates() if top_seq is None else top_seq
            scored = top_scores / ((t + 1) ** length_penalty)
            scored = scored + (fin.all(-1, keepdim=True) & (early_stopping is True)).float() * -1.0e9
            scored = scored + (~open_).float() * -1.0e9
            scored = scored + (~just) * -1.0e9
            m_scores = torch.cat((fin_scores, scored), 1)
            best = torch.topk(m_scores, nb).indices
            fin_seq = _gather(torch.cat((fin_seq, top_seq), 1), best)
            fin_scores = _gather(m_scores, best)
            fin_len = _gather(torch.cat((fin_len, torch.full_like(tok, t + 1)), 1), best)
            fin = _gather(torch.cat((fin, just), 1), best)
        run_seq = next_seq
        # HF's heuristic: can the best running beam still beat the worst finished one?
        n = T if early_stopping == "never" and length_penalty > 0.0 else t + 1
        best_running = run_scores[:, :1] / (n ** length_penalty)
        worst = torch.where(fin, fin_scores.min(dim=1, keepdim=True)[0], -1.0e9)
        open_ = open_ & (best_running > worst).any(-1, keepdim=True)
        if not (bool(open_.any()) and not (bool(fin.all()) and early_stopping is True) and not bool(hits.all())):
            break
        beam_idx = (run_src + offset).view(-1)
        state.reorder(beam_idx, same_source=True)
        if penalised or stop:
            hist = hist.index_select(0, beam_idx)
            hist[:, P + t] = run_seq[:, :, t].reshape(-1)
        logits = state.step(run_seq[:, :, t].reshape(-1))
    return fin_seq, fin_scores, fin_len


def beam_search(model, input_ids, attention_mask=None, *, max_new_tokens: int, num_beams: int = 4,
                length_penalty: float = 1.0, early_stopping: bool | str = False, num_return_sequences: int = 1,
                eos_ids: int | Sequence[int] | None = None, min_new_tokens: int = 0,
                sampling: SamplingParams | None = None, no_repeat_ngram_size: int = 0,
                stop_strings: Sequence[str] = (), tokenizer=None, truncate: bool = False) -> Generation:
    """Beam search with HF transformers' semantics, identical sequences and `sequences_scores`.

    length_penalty: a finished hypothesis scores sum(log p) / L**length_penalty, L = its new
    tokens including EOS. early_stopping: True stops a prompt once num_beams hypotheses are
    finished; False stops when the best running beam at its current length cannot win;
    "never" assumes it could grow to max_new_tokens (when length_penalty > 0). Of `sampling`
    only the penalties (repetition_penalty, no_repeat_ngram_size) apply.
    """
    _check_beam_args(num_beams, num_return_sequences, length_penalty, early_stopping, sampling)
    eos, stop, ngram, sampling, _, ids, mask = _setup(
        model, input_ids, attention_mask, max_new_tokens, sampling, False, eos_ids, min_new_tokens,
        None, None, stop_strings, tokenizer, no_repeat_ngram_size, truncate)
    seq, scores, lengths = _run(model, _beam_loop, ids, mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                length_penalty=length_penalty, early_stopping=early_stopping, eos_ids=eos,
                                min_new_tokens=min_new_tokens, sampling=sampling, ngram=ngram, stop=stop)
    R = num_return_sequences
    seq, scores, lengths = seq[:, :R].flatten(0, 1), scores[:, :R].flatten(), lengths[:, :R].flatten()
    seq = seq[:, :max(1, int(lengths.max()))]
    return _result(seq, lengths, scores, eos, stop, tokenizer)


def _check_beam_args(num_beams, num_return_sequences, length_penalty, early_stopping, sampling):
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
    if isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, int) \
            or not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be in [1, num_beams={num_beams}], got {num_return_sequences!r}")
    if not isinstance(length_penalty, (int, float)) or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if sampling is not None and (sampling.temperature not in (0, 1) or sampling.top_k or sampling.top_p != 1
                                 or sampling.min_p):
        raise ValueError("beam search is deterministic: temperature, top_k, top_p and min_p apply only to "
                         "strategy='sample'")


def _run(model, loop, *args, **kw):
    """Run a decoding loop in eval mode (no dropout), restoring the model's mode after."""
    was_training = model.training
    model.eval()
    try:
        return loop(model, *args, **kw)
    finally:
        model.train(was_training)


def _result(seq, lengths, scores, eos_ids, stop: StopStrings, tokenizer) -> Generation:
    texts = None
    if tokenizer is not None:
        texts = []
        for row, n in zip(seq.tolist(), lengths.tolist()):
            row = row[:n]
            if row and row[-1] in eos_ids:
                row = row[:-1]
            texts.append(stop.cut(tokenizer.decode(row)))
    return Generation(seq, lengths, scores, texts)


# ---- the one entry point -----------------------------------------------------------------------
def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, strategy: str = "greedy",
             sampling: SamplingParams | None = None, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, no_repeat_ngram_size: int = 0, num_return_sequences: int = 1,
             eos_ids: int | Sequence[int] | None = None, min_new_tokens: int = 0, seed: int | None = None,
             generator: torch.Generator | None = None, stop_strings: Sequence[str] = (), tokenizer=None,
             truncate: bool = False, prompt_lookup: int = 0) -> Generation:
    """Generate up to max_new_tokens for each prompt with greedy decoding, sampling or beam search.

    input_ids: (B, S) tensor with an optional attention_mask (any padding side), a list of ids,
    or a list of lists. Decoder-only prompts continue; encoder-decoder sources are encoded once
    and decoding starts from `decoder_start_id`. Rows end on EOS (`eos_ids`, default
    `model.cfg.eos_id`; never before min_new_tokens) or a stop string (needs `tokenizer`; the
    text is cut before it). strategy="sample" draws with `sampling` and `seed`/`generator`,
    num_return_sequences times per prompt; "beam" returns the num_return_sequences best of
    num_beams hypotheses with their scores. prompt_lookup=k (greedy, one prompt, no
    penalties or stop strings) guesses k tokens ahead from earlier n-grams of the prompt
    and output and checks them in one step: the same tokens, fewer steps when text repeats.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "beam" and prompt_lookup:
        raise ValueError("prompt_lookup works with greedy decoding, not beam search")
    if strategy == "beam":
        return beam_search(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
                           length_penalty=length_penalty, early_stopping=early_stopping,
                           num_return_sequences=num_return_sequences, eos_ids=eos_ids,
                           min_new_tokens=min_new_tokens, sampling=sampling,
                           no_repeat_ngram_size=no_repeat_ngram_size, stop_strings=stop_strings,
                           tokenizer=tokenizer, truncate=truncate)
    if num_beams != 1:
        raise ValueError(f"num_beams={num_beams} needs strategy='beam', got strategy={strategy!r}")
    R = num_return_sequences
    if isinstance(R, bool) or not isinstance(R, int) or R < 1:
        raise ValueError(f"num_return_sequences must be an int >= 1, got {R!r}")
    if strategy == "greedy" and R != 1:
        raise ValueError(f"num_return_sequences={R} needs strategy='sample' or 'beam' (greedy has one answer)")
    do_sample = strategy == "sample"
    eos, stop, ngram, sampling, generator, ids, mask = _setup(
        model, input_ids, attention_mask, max_new_tokens, sampling, do_sample, eos_ids, min_new_tokens,
        seed, generator, stop_strings, tokenizer, no_repeat_ngram_size, truncate)
    if _check_lookup(prompt_lookup, strategy, ids, stop, ngram, min_new_tokens, sampling):
        seq, lengths = _run(model, _collect, ids, None, token_loop=_lookup_loop, max_new_tokens=max_new_tokens,
                            eos_ids=eos, num_tokens=prompt_lookup)
        return _result(seq, lengths, None, eos, stop, tokenizer)
    if R > 1:  # HF's expansion: each prompt repeated R times, rows prompt-major
        ids = ids.repeat_interleave(R, 0)
        mask = None if mask is None else mask.repeat_interleave(R, 0)
    seq, lengths = _run(model, _collect, ids, mask, max_new_tokens=max_new_tokens, sampling=sampling,
                        do_sample=do_sample, eos_ids=eos, min_new_tokens=min_new_tokens,
                        generator=generator, stop=stop, ngram=ngram)
    return _result(seq, lengths, None, eos, stop, tokenizer)


def _collect(model, ids, mask, token_loop=None, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the token loop (or `token_loop`, same yields) to the end: (sequences (B, T), lengths (B,))."""
    steps, dones = [], []
    loop = token_loop(model, ids, **kw) if token_loop is not None else _token_loop(model, ids, mask, **kw)
    for tokens, done in loop:
        steps.append(tokens)
        dones.append(done)
    done = torch.stack(dones, 1)  # (B, T): has the row ended at or before step t?
    T = done.shape[1]
    return torch.stack(steps, 1), torch.where(done.any(1), done.int().argmax(1) + 1, T)
