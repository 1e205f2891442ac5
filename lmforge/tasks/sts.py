"""Semantic textual similarity: STS Benchmark files and their evaluation.

STS-B files are tab-separated with no header: genre, file, year, id, score (0–5),
sentence1, sentence2 [, notes...]. Sentences may contain quote characters, so lines
are split on tabs with no quoting at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.data.corpus import text_lines
from lmforge.embed import cosine, embed
from lmforge.evaluate import pearson, spearman


@dataclass
class ScoredPair:
    a: str
    b: str
    score: float


def read_sts(path: str | Path) -> list[ScoredPair]:
    """Read STS-B (7+ tab-separated fields) or a simple `sentence1<TAB>sentence2<TAB>score` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    pairs = []
    for n, line in enumerate(text_lines(path), 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            if len(parts) >= 7:
                pairs.append(ScoredPair(parts[5], parts[6], float(parts[4])))
            elif len(parts) == 3:
                pairs.append(ScoredPair(parts[0], parts[1], float(parts[2])))
            else:
                raise ValueError(f"expected 7 (STS-B) or 3 tab-separated fields, got {len(parts)}")
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
        if not pairs[-1].a.strip() or not pairs[-1].b.strip():
            raise ValueError(f"{path}:{n}: empty sentence")
    if not pairs:
        raise ValueError(f"{path}: no sentence pairs")
    return pairs


def eval_sts(model, tokenizer, pairs: list[ScoredPair], batch_size: int = 32, dtype: str = "float32"
             ) -> dict[str, float]:
    """Spearman and Pearson correlation of cosine similarity with the gold scores (embeddings in
    `dtype`, as `embed` takes it)."""
    a = embed(model, tokenizer, [p.a for p in pairs], batch_size=batch_size, dtype=dtype)
    b = embed(model, tokenizer, [p.b for p in pairs], batch_size=batch_size, dtype=dtype)
    sims = (a * b).sum(-1).tolist() if a.shape == b.shape else cosine(a, b).diagonal().tolist()
    gold = [p.score for p in pairs]
    return {"spearman": spearman(sims, gold), "pearson": pearson(sims, gold), "pairs": len(pairs)}
