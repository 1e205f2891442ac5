"""The entry points of generation, one `GenerationConfig` for all of them:

    generate       greedy, sampling or beam search to the end: a `Generation`
    stream_tokens  greedy or sampling, one (B,) tensor of tokens per step
    beam_search    generate with strategy="beam"

Each takes the options as a `config` or as keywords (the config's field names). The loops
live in `sampling` (greedy and sampling), `beam` and `lookup` (prompt lookup); the prompts
and the decoding state in `state`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lmforge.generate.beam import beam_loop
from lmforge.generate.config import GenerationConfig
from lmforge.generate.lookup import lookup_loop
from lmforge.generate.sampling import token_loop
from lmforge.generate.state import Prepared, prepare


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


def generate(model, input_ids, attention_mask=None, config: GenerationConfig | None = None, *,
             eos_ids: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
             tokenizer=None, **options) -> Generation:
    """Generate up to max_new_tokens for each prompt with greedy decoding, sampling or beam search.

    input_ids: (B, S) tensor with an optional attention_mask (any padding side), a list of ids,
    or a list of lists. Decoder-only prompts continue; encoder-decoder sources are encoded once
    and decoding starts from `decoder_start_id`. `config` (or keywords: its fields) says how.
    Rows end on EOS (`eos_ids`, default `model.cfg.eos_id`; never before min_new_tokens) or a
    stop string (needs `tokenizer`; the text is cut before it). strategy="sample" draws with
    `seed` or `generator`, num_return_sequences times per prompt; "beam" returns the
    num_return_sequences best of num_beams hypotheses with their scores. prompt_lookup=k
    (greedy, one prompt) guesses k tokens ahead from earlier n-grams of the prompt and
    output and checks them in one step: the same tokens, fewer steps when text repeats.
    """
    config = GenerationConfig.of(config, **options)
    p = prepare(model, input_ids, attention_mask, config, eos_ids=eos_ids, generator=generator, tokenizer=tokenizer)
    if config.strategy == "beam":
        seq, scores, lengths = _run(model, beam_loop, p)
        R = config.num_return_sequences
        seq, scores, lengths = seq[:, :R].flatten(0, 1), scores[:, :R].flatten(), lengths[:, :R].flatten()
        return _result(seq[:, :max(1, int(lengths.max()))], lengths, scores, p)
    if config.num_return_sequences > 1:  # HF's expansion: each prompt repeated R times, rows prompt-major
        R = config.num_return_sequences
        p.ids = p.ids.repeat_interleave(R, 0)
        p.mask = None if p.mask is None else p.mask.repeat_interleave(R, 0)
    seq, lengths = _run(model, _collect, p)
    return _result(seq, lengths, None, p)


def beam_search(model, input_ids, attention_mask=None, config: GenerationConfig | None = None, **kw) -> Generation:
    """`generate` with strategy="beam" (HF transformers' beam search: the same sequences and
    `sequences_scores`); see `lmforge.generate.beam`."""
    return generate(model, input_ids, attention_mask, GenerationConfig.of(config, strategy="beam"), **kw)


def stream_tokens(model, input_ids, attention_mask=None, config: GenerationConfig | None = None, *,
                  eos_ids: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
                  tokenizer=None, **options) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt, a (B,) tensor, once per step (greedy or sampling).

    A row ends on one of `eos_ids` (default `model.cfg.eos_id`; the EOS token is yielded) or
    once its decoded text contains a stop string; it then yields pad. Iteration stops when
    every row has ended or after max_new_tokens steps. Arguments are checked at the call, not
    at the first step.
    """
    config = GenerationConfig.of(config, **options)
    if config.strategy not in ("greedy", "sample"):
        raise ValueError(f"stream_tokens streams strategy 'greedy' or 'sample', got {config.strategy!r}")
    p = prepare(model, input_ids, attention_mask, config, eos_ids=eos_ids, generator=generator, tokenizer=tokenizer)
    return _in_eval_mode(model, (tokens for tokens, _ in _loop(model, p)))


def _loop(model, p: Prepared) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The greedy/sampling loop, or prompt lookup when asked: (tokens (B,), done (B,)) per step."""
    return lookup_loop(model, p) if p.config.prompt_lookup else token_loop(model, p)


@contextmanager
def _eval_mode(model):
    """The model in eval mode (no dropout) inside, its own mode again after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _in_eval_mode(model, steps: Iterator):
    """Run a lazy decoding loop in eval mode."""
    with _eval_mode(model):
        yield from steps


def _run(model, loop, p: Prepared):
    """Run a decoding loop to the end in eval mode."""
    with _eval_mode(model):
        return loop(model, p)


def _collect(model, p: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the token loop to the end: (sequences (B, T), lengths (B,))."""
    steps, dones = [], []
    for tokens, done in _loop(model, p):
        steps.append(tokens)
        dones.append(done)
    done = torch.stack(dones, 1)  # (B, T): has the row ended at or before step t?
    T = done.shape[1]
    return torch.stack(steps, 1), torch.where(done.any(1), done.int().argmax(1) + 1, T)


def _result(seq, lengths, scores, p: Prepared) -> Generation:
    texts = None
    if p.tokenizer is not None:
        texts = []
        for row, n in zip(seq.tolist(), lengths.tolist()):
            row = row[:n]
            if row and row[-1] in p.eos:
                row = row[:-1]
            texts.append(p.stop.cut(p.tokenizer.decode(row)))
    return Generation(seq, lengths, scores, texts)
