"""Batch builders for pretraining: token arrays (or sentence pairs) → endless, resumable streams
of batch dicts, one builder per objective.

Every random choice comes from one `torch.Generator` owned by the stream, so a stream's
`state_dict()` (the generator state and a count) is all a checkpoint needs to continue it
exactly. Batches are dicts of int64 tensors with the keys lmforge.objectives reads:

    lm_batches           input_ids, targets                          (causal_lm)
    mlm_batches          input_ids, attention_mask, labels           (masked_lm)
    nsp_batches          + token_type_ids, next_sentence_label       (mlm_nsp)
    span_batches         input_ids, attention_mask, labels           (seq2seq; T5 span corruption)
    denoising_batches    input_ids, attention_mask, labels           (seq2seq; BART text infilling)
    translation_batches  input_ids, attention_mask, labels           (seq2seq; parallel text)
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from itertools import islice

import torch

from lmforge.data.corpus import TokenArray, pad_batch, random_windows
from lmforge.data.noising import IGNORE_INDEX, bart_denoise, build_bert_inputs, mask_tokens, nsp_pairs, span_corruption
from lmforge.tokenizer import Tokenizer


class Batches:
    """An endless stream whose i-th batch is `make(generator)`; resumable through `state_dict`."""

    def __init__(self, make: Callable[[torch.Generator], dict], seed: int = 0):
        self.make, self.seed, self.count = make, seed, 0
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.count += 1
        return self.make(self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.count = state["count"]

    def take(self, n: int) -> list[dict]:
        """The next n batches as a list (a fixed validation set: build a stream with its own seed)."""
        return list(islice(self, n))


def _check_window(tokens, block_size: int, what: str) -> None:
    n = len(tokens)
    if block_size < 1 or n <= block_size:
        raise ValueError(f"{what}: block_size={block_size} needs more than {block_size} tokens; "
                         f"the data has {n}")


def _seed_from(g: torch.Generator) -> int:
    return int(torch.randint(2**62, (1,), generator=g))


# ---- causal LM ---------------------------------------------------------------------------------
def lm_batches(tokens, block_size: int, batch_size: int, seed: int = 0) -> Batches:
    """nanoGPT's batches: random windows, input_ids (B, T) and targets = input_ids shifted by one."""
    _check_window(tokens, block_size, "lm_batches")

    def make(g):
        x, y = random_windows(tokens, block_size, batch_size, g)
        return {"input_ids": x, "targets": y}
    return Batches(make, seed)


# ---- BERT ----------------------------------------------------------------------------------------
def _bert_ids(tok: Tokenizer) -> dict:
    for role in ("cls", "sep", "mask", "pad"):
        if getattr(tok, f"{role}_id") is None:
            raise ValueError(f"BERT-style batches need a {role} token; the tokenizer has none "
                             "(train it with family='encoder')")
    return dict(mask_id=tok.mask_id, vocab_size=tok.vocab_size, special_ids=tok.special_ids)


def mlm_batches(tokens, block_size: int, batch_size: int, tok: Tokenizer, mlm_probability: float = 0.15,
                seed: int = 0) -> Batches:
    """Random windows of block_size - 2 tokens as `[CLS] w [SEP]`, BERT-masked (80/10/10)."""
    _check_window(tokens, block_size - 2, "mlm_batches")
    masking = _bert_ids(tok)

    def make(g):
        x, _ = random_windows(tokens, block_size - 2, batch_size, g)
        cls = torch.full((batch_size, 1), tok.cls_id)
        sep = torch.full((batch_size, 1), tok.sep_id)
        ids = torch.cat([cls, x, sep], 1)  # (B, block_size)
        inputs, labels = mask_tokens(ids, mlm_probability=mlm_probability, generator=g, **masking)
        return {"input_ids": inputs, "attention_mask": torch.ones_like(ids), "labels": labels}
    return Batches(make, seed)


def sentence_end_ids(tok: Tokenizer) -> set[int]:
    """Ids of tokens that end a sentence: their text ends with . ! ? (maybe quoted) or holds a newline."""
    ends = set()
    for i in range(tok.vocab_size):
        text = tok.decode([i], skip_special_tokens=True)
        if "\n" in text or text.rstrip().rstrip("\"')]").endswith((".", "!", "?")):
            ends.add(i)
    return ends


def split_sentences(ids: Sequence[int], ends: set[int]) -> list[list[int]]:
    """Cut a token sequence after every sentence-ending token (the last piece may be unfinished)."""
    out, cur = [], []
    for t in ids:
        cur.append(int(t))
        if t in ends:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def nsp_documents(tokens: TokenArray, tok: Tokenizer, max_len: int) -> list[list[list[int]]]:
    """Documents as lists of sentences, for `nsp_pairs`. Documents longer than 8 examples
    are cut into several, so that a single long text still yields NotNext pairs."""
    ends, seps = sentence_end_ids(tok), {tok.sep_id, tok.eos_id} - {None}
    docs = []
    for doc in tokens.documents():
        ids = [int(t) for t in doc if int(t) not in seps]
        sentences = [s for s in split_sentences(ids, ends) if s]
        chunk, length = [], 0
        for s in sentences:  # sentences longer than a whole example are cut by nsp_pairs' truncation
            chunk.append(s)
            length += len(s)
            if length >= 8 * max_len:
                docs.append(chunk)
                chunk, length = [], 0
        if chunk:
            docs.append(chunk)
    if len(docs) < 2:
        raise ValueError(f"next-sentence prediction needs at least 2 documents; the corpus has {len(docs)}")
    return docs


