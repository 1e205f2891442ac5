"""Prompt lookup decoding (Saxena 2023; HF's `prompt_lookup_num_tokens`): greedy decoding of
one prompt that guesses the next tokens from an earlier occurrence of the last n-gram and
checks all guesses in one `DecoderState.step_many`, `rewind`ing the cache past the first
wrong one. The tokens are the greedy ones; there are fewer steps when the output repeats its
input (SmolLM2 copying a paragraph: 43.9 -> 200.3 tokens/s, bench/bench_chat.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lmforge.generate.state import DecoderState, Prepared


def lookup(seq: list[int], n_max: int, k: int) -> list[int]:
    """The k tokens that followed the earliest earlier occurrence of the sequence's last n
    tokens (n = n_max down to 1), or []."""
    for n in range(min(n_max, len(seq) - 1), 0, -1):
        tail = seq[-n:]
        for i in range(len(seq) - n):
            if seq[i:i + n] == tail:
                return seq[i + n:i + n + k]
    return []


def lookup_loop(model, p: Prepared, ngram_size: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (token (1,), done (1,)) per token, like `sampling.token_loop`, guessing
    `p.config.prompt_lookup` tokens ahead."""
    max_new_tokens, num_tokens, eos_ids = p.config.max_new_tokens, p.config.prompt_lookup, p.eos
    state, logits = DecoderState.prefill(model, p.ids, None, max_new_tokens, chunk=p.config.prefill_chunk)
    seq = p.ids[0].tolist()  # decoder: the prompt; encoder-decoder: the source, to copy from
    emitted, dev = 0, p.ids.device
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
