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
