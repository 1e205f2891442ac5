"""Retrieval evaluation: queries → relevant documents, ranked by embedding similarity.

Data: JSONL lines `{"query": str, "positives": [str, ...]}` (the collection is every
positive, plus `{"doc": str}` lines for distractors), or a SQuAD v1.1 JSON file, where
each question's relevant document is its paragraph.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.data.corpus import jsonl_rows
from lmforge.embed import SemanticIndex, embed
from lmforge.evaluate import retrieval_metrics


def read_retrieval(path: str | Path, limit: int | None = None) -> tuple[list[str], list[str], list[set[int]]]:
    """→ (queries, docs, relevant doc indices per query). For SQuAD, `limit` stops after the
    paragraph that reaches `limit` questions: the collection is every paragraph read so far."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    docs, where, queries, relevant = [], {}, [], []

    def doc_id(text: str) -> int:
        if text not in where:
            where[text] = len(docs)
            docs.append(text)
        return where[text]

    if path.suffix == ".json":
        from lmforge.tasks.qa import read_squad  # validated: errors name the file and the question
        for q in read_squad(path):
            if limit and len(queries) >= limit and q.context not in where:
                break
            queries.append(q.question)
            relevant.append({doc_id(q.context)})
    else:
        for n, row in jsonl_rows(path):
            if "doc" in row:
                if not isinstance(row["doc"], str) or not row["doc"].strip():
                    raise ValueError(f"{path}:{n}: 'doc' must be a non-empty string, got {row['doc']!r}")
                doc_id(row["doc"])
                continue
            query, positives = row.get("query"), row.get("positives")
            if (not isinstance(query, str) or not query.strip() or not isinstance(positives, list) or not positives
                    or not all(isinstance(p, str) and p.strip() for p in positives)):
                raise ValueError(f"{path}:{n}: needs a 'query' string and a non-empty 'positives' list of strings "
                                 f"(or 'doc')")
            queries.append(row["query"])
            relevant.append({doc_id(p) for p in row["positives"]})
    if not queries:
        raise ValueError(f"{path}: no queries found")
    if limit:  # the whole collection stays: distractors make the task meaningful
        queries, relevant = queries[:limit], relevant[:limit]
    return queries, docs, relevant


def eval_retrieval(model, tokenizer, queries, docs, relevant, batch_size: int = 32,
                   ks=(1, 5, 10)) -> dict[str, float]:
    """recall@k, MRR@10 and nDCG@10 of exact cosine search over `docs`."""
    index = SemanticIndex.build(model, tokenizer, docs, model_dir="", batch_size=batch_size)
    q = embed(model, tokenizer, queries, batch_size=batch_size)
    hits = index.search(q, top_k=max(ks))
    ranked = [[h.index for h in row] for row in hits]
    return {**retrieval_metrics(ranked, relevant, ks=ks), "queries": len(queries), "docs": len(docs)}
