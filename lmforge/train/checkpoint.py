"""Training checkpoints: everything needed to continue a run exactly.

A checkpoint is one `torch.save` file, `ckpt-<step>.pt`, holding the model and optimizer
state dicts, the step, the random number generators (torch, CUDA, numpy, Python) and the
data stream's position. It is written to a temporary name and renamed, so a crash while
saving leaves the previous checkpoints intact; only the last `keep_last` are kept.
Everything in it is a tensor or plain Python data, so it loads with `weights_only=True`.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from lmforge.atomic import atomic_write

_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"ckpt-{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The checkpoints in `directory`, oldest (lowest step) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(directory: str | Path, step: int, state: dict, keep_last: int = 3) -> Path:
    """Write `state` atomically as ckpt-<step>.pt, then delete all but the newest `keep_last`."""
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be >= 1")
    path = checkpoint_path(directory, step)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint onto the CPU; a truncated or foreign file is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors differ by torch version
        raise ValueError(f"{path}: not a readable lmforge checkpoint (truncated or corrupt?): {e}") from e


def rng_state() -> dict:
    """The state of every global random number generator, as tensors and plain data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
