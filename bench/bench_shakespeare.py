"""nanoGPT's CPU recipe on character-level Tiny Shakespeare, through lmforge's training loop.

    python bench/bench_shakespeare.py [--iters 2000] [--threads 2]

nanoGPT (README, "I only have a macbook"): config/train_shakespeare_char.py with
--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0,
i.e. lr 1e-3 with 100 warmup steps and cosine decay to 1e-4, AdamW (beta2 0.99, weight
decay 0.1), grad clip 1.0, no biases; it reports a validation loss of about 1.88.
Data: the first 90% of the characters train, the last 10% validate; the vocabulary is the
65 characters of the text. Prints our validation loss (20 batches of 12 x 64) and tokens/s.
"""

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from lmforge.config import ModelConfig
from lmforge.data.batches import lm_batches
from lmforge.models.heads import Model
from lmforge.objectives import causal_lm
from lmforge.train.loop import TrainConfig, evaluate, train

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare", "input.txt")
NANOGPT_VAL_LOSS = 1.88


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--data", default=DATA)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    text = open(a.data, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    train_ids, val_ids = ids[:n], ids[n:]

    cfg = ModelConfig.preset("gpt-tiny", vocab_size=len(chars), d_model=128, n_heads=4, n_decoder_layers=4,
                             d_ff=512, max_len=64, activation="gelu", bias=False, dropout=0.0)
    torch.manual_seed(1337)
    model = Model(cfg)
    block, batch = 64, 12
    tcfg = TrainConfig(lr=1e-3, schedule="cosine", warmup_steps=100, decay_steps=a.iters, min_lr=1e-4,
                       weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0, batch_size=batch,
                       max_steps=a.iters, log_every=100, eval_every=250, eval_batches=20, seed=1337,
                       device="cpu", out_dir=tempfile.mkdtemp(prefix="bench_shakespeare_"))
    val = lm_batches(val_ids, block, batch, seed=2024).take(20)  # nanoGPT: eval_iters=20 random windows
    t = time.perf_counter()
    result = train(model, causal_lm, lm_batches(train_ids, block, batch, seed=1337), tcfg, eval_batches=val)
    wall = time.perf_counter() - t
    train_est = evaluate(model, causal_lm, lm_batches(train_ids, block, batch, seed=7).take(20))["valid_loss"]
    print(f"tiny shakespeare (char, {len(chars)} symbols), {model.num_parameters() / 1e6:.2f}M parameters, "
          f"{a.iters} iters x {batch} x {block}, threads={a.threads}")
    print(f"train loss {train_est:.4f}   val loss {result['valid_loss']:.4f}   (nanoGPT reports ~{NANOGPT_VAL_LOSS})")
    print(f"{result['tokens_per_s']:,.0f} tokens/s over the run ({wall:.0f} s wall, evaluation included); "
          f"log: {result['log']}")


if __name__ == "__main__":
    main()