def nsp_batches(tokens: TokenArray, max_len: int, batch_size: int, tok: Tokenizer,
                mlm_probability: float = 0.15, docs_per_batch: int = 8, seed: int = 0) -> Batches:
    """BERT pretraining batches: `[CLS] a [SEP] b [SEP]` pairs (half IsNext, half NotNext) drawn from
    `docs_per_batch` random documents, then BERT-masked."""
    masking = _bert_ids(tok)
    docs = nsp_documents(tokens, tok, max_len)

    def make(g):
        pick = torch.randperm(len(docs), generator=g)[:max(2, docs_per_batch)].tolist()
        examples = nsp_pairs([docs[i] for i in pick], max_len, random.Random(_seed_from(g)))
        if not examples:
            raise ValueError("nsp_batches: the chosen documents gave no sentence pairs (documents too short?)")
        rows = [examples[i] for i in torch.randint(len(examples), (batch_size,), generator=g).tolist()]
        built = [build_bert_inputs(a, b, tok.cls_id, tok.sep_id, max_len) for a, b, _ in rows]
        ids, mask = pad_batch([ids for ids, _ in built], tok.pad_id)
        types, _ = pad_batch([t for _, t in built], 0)
        inputs, labels = mask_tokens(ids, mlm_probability=mlm_probability, generator=g, **masking)
        return {"input_ids": inputs, "attention_mask": mask, "token_type_ids": types, "labels": labels,
                "next_sentence_label": torch.tensor([label for _, _, label in rows])}
    return Batches(make, seed)


# ---- encoder-decoder -------------------------------------------------------------------------------
def _pad_pairs(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> dict:
    src, tgt = zip(*pairs)
    ids, mask = pad_batch([s.tolist() for s in src], pad_id)
    labels, _ = pad_batch([t.tolist() for t in tgt], IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def span_batches(tokens, block_size: int, batch_size: int, tok: Tokenizer, noise_density: float = 0.15,
                 mean_span_length: float = 3.0, seed: int = 0) -> Batches:
    """T5 span corruption of random windows of `block_size` tokens: inputs with sentinels, labels
    the sentinels and the spans they hide (Raffel et al. 2020, sec. 3.1.4)."""
    _check_window(tokens, block_size, "span_batches")
    if not tok.sentinel_ids or tok.eos_id is None or tok.pad_id is None:
        raise ValueError("span corruption needs <extra_id_N> sentinels, eos and pad (train the tokenizer "
                         "with family='t5')")
    kw = dict(noise_density=noise_density, mean_span_length=mean_span_length, sentinel_ids=tok.sentinel_ids,
              eos_id=tok.eos_id)

    def make(g):
        x, _ = random_windows(tokens, block_size, batch_size, g)
        return _pad_pairs([span_corruption(row, generator=g, **kw) for row in x], tok.pad_id)
    return Batches(make, seed)


def denoising_batches(tokens, block_size: int, batch_size: int, tok: Tokenizer, mask_ratio: float = 0.3,
                      poisson_lambda: float = 3.0, permute: bool = True, seed: int = 0) -> Batches:
    """BART denoising of random windows of `block_size - 2` tokens: sentences permuted, spans
    infilled with one <mask> each; labels are the original `<s> ... </s>` (Lewis et al. 2020)."""
    _check_window(tokens, block_size - 2, "denoising_batches")
    if tok.mask_id is None or tok.pad_id is None:
        raise ValueError("denoising needs mask and pad tokens (train the tokenizer with family='bart')")
    ends = sentence_end_ids(tok)
    keep = tok.special_ids

    def make(g):
        x, _ = random_windows(tokens, block_size - 2, batch_size, g)
        return _pad_pairs([bart_denoise(split_sentences(row.tolist(), ends), mask_id=tok.mask_id, bos_id=tok.bos_id,
                                        eos_id=tok.eos_id, mask_ratio=mask_ratio, poisson_lambda=poisson_lambda,
                                        permute=permute, generator=g, special_ids=keep) for row in x], tok.pad_id)
    return Batches(make, seed)


def encode_pairs(pairs: Sequence[tuple[str, str]], tok: Tokenizer, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(source ids with the tokenizer's template, target ids + eos), each cut to max_len."""
    if tok.eos_id is None or tok.pad_id is None:
        raise ValueError("translation needs eos and pad tokens")
    src = tok.encode_batch([s for s, _ in pairs])
    tgt = tok.encode_batch([t for _, t in pairs], add_special_tokens=False)
    return [(s[:max_len - 1] + s[-1:] if len(s) > max_len else s, t[:max_len - 1] + [tok.eos_id])
            for s, t in zip(src, tgt)]


def translation_batches(encoded: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                        seed: int = 0) -> Batches:
    """Random sentence pairs: input_ids the source, labels the target + eos (padded with -100)."""
    if not encoded:
        raise ValueError("translation_batches: no sentence pairs")

    def make(g):
        rows = [encoded[i] for i in torch.randint(len(encoded), (batch_size,), generator=g).tolist()]
        return _pad_pairs([(torch.tensor(s), torch.tensor(t)) for s, t in rows], pad_id)
    return Batches(make, seed)
