"""Pretraining corruptions as pure functions: BERT masking and NSP pairs, T5 span corruption, BART denoising.

Tensors in, tensors out; every random choice comes from the generator passed in, so a
seed fixes the result. Labels use -100 for "not a target", as torch's cross_entropy ignores.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import torch

from lmforge.tokenizer import Tokenizer

IGNORE_INDEX = -100  # the label of "not a target" everywhere in lmforge (F.cross_entropy ignores it)


def _as_ids(ids, name: str = "ids") -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of ids, got shape {tuple(t.shape)}")
    return t


def _special_mask(ids: torch.Tensor, special_ids: Iterable[int]) -> torch.Tensor:
    return torch.isin(ids, torch.as_tensor(sorted(special_ids), dtype=ids.dtype))


# ---- BERT: masked language modelling -------------------------------------------------------
def word_start_mask(ids: torch.Tensor, tokenizer: Tokenizer, continuation_prefix: str = "##") -> torch.Tensor:
    """True where a token starts a word: WordPiece marks continuation sub-tokens with `##`."""
    is_start = torch.ones(tokenizer.vocab_size, dtype=torch.bool)
    for token, i in tokenizer.hf.get_vocab(with_added_tokens=True).items():
        is_start[i] = not token.startswith(continuation_prefix)
    is_start[sorted(tokenizer.special_ids)] = True
    return is_start[torch.as_tensor(ids, dtype=torch.long)]


def mask_tokens(input_ids: torch.Tensor, *, mask_id: int, vocab_size: int, special_ids: Iterable[int],
                mlm_probability: float = 0.15, generator: torch.Generator | None = None,
                word_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (Devlin et al. 2019, sec. 3.1) -> (inputs, labels), same shape as `input_ids`.

    `mlm_probability` of the non-special tokens are chosen (pad must be among `special_ids`); of
    those 80% become `mask_id`, 10% a random non-special token, 10% stay. Labels hold the original
    id at chosen positions and -100 elsewhere. With `word_starts` (see `word_start_mask`) whole
    words are chosen: every sub-token of a chosen word is a target.
    """
    if mask_id is None:
        raise ValueError("mask_id is None: the tokenizer has no mask token")
    if not 0 < mlm_probability < 1:
        raise ValueError(f"mlm_probability={mlm_probability} must be between 0 and 1")
    special_ids = {int(i) for i in special_ids} | {mask_id}
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[sorted(i for i in special_ids if 0 <= i < vocab_size)] = False
    allowed = allowed.nonzero().squeeze(1)  # ids a "random token" may take
    if len(allowed) == 0:
        raise ValueError(f"vocab_size={vocab_size} leaves no non-special token to sample")
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    eligible = ~_special_mask(ids, special_ids)
    draw = torch.rand(ids.shape, generator=generator) < mlm_probability
    if word_starts is None:
        chosen = draw & eligible
    else:
        if word_starts.shape != ids.shape:
            raise ValueError(f"word_starts has shape {tuple(word_starts.shape)}, input_ids {tuple(ids.shape)}")
        # A word = a start token and the continuation tokens after it; a special token starts its own group.
        special = ~eligible.reshape(-1, ids.shape[-1])
        starts = word_starts.bool().reshape(special.shape) | special
        starts[:, 0] = True
        starts[:, 1:] |= special[:, :-1]  # the token after a special one starts a word too
        group = torch.cumsum(starts.flatten().long(), 0) - 1  # (N*T,) word index of every token
        picked = torch.zeros(int(group[-1]) + 1, dtype=torch.bool)
        picked[group[starts.flatten()]] = (draw & eligible).flatten()[starts.flatten()]
        chosen = picked[group].reshape(ids.shape) & eligible
    labels = torch.where(chosen, ids, IGNORE_INDEX)
    u = torch.rand(ids.shape, generator=generator)
    to_mask, to_random = chosen & (u < 0.8), chosen & (u >= 0.8) & (u < 0.9)
    random_ids = allowed[torch.randint(len(allowed), ids.shape, generator=generator)]
    inputs = torch.where(to_mask, mask_id, torch.where(to_random, random_ids, ids))
    return inputs, labels


