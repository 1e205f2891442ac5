"""Training sentence embeddings on text pairs (Sentence-BERT style).

Two objectives, both `(model, batch) -> (loss, metrics)` over an `embed`-task model:
- `contrastive`: in-batch negatives (MultipleNegativesRanking; Henderson et al. 2017):
  each anchor's positive is the matching row, every other row is a negative;
  loss = CE(scale · cos(a_i, b_j), j = i).
- `cosine_regression`: STS-style regression of cos(a, b) onto the gold score
  rescaled to [0, 1] (CosineSimilarityLoss), MSE.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.data.corpus import pad_batch
from lmforge.tasks.sts import ScoredPair, eval_sts, read_sts


def positive_pairs(pairs: Sequence[ScoredPair], min_score: float = 4.0) -> list[ScoredPair]:
    """Pairs similar enough to serve as (anchor, positive) for contrastive training."""
    out = [p for p in pairs if p.score >= min_score]
    if not out:
        raise ValueError(f"no pair has a score >= {min_score}")
    return out


def pair_batches(tok, pairs: Sequence[ScoredPair], batch_size: int, max_len: int = 128, *,
                 max_score: float = 5.0, seed: int = 0, shuffle: bool = True,
                 epochs: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Endless (or `epochs`-long) stream of tokenised pair batches; a batch never holds the
    same anchor text twice, so in-batch negatives are real negatives."""
    pad = tok.pad_id if tok.pad_id is not None else 0
    enc_a = [ids[:max_len] for ids in tok.encode_batch([p.a for p in pairs])]
    enc_b = [ids[:max_len] for ids in tok.encode_batch([p.b for p in pairs])]
    rng = random.Random(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = list(range(len(pairs)))
        if shuffle:
            rng.shuffle(order)
        batch, seen = [], set()
        for i in order:
            if pairs[i].a in seen:
                continue
            batch.append(i)
            seen.add(pairs[i].a)
            if len(batch) == batch_size:
                yield _collate(batch, enc_a, enc_b, pairs, pad, max_score)
                batch, seen = [], set()
        if len(batch) > 1:
            yield _collate(batch, enc_a, enc_b, pairs, pad, max_score)
        epoch += 1


def _collate(idx, enc_a, enc_b, pairs, pad, max_score):
    a_ids, a_mask = pad_batch([enc_a[i] for i in idx], pad)
    b_ids, b_mask = pad_batch([enc_b[i] for i in idx], pad)
    scores = torch.tensor([pairs[i].score / max_score for i in idx], dtype=torch.float32)
    return {"input_ids": a_ids, "attention_mask": a_mask, "b_ids": b_ids, "b_mask": b_mask, "scores": scores}


def _embed_pair(model, batch):
    a = model(batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, d)
    b = model(batch["b_ids"], attention_mask=batch["b_mask"])
    return F.normalize(a, dim=-1), F.normalize(b, dim=-1)


def contrastive(model, batch, scale: float = 20.0):
    """In-batch negatives: CE over scaled cosine similarities, the diagonal is the target."""
    a, b = _embed_pair(model, batch)
    logits = scale * a @ b.T  # (B, B)
    target = torch.arange(a.shape[0], device=a.device)
    loss = F.cross_entropy(logits, target)
    acc = (logits.argmax(-1) == target).float().mean()
    return loss, {"loss": loss.detach(), "in_batch_acc": acc.detach()}


def cosine_regression(model, batch):
    """MSE between cos(a, b) and the gold similarity in [0, 1]."""
    a, b = _embed_pair(model, batch)
    cos = (a * b).sum(-1)
    loss = F.mse_loss(cos, batch["scores"])
    return loss, {"loss": loss.detach()}


LOSSES = {"contrastive": contrastive, "cosine": cosine_regression}


def train_embeddings(model_dir: str | Path, train_file: str | Path, out_dir: str | Path,
                     valid_file: str | Path | None = None, *, loss: str = "contrastive", steps: int = 200,
                     lr: float = 2e-5, batch_size: int = 32, min_score: float = 4.0, max_len: int = 128,
                     seed: int = 0, progress: bool = False) -> dict:
    """Fine-tune an encoder for sentence embeddings on scored pairs (STS-B format or
    `a<TAB>b<TAB>score`) with the one training loop; report dev Spearman before and after."""
    from lmforge.interop.load import load, save
    from lmforge.train.loop import TrainConfig, train
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}: expected one of {sorted(LOSSES)}")
    model, tok = load(model_dir, task="embed")  # an embedding model keeps its head; any other gets pooling
    if model.cfg.family == "decoder":
        raise ValueError(f"{model_dir}: embedding training needs a model with an encoder")
    pairs = read_sts(train_file)
    if loss == "contrastive":
        pairs = positive_pairs(pairs, min_score)
    valid = read_sts(valid_file) if valid_file else None
    before = eval_sts(model.eval(), tok, valid)["spearman"] if valid else None
    cfg = TrainConfig(lr=lr, schedule="linear", warmup_steps=max(1, steps // 10), weight_decay=0.01,
                      batch_size=batch_size, max_steps=steps, seed=seed, eval_every=0, log_every=10,
                      out_dir=str(Path(out_dir) / "train"), progress=progress)
    torch.manual_seed(seed)
    model.train()
    result = train(model, LOSSES[loss], pair_batches(tok, pairs, batch_size, max_len, seed=seed), cfg)
    model.eval()
    save(model, out_dir, tokenizer=tok)
    metrics = {"train_loss": result.get("train_loss"), "steps": result.get("steps"), "pairs": len(pairs)}
    if valid:
        metrics.update(spearman_before=before, spearman_after=eval_sts(model, tok, valid)["spearman"])
    return metrics

