"""The `lmforge` command. Each subcommand is a thin shell over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_convert(a) -> int:
    from lmforge import api
    model, tok = api.load(a.src)
    fmt = a.to or ("hf" if Path(a.src).is_dir() and (Path(a.src) / "config.json").is_file()
                   and "family" in json.loads((Path(a.src) / "config.json").read_text()) else "lmforge")
    api.save(model, a.dst, tokenizer=tok, format=fmt)
    print(f"wrote {fmt} model ({model.cfg.family}, {model.num_parameters():,} parameters) to {a.dst}")
    return 0


def _cmd_info(a) -> int:
    from lmforge import api
    from lmforge.config import ModelConfig
    from lmforge.models.heads import Model
    if a.path in _presets():
        import torch
        with torch.device("meta"):
            info = api.describe(Model(ModelConfig.preset(a.path)))
    else:
        info = api.describe(api.load(a.path)[0])
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"family:     {info['family']}\ntask:       {info['task']}\nparameters: {info['parameters']:,}")
        for k, v in info["config"].items():
            print(f"  {k:18} {v}")
    return 0


def _read_lines(path: str) -> list[str]:
    """One text per line (.txt) or a JSONL file with a "text" field; empty lines are an error."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found")
    texts = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                raise ValueError(f"{p}:{n}: empty line")
            if p.suffix == ".jsonl":
                try:
                    line = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{p}:{n}: expected a JSON object with a 'text' field") from None
            texts.append(line)
    if not texts:
        raise ValueError(f"{p} is empty")
    return texts


def _cmd_embed(a) -> int:
    import numpy as np
    from lmforge import api
    from lmforge.embed import embed
    model, tok = api.load(a.model)
    texts = _read_lines(a.input)
    vecs = embed(model, tok, texts, batch_size=a.batch_size, normalize=not a.no_normalize,
                 pooling=a.pooling, progress=len(texts) > 1000)
    out = Path(a.out)
    if out.suffix == ".npy":
        np.save(out, vecs.numpy())
    else:
        with open(out, "w", encoding="utf-8") as f:
            for t, v in zip(texts, vecs.tolist()):
                f.write(json.dumps({"text": t, "embedding": v}, ensure_ascii=False) + "\n")
    print(f"wrote {len(texts)} embeddings of dimension {vecs.shape[1]} to {out}")
    return 0


def _cmd_similarity(a) -> int:
    from lmforge import api
    from lmforge.embed import embed
    model, tok = api.load(a.model)
    v = embed(model, tok, [a.text_a, a.text_b])
    print(f"{float(v[0] @ v[1]):.4f}")
    return 0


def _cmd_index(a) -> int:
    from lmforge import api
    from lmforge.embed import SemanticIndex
    model, tok = api.load(a.model)
    index = SemanticIndex.build(model, tok, _read_lines(a.docs), a.model, batch_size=a.batch_size,
                                ann=True if a.ann else None, progress=True)
    index.save(a.out)
    print(f"indexed {index.meta['count']} documents ({index.meta['dim']} dims) into {a.out}")
    return 0


def _cmd_search(a) -> int:
    from lmforge import api
    from lmforge.embed import SemanticIndex, embed
    index = SemanticIndex.load(a.index)
    model_dir = a.model or index.meta["model"]
    index.check_model(model_dir)
    model, tok = api.load(model_dir)
    for hit in index.search(embed(model, tok, [a.query]), top_k=a.top_k)[0]:
        print(f"{hit.rank:3d}  {hit.score:.4f}  {hit.text}")
    return 0


def _cmd_eval(a) -> int:
    from lmforge import api
    model, tok = api.load(a.model)
    if a.task == "sts":
        from lmforge.tasks.sts import eval_sts, read_sts
        metrics = eval_sts(model, tok, read_sts(a.data), batch_size=a.batch_size)
    elif a.task == "retrieval":
        from lmforge.tasks.retrieval import eval_retrieval, read_retrieval
        metrics = eval_retrieval(model, tok, *read_retrieval(a.data, limit=a.limit), batch_size=a.batch_size)
    else:
        raise ValueError(f"unknown eval task {a.task!r}")
    _print_metrics(a.task, metrics)
    if a.out:
        Path(a.out).write_text(json.dumps(metrics, indent=2))
    return 0


def _print_metrics(task: str, metrics: dict) -> None:
    print(f"{'metric':<16}{task}")
    for k, v in metrics.items():
        print(f"{k:<16}{v:.4f}" if isinstance(v, float) else f"{k:<16}{v}")


def _presets():
    from lmforge.config import PRESETS
    return PRESETS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge", description="Pretrain, fine-tune and run Transformer language models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("convert", help="convert between Hugging Face, GGUF and lmforge checkpoints")
    s.add_argument("src", help="HF directory, lmforge directory or .gguf file")
    s.add_argument("dst", help="output directory")
    s.add_argument("--to", choices=["lmforge", "hf"], help="output format (default: lmforge, or hf for an lmforge source)")
    s.set_defaults(fn=_cmd_convert)

    s = sub.add_parser("info", help="family, parameter count and config of a checkpoint or preset")
    s.add_argument("path", help="model directory, .gguf file, or preset name")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_cmd_info)

    s = sub.add_parser("embed", help="sentence embeddings of a file of texts (one per line, or JSONL)")
    s.add_argument("model")
    s.add_argument("--input", required=True, help="texts: .txt one per line, or .jsonl with a 'text' field")
    s.add_argument("--out", required=True, help=".npy matrix or .jsonl with text and embedding")
    s.add_argument("--pooling", choices=["mean", "cls", "last"], help="default: the model's own")
    s.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation")
    s.add_argument("--batch-size", type=int, default=32)
    s.set_defaults(fn=_cmd_embed)

    s = sub.add_parser("similarity", help="cosine similarity of two texts")
    s.add_argument("model")
    s.add_argument("text_a")
    s.add_argument("text_b")
    s.set_defaults(fn=_cmd_similarity)

    s = sub.add_parser("index", help="semantic search index: lmforge index build MODEL --docs FILE --out DIR")
    isub = s.add_subparsers(dest="action", required=True)
    b = isub.add_parser("build", help="embed documents and store them with the model's identity")
    b.add_argument("model")
    b.add_argument("--docs", required=True, help="documents: .txt one per line, or .jsonl with 'text'")
    b.add_argument("--out", required=True)
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--ann", action="store_true", help="approximate HNSW search (default from 1M documents)")
    b.set_defaults(fn=_cmd_index)

    s = sub.add_parser("search", help="search an index: lmforge search DIR QUERY --top-k K")
    s.add_argument("index")
    s.add_argument("query")
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--model", help="model directory (default: the one the index was built with)")
    s.set_defaults(fn=_cmd_search)

    s = sub.add_parser("eval", help="evaluate a model on a task's data and print a metrics table")
    s.add_argument("--task", required=True, choices=["sts", "retrieval"])
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--limit", type=int, help="evaluate only the first N examples/queries")
    s.add_argument("--out", help="write the metrics as JSON")
    s.set_defaults(fn=_cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"lmforge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
