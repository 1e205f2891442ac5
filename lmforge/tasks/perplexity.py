"""Perplexity of a decoder LM on a text corpus (`lmforge eval --task perplexity`)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.data.corpus import read_texts
from lmforge.data.noising import IGNORE_INDEX
from lmforge.evaluate import perplexity as ppl
from lmforge.interop.load import load_with_tokenizer
from lmforge.train.overrides import coerce


@torch.no_grad()
def perplexity(model_dir: str | Path, data_file, block_size: int | str = 512, batch_size: int | str = 8,
               limit: int | str | None = None, quantize: str | None = None, **unknown) -> dict[str, float]:
    """Perplexity of a decoder LM on a text corpus: the token stream cut into blocks of
    block_size (each token predicted from the previous ones of its block); `limit` tokens at most;
    `quantize` ("int4", "int8"): of the model loaded with quantised weights (`lmforge.load`)."""
    if unknown:
        raise ValueError(f"unknown perplexity option(s) {sorted(unknown)}; "
                         "known: block_size, batch_size, limit, quantize")
    block_size = coerce(block_size, int, "option block_size")
    batch_size = coerce(batch_size, int, "option batch_size")
    limit = coerce(limit, int | None, "option limit")
    model, tok = load_with_tokenizer(model_dir, quantize=quantize)
    if model.cfg.family != "decoder" or model.cfg.task != "lm":
        raise ValueError(f"perplexity needs a decoder LM, got family={model.cfg.family!r} task={model.cfg.task!r}")
    ids = [i for text in read_texts(data_file) for i in tok.encode(text, add_special_tokens=False)]
    if limit is not None:
        ids = ids[:limit]
    block_size = min(block_size, model.cfg.max_len)
    blocks = [ids[i:i + block_size] for i in range(0, len(ids) - 1, block_size)]
    blocks = [b for b in blocks if len(b) > 1]
    if not blocks:
        raise ValueError(f"{data_file}: fewer than 2 tokens")
    nll, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        chunk = blocks[i:i + batch_size]
        n = max(len(b) for b in chunk)
        x = torch.tensor([b + [0] * (n - len(b)) for b in chunk])
        mask = torch.tensor([[1] * len(b) + [0] * (n - len(b)) for b in chunk])
        logits = model(x, attention_mask=mask).float()  # (B, T, V)
        target = x[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
        nll += F.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=IGNORE_INDEX,
                               reduction="sum").item()
        count += int((target != IGNORE_INDEX).sum())
    return {"perplexity": ppl(nll / count), "nll": nll / count, "tokens": count}
