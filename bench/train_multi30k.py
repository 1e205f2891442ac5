"""Multi30k en→de: the paper's architecture (post-norm, sinusoidal positions, shared joint BPE,
tied embeddings, label smoothing 0.1) at CPU scale, from scratch; sacreBLEU on val with beam 4.

    python bench/train_multi30k.py --preset transformer-tiny --max-minutes 35 --out /tmp/multi30k

Trains for a wall-clock budget with the paper's schedule ("noam": linear warmup, then
inverse square root; --lr is its factor), or for --epochs/--steps with any other schedule.
Builds the model from the preset and trains a joint byte-level BPE on both sides of the
training data first (finetune's `preset:` path). Prints one JSON line with bleu and chrf.
"""

import argparse
import json
import os
import time

from lmforge.tasks.finetune import finetune

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "multi30k")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA)
    p.add_argument("--preset", default="transformer-tiny")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--epochs", type=float, default=10.0)
    p.add_argument("--steps", type=int, help="overrides --epochs")
    p.add_argument("--max-minutes", type=float, help="stop training after this many minutes")
    p.add_argument("--schedule", default="noam", help="noam (the paper's) | cosine | linear | constant")
    p.add_argument("--lr", type=float, default=0.4, help="peak lr; for noam the factor (peak = "
                   "factor * d_model^-0.5 * warmup^-0.5)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=float, default=400, help="steps (>= 1) or a fraction of the steps")
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--out", default="/tmp/multi30k")
    a = p.parse_args()
    t0 = time.time()
    train, val = os.path.join(a.data, "train"), os.path.join(a.data, "val")
    metrics = finetune("seq2seq", f"preset:{a.preset}", train, val, a.out, src_lang="en", tgt_lang="de",
                       vocab_size=a.vocab_size, epochs=a.epochs, steps=a.steps, lr=a.lr, batch_size=a.batch_size,
                       warmup=a.warmup, schedule=a.schedule, max_minutes=a.max_minutes, num_beams=a.num_beams, label_smoothing=0.1, weight_decay=0.0, log_every=50)
    metrics["wall_seconds"] = round(time.time() - t0, 1)
    print(json.dumps(metrics, default=str))


if __name__ == "__main__":
    main()
