"""lmforge's own model directory: `config.json` + `model.safetensors` (+ tokenizer files).

Loading checks every key and every shape and refuses a partial load. Saving writes
each file to a temporary name and renames it, so an interrupted save never leaves a
half-written file in place of a good one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.atomic import atomic_write
from lmforge.config import ModelConfig
from lmforge.models.heads import Model

CONFIG, WEIGHTS = "config.json", "model.safetensors"


ModelKind = Literal["lmforge", "hf", "gguf"]


def model_kind(path: str | Path) -> ModelKind | None:
    """What a path holds: "lmforge" (a directory whose config.json has lmforge's `family`), "hf"
    (config.json with HF's `model_type`), "gguf" (a .gguf file), or None (none of these, or an
    unreadable config.json). The one place that looks inside a path to decide how to load it."""
    path = Path(path)
    if path.is_file():
        return "gguf" if path.suffix == ".gguf" else None
    cfg = path / CONFIG
    if not cfg.is_file():
        return None
    try:
        d = json.loads(cfg.read_text())
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(d, dict):
        return None
    if "model_type" in d:
        return "hf"
    return "lmforge" if "family" in d else None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def load_checked(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str,
                 allow_missing: tuple[str, ...] = ()) -> None:
    """Copy `sd` into `model` after checking every key and shape; refuse partial loads.

    allow_missing: key prefixes that may stay freshly initialised (a new task head).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith(allow_missing)]
    unexpected = [k for k in sd if k not in own]
    bad = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
           for k in sd if k in own and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:20])}"
                        + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:20])}"
                        + (" ..." if len(unexpected) > 20 else ""))
    if bad:
        problems.append("wrong shape: " + "; ".join(bad[:20]))
    if problems:
        raise ValueError(f"{source}: refusing a partial load: " + " | ".join(problems))
    model.load_state_dict(sd, strict=False)


def save_model(model: Model, directory: str | Path) -> Path:
    """Write config.json + model.safetensors into `directory` (created if needed)."""
    from lmforge.models.quantize import is_quantized
    if kind := is_quantized(model):
        raise ValueError(f"not saving to {directory}: the model is {kind}-quantised for inference; "
                         "save the float model (load it again without quantize)")
    directory = Path(directory)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(model.cfg.to_dict(), indent=2)))
    return directory


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32, **overrides) -> Model:
    """Load an lmforge model directory. `overrides` change config fields (e.g. a new task)."""
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found (an lmforge model directory holds {CONFIG} and {WEIGHTS})")
    cfg = ModelConfig.load(cfg_path)
    new_head = bool(overrides) and overrides.get("task", cfg.task) != cfg.task
    cfg = cfg.replace(**overrides) if overrides else cfg
    model = Model(cfg)
    sd = read_safetensors(w_path)
    load_weights(model, sd, str(w_path), new_head=new_head, dtype=dtype)
    return model.to(dtype)


def load_weights(model: Model, sd: dict[str, torch.Tensor], source: str, new_head: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
    """Checked load; with new_head only the backbone must match and the task head starts fresh."""
    if new_head:
        own = model.state_dict()
        sd = {k: v for k, v in sd.items() if k in own and not k.startswith(HEAD_PREFIXES[:-1])}
    load_checked(model, {k: v.to(dtype) for k, v in sd.items()}, source,
                 allow_missing=HEAD_PREFIXES if new_head else ())


# task heads, then the pooler (kept from the checkpoint when present, fresh otherwise)
HEAD_PREFIXES = ("lm_head.", "mlm_head.", "nsp_head.", "classifier.", "qa_head.", "backbone.pooler.")
