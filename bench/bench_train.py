"""Training tokens/s of lmforge vs Hugging Face transformers on identical models.

    python bench/bench_train.py [--steps 10] [--threads 2] [--models gpt2,bert,t5]

Each model is built once in transformers (random init), saved, and loaded into lmforge,
so both sides train the very same architecture from the same weights. Same batches, same
optimizer (torch AdamW, lr 1e-4, weight decay 0.01, over all parameters), float32, one
update per batch; HF computes its loss from `labels=`, lmforge through its objective.
Steps alternate between the two (robust to a busy machine) and the first two of each are
warm-up. Prints the first-step losses (equal: same model, same batch) and the ratio.

    GPT-2-like   6 layers x 384, 6 heads, vocab 8192, batch 8 x 256          causal LM
    BERT-like    6 layers x 384, 6 heads, vocab 8192, batch 16 x 128         MLM, 15% targets
    T5-like      4+4 layers x 256, 4 heads, vocab 8192, batch 16 x 128 → 32  span-corruption shapes
"""

import argparse
import os
import tempfile
import time

import torch
import transformers as T

from lmforge.interop.hf import load_hf
from lmforge.objectives import causal_lm, masked_lm, seq2seq

V = 8192


def _gpt2():
    cfg = T.GPT2Config(vocab_size=V, n_embd=384, n_layer=6, n_head=6, n_positions=256, resid_pdrop=0.0,
                       embd_pdrop=0.0, attn_pdrop=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(V, (8, 256), generator=g)
    return T.GPT2LMHeadModel(cfg), causal_lm, {"input_ids": ids}, {"input_ids": ids, "labels": ids}


def _bert():
    cfg = T.BertConfig(vocab_size=V, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                       intermediate_size=1536, max_position_embeddings=128, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, V, (16, 128), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, -100)
    mask = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return T.BertForMaskedLM(cfg), masked_lm, batch, dict(batch)


def _t5():
    cfg = T.T5Config(vocab_size=V, d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_decoder_layers=4, num_heads=4,
                     dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(2, V, (16, 128), generator=g)
    labels = torch.randint(2, V, (16, 32), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return T.T5ForConditionalGeneration(cfg), seq2seq, batch, dict(batch)


MODELS = {"gpt2": ("GPT-2-like 6x384", _gpt2), "bert": ("BERT-like 6x384 MLM", _bert), "t5": ("T5-like 4+4x256", _t5)}


def _step(model, opt, loss_fn):
    loss = loss_fn()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def bench(name: str, steps: int) -> tuple[float, float, float, float]:
    torch.manual_seed(0)
    hf, objective, ours_batch, hf_batch = MODELS[name][1]()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_hf(d)
    hf.train()
    ours.train()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.01) for m in (ours, hf)]
    fns = [lambda: objective(ours, ours_batch)[0], lambda: hf(**hf_batch).loss]
    tokens = sum(v.numel() for k, v in hf_batch.items() if k in ("input_ids", "labels") and
                 (k == "input_ids" or name == "t5"))
    times, first = [0.0, 0.0], [None, None]
    for i in range(steps + 2):
        for j in (0, 1):
            t = time.perf_counter()
            loss = _step((ours, hf)[j], opts[j], fns[j])
            if i >= 2:
                times[j] += time.perf_counter() - t
            if first[j] is None:
                first[j] = loss
    return tokens * steps / times[0], tokens * steps / times[1], first[0], first[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--models", default="gpt2,bert,t5")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"transformers {T.__version__}, torch {torch.__version__}, threads={a.threads}, {a.steps} timed steps")
    print(f"{'model':22} {'lmforge tok/s':>14} {'HF tok/s':>10} {'ratio':>7}   first loss (lmforge / HF)")
    for name in a.models.split(","):
        ours, ref, l0, l1 = bench(name, a.steps)
        print(f"{MODELS[name][0]:22} {ours:14,.0f} {ref:10,.0f} {ours / ref:6.2f}x   {l0:.5f} / {l1:.5f}")


if __name__ == "__main__":
    main()
