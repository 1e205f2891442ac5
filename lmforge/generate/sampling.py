"""Greedy decoding and sampling: one token per row per step on a `DecoderState`.

Greedy takes the argmax after the penalties (repetition penalty, no-repeat n-grams), as HF
transformers' `_sample` with do_sample=False; sampling draws from the distribution the
`GenerationConfig`'s filters shape (`SamplingParams.process`: penalties, temperature,
top-k, top-p, min-p). Rows end on EOS (never before min_new_tokens) or once their text
holds a stop string, and then emit pad.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lmforge.generate.filters import (
    SamplingParams,
    min_new_tokens_filter,
    no_repeat_ngram_filter,
    repetition_penalty,
    sample_next,
)
from lmforge.generate.state import DecoderState, Prepared


def history(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int
            ) -> tuple[torch.Tensor, int]:
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


def penalties(logits: torch.Tensor, hist: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Repetition penalty and no-repeat-ngram (the processors greedy and beam search apply)."""
    logits = repetition_penalty(logits, hist, params.repetition_penalty)
    return no_repeat_ngram_filter(logits, hist, params.no_repeat_ngram_size)


def is_penalised(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.no_repeat_ngram_size > 0


def token_loop(model, p: Prepared) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (tokens (B,), done (B,) bool after this token) per step."""
    cfg, ids, eos_ids, stop = p.config, p.ids, p.eos, p.stop
    T = cfg.max_new_tokens
    state, logits = DecoderState.prefill(model, ids, p.mask, T, compiled=cfg.compile, chunk=cfg.prefill_chunk)
    params = cfg.sampling
    do_sample = cfg.strategy == "sample"
    eos = torch.tensor(eos_ids, dtype=torch.long, device=ids.device)
    penalised = is_penalised(params)
    hist, P = history(model, ids, p.mask, T) if penalised or stop else (None, 0)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    can_end = bool(eos_ids) or bool(stop)  # else every row runs to max_new_tokens: no bookkeeping
    for t in range(T):
        with torch.inference_mode():  # not around the yield: the caller's code between steps runs as it would
            if t:
                logits = state.step(tokens)
            if eos_ids and t < cfg.min_new_tokens:
                logits = min_new_tokens_filter(logits, eos_ids, t, cfg.min_new_tokens)
            h = hist[:, :P + t] if penalised else None
            if do_sample:
                tokens = sample_next(params.process(logits, h if h is not None else _no_history(logits)),
                                     p.generator)
            else:
                tokens = penalties(logits, h, params).argmax(-1) if penalised else state.argmax(logits)
            if can_end:
                tokens = tokens.masked_fill(done, p.pad)  # finished rows emit pad
            if hist is not None:
                hist[:, P + t] = tokens
            if can_end:
                ended = torch.isin(tokens, eos) if eos_ids else torch.zeros_like(done)
                if stop:
                    ended |= stop.hits(hist[:, P:P + t + 1]) & ~done
                done = done | ended
        yield tokens, done
        if t + 1 == T or (can_end and bool(done.all())):
            return


def _no_history(logits: torch.Tensor) -> torch.Tensor:
    """An empty (B, 0) history, for sampling without penalties."""
    return torch.zeros(logits.shape[0], 0, dtype=torch.long, device=logits.device)
