"""sentence-transformers contender for embeddings. Imports sentence_transformers (and torch)."""

import sentence_transformers
import torch

from bench.workers.serve import serve, threads


def embed(model_dir: str, sentences: list[str], batch_size: int, check: int = 16):
    model = sentence_transformers.SentenceTransformer(model_dir, device="cpu")

    def encode(texts):
        return model.encode(texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)

    def run():
        encode(sentences)
        return float(len(sentences))
    return run, {"check": encode(sentences[:check]).tolist()}


if __name__ == "__main__":
    torch.set_num_threads(threads())
    serve({"embed": embed})
