"""The `lmforge` command. Each subcommand is a thin shell over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge import cli_generate
from lmforge.cli_help import HelpfulParser


def _cmd_convert(a) -> int:
    from lmforge import api
    from lmforge.models.io import model_kind
    model, tok = api.load(a.src)
    fmt = a.to or ("hf" if model_kind(a.src) == "lmforge" else "lmforge")
    api.save(model, a.dst, tokenizer=tok, format=fmt)
    print(f"wrote {fmt} model ({model.cfg.family}, {model.num_parameters():,} parameters) to {a.dst}")
    return 0


def _cmd_info(a) -> int:
    from lmforge.config import ModelConfig
    if a.path not in _presets() and not Path(a.path).exists():
        try:
            ModelConfig.preset(a.path)  # fails, listing the presets
        except ValueError as e:
            raise FileNotFoundError(f"{a.path}: no such model directory or .gguf file, and {e}") from None
    from lmforge import api
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
    from lmforge.data.corpus import read_lines
    return read_lines(path)


def _cmd_embed(a) -> int:
    from lmforge import api
    from lmforge.embed import check_embedding_path, embed, write_embeddings
    check_embedding_path(a.out)  # a wrong extension fails before the input is read or the model loaded
    texts = _read_lines(a.input)
    model, tok = api.load(a.model)
    vecs = embed(model, tok, texts, batch_size=a.batch_size, normalize=not a.no_normalize,
                 pooling=a.pooling, progress=len(texts) > 1000, dtype=a.dtype)
    out = write_embeddings(a.out, texts, vecs)
    print(f"wrote {len(texts)} embeddings of dimension {vecs.shape[1]} to {out}")
    return 0


def _nonempty(**texts: str) -> None:
    """Refuse an empty command-line text, naming the argument, before a model is loaded."""
    for name, text in texts.items():
        if not text.strip():
            raise ValueError(f"{name} is empty; give some words to embed")


def _cmd_similarity(a) -> int:
    _nonempty(TEXT_A=a.text_a, TEXT_B=a.text_b)
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
    _nonempty(QUERY=a.query)
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
    model, tok = api.load(a.model) if a.task in ("sts", "retrieval") else (None, None)
    if a.task == "sts":
        from lmforge.tasks.sts import eval_sts, read_sts
        metrics = eval_sts(model, tok, read_sts(a.data), batch_size=a.batch_size)
    elif a.task == "retrieval":
        from lmforge.tasks.retrieval import eval_retrieval, read_retrieval
        metrics = eval_retrieval(model, tok, *read_retrieval(a.data, limit=a.limit), batch_size=a.batch_size)
    else:
        from lmforge.tasks.finetune import evaluate_task
        opts = _overrides(a.overrides)
        if a.limit:
            opts["limit"] = a.limit
        metrics = evaluate_task(a.task, a.model, a.data, **opts)
    _print_metrics(a.task, metrics)
    if a.out:
        from lmforge.atomic import atomic_write
        atomic_write(a.out, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
    return 0


def _print_metrics(task: str, metrics: dict) -> None:
    print(f"{'metric':<16}{task}")
    for k, v in metrics.items():
        print(f"{k:<16}{v:.4f}" if isinstance(v, float) else f"{k:<16}{v}")


def _cmd_tokenizer(a) -> int:
    from lmforge.tokenizer import train_tokenizer
    tok = train_tokenizer(a.files, kind=a.kind, vocab_size=a.vocab_size, family=a.family,
                          min_frequency=a.min_frequency, lowercase=a.lowercase)
    tok.save(a.out)
    print(f"trained a {a.kind} tokenizer with {tok.vocab_size} tokens; saved to {a.out}")
    return 0


def _cmd_pretrain(a) -> int:
    import shlex
    from lmforge import api
    from lmforge.train import distributed
    from lmforge.train.pretrain import run_pretraining, stop_message
    from lmforge.train.recipe import load_recipe
    recipe = load_recipe(a.config, a.overrides)
    result = run_pretraining(recipe)
    if not distributed.is_main():  # under torchrun rank 0 reports
        return 0
    m = result["metrics"]
    print(f"\nmodel: {result['parameters']:,} parameters, {result['train_tokens']:,} training tokens")
    for k in ("steps", "train_loss", "valid_loss", "valid_perplexity", "tokens_per_s"):
        if m.get(k) is not None:
            print(f"{k:18}{m[k]:.4g}" if isinstance(m[k], float) else f"{k:18}{m[k]}")
    if m.get("first_train_loss") is not None and m.get("train_loss") is not None:
        print(f"train loss        {m['first_train_loss']:.3f} (first log) -> {m['train_loss']:.3f} (last)")
    if m.get("first_valid_loss") is not None and m.get("valid_loss") is not None:
        print(f"validation loss   {m['first_valid_loss']:.3f} (first eval) -> {m['valid_loss']:.3f} (last)")
    print(f"saved model and tokenizer to {result['model_dir']}; loss plot {result['plot']}; log {result['log']}")
    # the command that reruns this recipe, without the settings the advice changes
    keep = [o for o in a.overrides if o.split("=", 1)[0] not in ("train.resume", "train.max_steps", "train.max_minutes")]
    command = shlex.join(["lmforge", "pretrain", *(["--config", a.config] if a.config else []), *keep])
    print(stop_message(result, recipe, command))
    model, tok = api.load(result["model_dir"])
    if model.cfg.task == "lm" and model.cfg.family == "decoder" and a.samples:
        print("\nsample continuations (top-k 40 sampling, temperature 0.8):")
        for prompt in a.prompt or ["The", "A class definition", "The import statement"]:
            text = api.generate_text(model, tok, prompt, max_new_tokens=60, strategy="sample", temperature=0.8,
                                     top_k=40, seed=0)
            print(f"--- {prompt!r}\n{prompt}{text}")
    return 0


def _overrides(pairs: list[str]) -> dict:
    """KEY=VALUE arguments → options, typed later by the option's declared type."""
    from lmforge.train.overrides import parse_overrides
    return parse_overrides(pairs)