# ---- BERT: next sentence prediction ----------------------------------------------------------
def _truncate_pair(a: list[int], b: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    a, b = list(a), list(b)
    while len(a) + len(b) > max_tokens:  # HF "longest_first": trim the longer segment from its end
        (a if len(a) > len(b) else b).pop()
    return a, b


def build_bert_inputs(a: Sequence[int], b: Sequence[int] | None, cls_id: int, sep_id: int,
                      max_len: int) -> tuple[list[int], list[int]]:
    """`[CLS] a [SEP] b [SEP]` -> (ids, token_type_ids), trimming the longer segment to fit `max_len`."""
    if cls_id is None or sep_id is None:
        raise ValueError("cls_id and sep_id are required")
    n_special = 2 if b is None else 3
    if max_len <= n_special:
        raise ValueError(f"max_len={max_len} leaves no room besides {n_special} special tokens")
    a, b = _truncate_pair(a, b or [], max_len - n_special)
    ids = [cls_id, *a, sep_id] + ([*b, sep_id] if n_special == 3 else [])
    return ids, [0] * (len(a) + 2) + [1] * (len(ids) - len(a) - 2)


def nsp_pairs(documents: list[list[list[int]]], max_len: int,
              generator: random.Random) -> list[tuple[list[int], list[int], int]]:
    """Next-sentence-prediction examples (segment_a, segment_b, label), label 0 = IsNext, 1 = NotNext.

    As BERT's create_pretraining_data: sentences of a document are gathered until they fill
    `max_len - 3` tokens, split at a random sentence into a and b; half of the time b is replaced
    by text from a random other document. Unlike BERT, a one-sentence chunk is cut inside the
    sentence rather than always made NotNext, so that the labels stay balanced.
    """
    if len(documents) < 2:
        raise ValueError(f"documents has {len(documents)} document(s); random segments need at least 2")
    if max_len < 5:
        raise ValueError(f"max_len={max_len} is too small for [CLS] a [SEP] b [SEP]")
    target = max_len - 3
    examples = []
    for d, doc in enumerate(documents):
        chunk, length, i = [], 0, 0
        while i < len(doc):
            chunk.append(doc[i])
            length += len(doc[i])
            if i == len(doc) - 1 or length >= target:
                split = len(chunk) == 1 and len(chunk[0]) > 1
                if split:  # one sentence: cut it in two so that it can still give an IsNext pair
                    k = generator.randint(1, len(chunk[0]) - 1)
                    chunk = [chunk[0][:k], chunk[0][k:]]
                a_end = generator.randint(1, len(chunk) - 1) if len(chunk) > 1 else 1
                a = [t for s in chunk[:a_end] for t in s]
                if len(chunk) == 1 or generator.random() < 0.5:
                    label, j = 1, generator.randrange(len(documents) - 1)
                    other = documents[j + (j >= d)]  # any document but this one
                    b, start = [], generator.randrange(max(len(other), 1))
                    for sentence in other[start:]:
                        b += sentence
                        if len(b) >= target - len(a):
                            break
                    if not split:
                        i -= len(chunk) - a_end  # the unused sentences start the next chunk
                else:
                    label, b = 0, [t for s in chunk[a_end:] for t in s]
                a, b = _truncate_pair(a, b, target)
                if a and b:
                    examples.append((a, b, label))
                chunk, length = [], 0
            i += 1
    return examples


# ---- T5: span corruption -------------------------------------------------------------------
def _random_segmentation(n_items: int, n_segments: int, generator) -> torch.Tensor:
    """Split n_items into n_segments positive lengths, uniformly at random."""
    first = torch.zeros(n_items, dtype=torch.bool)
    first[1:][torch.randperm(n_items - 1, generator=generator)[:n_segments - 1]] = True
    return torch.bincount(torch.cumsum(first.long(), 0), minlength=n_segments)


def random_spans_noise_mask(length: int, noise_density: float, mean_span_length: float, generator) -> torch.Tensor:
    """T5's noise mask (bool, (length,)): round(length * density) noise tokens in
    round(noise / mean_span_length) spans, interleaved with non-noise spans, starting with non-noise."""
    n = max(length, 2)
    n_noise = min(max(round(n * noise_density), 1), n - 1)
    n_spans = max(min(round(n_noise / mean_span_length), n_noise, n - n_noise), 1)
    noise = _random_segmentation(n_noise, n_spans, generator)
    keep = _random_segmentation(n - n_noise, n_spans, generator)
    lengths = torch.stack([keep, noise], 1).flatten()  # (2 * n_spans,) keep, noise, keep, noise, ...
    is_noise = torch.arange(2 * n_spans) % 2 == 1
    return torch.repeat_interleave(is_noise, lengths)[:length]


def span_corruption(ids, *, noise_density: float = 0.15, mean_span_length: float = 3.0,
                    sentinel_ids: Sequence[int], eos_id: int,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 span corruption (Raffel et al. 2020, sec. 3.1.4) -> (inputs, targets), 1-D int64.

    Each noise span is replaced in `inputs` by the next sentinel (`sentinel_ids[0]` first); `targets`
    is each sentinel followed by the span it hides. Both end with `eos_id`.
    """
    ids = _as_ids(ids)
    if not sentinel_ids:
        raise ValueError("sentinel_ids is empty: span corruption needs sentinel tokens (<extra_id_0>, ...)")
    if eos_id is None:
        raise ValueError("eos_id is None")
    if not 0 < noise_density < 1 or mean_span_length < 1:
        raise ValueError(f"noise_density={noise_density} must be in (0, 1) "
                         f"and mean_span_length={mean_span_length} >= 1")
    noise = random_spans_noise_mask(len(ids), noise_density, mean_span_length, generator)
    span_start = noise & ~torch.cat([torch.tensor([False]), noise[:-1]])
    n_spans = int(span_start.sum())
    if n_spans > len(sentinel_ids):
        raise ValueError(f"{n_spans} noise spans but only {len(sentinel_ids)} sentinel_ids")
    # the sentinel of the span each token is in (tokens before the first span get sentinel 0, unused)
    span_index = (torch.cumsum(span_start.long(), 0) - 1).clamp(min=0)
    sentinel = torch.as_tensor(list(sentinel_ids), dtype=torch.long)[span_index]
    eos = torch.tensor([eos_id])
    # inputs: non-noise tokens, with a sentinel where each span starts and the rest of the span dropped
    inputs = torch.where(span_start, sentinel, ids)[~noise | span_start]
    # targets: for each span, its sentinel then its tokens; -1 marks "no sentinel before this token"
    targets = torch.stack([torch.where(span_start, sentinel, -1), ids], 1)[noise].flatten()  # (2 * n_noise,)
    return torch.cat([inputs, eos]), torch.cat([targets[targets >= 0], eos])


# ---- BART: text infilling and sentence permutation -----------------------------------------
def text_infilling(ids, *, mask_id: int, mask_ratio: float = 0.3, poisson_lambda: float = 3.0,
                   generator: torch.Generator | None = None, special_ids: Iterable[int] = ()) -> torch.Tensor:
    """BART text infilling (Lewis et al. 2020, sec. 2.2): spans with Poisson(`poisson_lambda`) lengths
    covering round(`mask_ratio` * non-special tokens) are each replaced by ONE `mask_id`; a span of
    length 0 inserts a mask. Special tokens are never masked (a span across one is masked on both sides)."""
    ids = _as_ids(ids)
    if mask_id is None:
        raise ValueError("mask_id is None: the tokenizer has no mask token")
    if not 0 <= mask_ratio < 1 or poisson_lambda <= 0:
        raise ValueError(f"mask_ratio={mask_ratio} must be in [0, 1) and poisson_lambda={poisson_lambda} > 0")
    positions = (~_special_mask(ids, special_ids)).nonzero().squeeze(1)  # (E,) maskable positions
    n_mask = round(len(positions) * mask_ratio)
    if n_mask == 0:
        return ids.clone()
    lengths = torch.zeros(0, dtype=torch.long)
    while lengths.sum() < n_mask:
        lengths = torch.cat([lengths, torch.poisson(torch.full((n_mask,), poisson_lambda), generator).long()])
    cum = torch.cumsum(lengths, 0)
    k = int(torch.searchsorted(cum, n_mask))  # first span that reaches n_mask tokens
    lengths = lengths[:k + 1]
    lengths[-1] -= int(cum[k]) - n_mask  # trim the last span to hit n_mask exactly
    # Place each span before a distinct kept token (or at the end), so spans never touch.
    n_slots = len(positions) - n_mask + 1
    if len(lengths) <= n_slots:
        slots = torch.randperm(n_slots, generator=generator)[:len(lengths)]
    else:  # more spans than gaps (very high mask_ratio): some share a gap and merge
        slots = torch.randint(n_slots, (len(lengths),), generator=generator)
    # Walk the maskable tokens: `noise[e]` marks masked ones, `inserts[e]` counts masks inserted before e.
    positions = positions.tolist()
    noise, inserts = [False] * len(positions), [0] * (len(positions) + 1)
    cursor, kept = 0, 0
    for slot, length in zip(slots.sort().values.tolist(), lengths.tolist()):
        cursor += slot - kept  # skip the kept tokens before this span
        kept = slot
        inserts[cursor] += length == 0
        noise[cursor:cursor + length] = [True] * length
        cursor += length
    maskable = dict(zip(positions, range(len(positions))))
    out, prev_noise = [], False
    for i, token in enumerate(ids.tolist()):
        e = maskable.get(i)
        if e is None:  # a special token: always kept
            out.append(token)
            prev_noise = False
            continue
        out += [mask_id] * inserts[e]
        if not noise[e]:
            out.append(token)
        elif not prev_noise:
            out.append(mask_id)  # a span's first token becomes its one mask; the rest are dropped
        prev_noise = noise[e]
        if e == len(positions) - 1:
            out += [mask_id] * inserts[-1]  # insertions after the last maskable token
    return torch.tensor(out, dtype=torch.long)


def permute_sentences(sentences: Sequence[Sequence[int]], generator: torch.Generator | None = None) -> list[list[int]]:
    """BART sentence permutation: the sentences in a random order."""
    return [list(sentences[i]) for i in torch.randperm(len(sentences), generator=generator).tolist()]


def bart_denoise(sentences: Sequence[Sequence[int]], *, mask_id: int, bos_id: int | None = None,
                 eos_id: int | None = None, mask_ratio: float = 0.3, poisson_lambda: float = 3.0,
                 permute: bool = True, generator: torch.Generator | None = None,
                 special_ids: Iterable[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """BART pretraining pair -> (inputs, labels): inputs are the sentences permuted then infilled;
    labels the original text. Both are wrapped in `bos_id ... eos_id` when given."""
    if not sentences:
        raise ValueError("sentences is empty")
    bos, eos = ([bos_id] if bos_id is not None else []), ([eos_id] if eos_id is not None else [])
    order = permute_sentences(sentences, generator) if permute else [list(s) for s in sentences]
    labels = torch.tensor(bos + [t for s in sentences for t in s] + eos, dtype=torch.long)
    shuffled = bos + [t for s in order for t in s] + eos
    keep = set(special_ids) | set(bos) | set(eos)
    inputs = text_infilling(shuffled, mask_id=mask_id, mask_ratio=mask_ratio, poisson_lambda=poisson_lambda,
                            generator=generator, special_ids=keep)
    return inputs, labels