def _cmd_finetune(a) -> int:
    from lmforge.tasks.finetune import finetune
    from lmforge.train import distributed
    metrics = finetune(a.task, a.model, a.train, a.valid, out_dir=a.out, **_overrides(a.overrides))
    if not distributed.is_main():  # under torchrun rank 0 reports
        return 0
    _print_metrics(a.task, metrics)
    print(f"saved to {a.out}")
    return 0


def _cmd_predict(a) -> int:
    from lmforge.tasks.finetune import predict_task
    for row in predict_task(a.task, a.model, a.input, context=a.context, **_overrides(a.overrides)):
        print(json.dumps(row, ensure_ascii=False))
    return 0


def _presets():
    from lmforge.config import PRESETS  # config imports no torch: cheap enough for --help
    return PRESETS


def build_parser() -> argparse.ArgumentParser:
    from lmforge import __version__
    p = HelpfulParser(prog="lmforge", description="Pretrain, fine-tune and run Transformer language models.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("convert", help="convert between Hugging Face, GGUF and lmforge checkpoints")
    s.add_argument("src", help="HF directory, lmforge directory or .gguf file")
    s.add_argument("dst", help="output directory")
    s.add_argument("--to", choices=["lmforge", "hf"], help="output format (default: lmforge, or hf for an lmforge source)")
    s.set_defaults(fn=_cmd_convert)

    s = sub.add_parser("info", help="family, parameter count and config of a checkpoint or preset")
    s.add_argument("path", help=f"model directory, .gguf file, or preset name ({', '.join(_presets())})")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_cmd_info)

    s = sub.add_parser("embed", help="sentence embeddings of a file of texts (one per line, or JSONL)")
    s.add_argument("model")
    s.add_argument("--input", required=True, help="texts: .txt one per line, or .jsonl with a 'text' field")
    s.add_argument("--out", required=True, help="the extension picks the format: .npy matrix, or .jsonl, .csv, "
                   ".tsv with text and embedding")
    s.add_argument("--pooling", choices=["mean", "cls", "last"], help="default: the model's own")
    s.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                   help="bfloat16: faster on CPUs with bf16 matrix instructions (AVX512-BF16, AMX), far slower "
                        "elsewhere; auto: measured here (default float32)")
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
    s.add_argument("--task", required=True, choices=["classify", "qa", "seq2seq", "perplexity", "sts", "retrieval"])
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--limit", type=int, help="evaluate only the first N examples/queries")
    s.add_argument("--out", help="write the metrics as JSON")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="task options, e.g. num_beams=4 max_len=128")
    s.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("tokenizer", help="train a tokenizer: lmforge tokenizer train --kind bpe ...")
    tsub = s.add_subparsers(dest="action", required=True)
    t = tsub.add_parser("train", help="train BPE, WordPiece or Unigram on text files")
    t.add_argument("files", nargs="+")
    t.add_argument("--kind", choices=["bpe", "wordpiece", "unigram"], required=True)
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--family", choices=["decoder", "encoder", "encoder-decoder", "t5", "bart"], default="decoder",
                   help="which special tokens and template to add")
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--lowercase", action="store_true")
    t.add_argument("--out", required=True)
    t.set_defaults(fn=_cmd_tokenizer)

    s = sub.add_parser("pretrain", help="self-supervised pretraining from a YAML recipe (the main job)")
    s.add_argument("--config", help="recipe YAML (configs/*.yaml); default: built-in defaults")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=3e-4")
    s.add_argument("--prompt", action="append", help="prompt for the sample continuations (repeatable)")
    s.add_argument("--no-samples", dest="samples", action="store_false", help="skip the sample continuations")
    s.set_defaults(fn=_cmd_pretrain)

    cli_generate.add_commands(sub)  # generate, chat, serve

    s = sub.add_parser("finetune", help="fine-tune on labelled data: classify, qa or seq2seq")
    s.add_argument("--task", required=True, choices=["classify", "qa", "seq2seq"])
    s.add_argument("--model", required=True, help="model directory, or preset:NAME for seq2seq from scratch")
    s.add_argument("--train", required=True)
    s.add_argument("--valid")
    s.add_argument("--out", default="finetuned")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="options, e.g. lr=5e-5 epochs=1 lora=true")
    s.set_defaults(fn=_cmd_finetune)

    s = sub.add_parser("predict", help="run a fine-tuned model on new inputs (JSON lines out)")
    s.add_argument("--task", required=True, choices=["classify", "qa", "seq2seq"])
    s.add_argument("--model", required=True)
    s.add_argument("--input", required=True, help="a text, or a file (.txt, .jsonl, .tsv/.csv, SQuAD .json)")
    s.add_argument("--context", help="qa: the passage the question is about")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    s.set_defaults(fn=_cmd_predict)

    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # bare `lmforge`: show what it can do
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"lmforge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
