"""Training checkpoints: everything needed to continue a run exactly.

A checkpoint is one `torch.save` file, `ckpt-<step>.pt`, holding a `TrainState`: the model and
optimizer state dicts, the step, the random number generators (torch, CUDA, numpy, Python),
the data stream's position and the loop's counters. `TrainState.capture` takes it from a running
loop, `TrainState.restore` puts it back. Only the last `keep_last` are kept.
Everything in it is a tensor or plain Python data, so it loads with `weights_only=True`.

Crash safety: the file is written under a temporary name, its sha256 goes beside it
(`ckpt-<step>.pt.sha256`, the format of `sha256sum`), and only then is the file renamed into place.
So a crash at any moment (SIGKILL mid-write included) leaves only complete checkpoints, each with its
checksum; a checkpoint truncated or damaged later fails its checksum on load, with a message naming
it, and `load_latest_state` falls back to the previous one.
"""

from __future__ import annotations

import errno
import hashlib
import random
import re
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from lmforge.atomic import atomic_write
from lmforge.models.io import load_checked

_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
_LEFTOVER = re.compile(r"^\.ckpt-\d+\.pt(\.sha256)?\..*\.tmp$")  # atomic_write's temporary names


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


def checksum_path(path: str | Path) -> Path:
    """Where the sha256 of checkpoint `path` is kept: beside it, as <name>.sha256."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _remove_leftovers(directory: Path) -> None:
    """Temporary files and orphaned checksums of a save that a crash interrupted (one writer per folder)."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        orphan = p.name.endswith(".pt.sha256") and not p.with_name(p.name[:-7]).exists()
        if _LEFTOVER.match(p.name) or orphan:
            p.unlink(missing_ok=True)


def save_checkpoint(directory: str | Path, step: int, state: dict, keep_last: int = 3) -> Path:
    """Write `state` as ckpt-<step>.pt with its checksum, then delete all but the newest `keep_last`.

    The payload goes to a temporary file, its sha256 is written (atomically), then the payload is
    renamed into place: a visible ckpt-*.pt is always complete and has its checksum. A failed write
    (a full disk) is an OSError naming the file and the checkpoint still intact; nothing is pruned."""
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be >= 1")
    directory = Path(directory)
    path = checkpoint_path(directory, step)
    _remove_leftovers(directory)

    def write(tmp):
        torch.save(state, tmp)
        line = f"{_sha256(tmp)}  {path.name}\n"
        atomic_write(checksum_path(path), lambda t: Path(t).write_text(line))
    try:
        atomic_write(path, write)
    except OSError as e:
        previous = latest_checkpoint(directory)
        kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
        hint = "; free some disk space or lower train.keep_last" if e.errno == errno.ENOSPC else ""
        raise OSError(e.errno, f"could not write checkpoint {path}: {e.strerror or e}; no partial file was "
                               f"left and {kept}{hint}") from e
    for old in list_checkpoints(directory)[:-keep_last]:
        remove_checkpoint(old)
    return path


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint, then its checksum (so no checkpoint is ever without one)."""
    Path(path).unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


def verify_checkpoint(path: str | Path) -> None:
    """Check a checkpoint against its sha256; a ValueError names the file when they differ. A file
    without a checksum (written by hand or by an older lmforge) is left to `torch.load` to judge."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    sums = checksum_path(path)
    if not sums.is_file():
        return
    expected = sums.read_text().split()[:1]
    actual = _sha256(path)
    if expected != [actual]:
        raise ValueError(f"{path}: checksum mismatch (sha256 {actual[:12]}..., {sums.name} says "
                         f"{(expected or ['nothing'])[0][:12]}...): the file is truncated or corrupt")


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint onto the CPU after checking its checksum; a truncated, corrupt or foreign
    file is a ValueError naming it."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors differ by torch version
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable lmforge checkpoint (truncated or corrupt?): {first}") from e


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


FORMAT = 1


@dataclass
class TrainState:
    """Everything the training loop needs to continue a run exactly (the checkpoint schema).

    Counters: `step` updates done, `tokens` read, `elapsed` seconds of training so far, and the
    metric sums of the steps since the last log record (`window`, `window_steps`, `window_tokens`),
    so that a resumed run logs the same numbers as one that ran straight through.
    """

    step: int
    tokens: int
    elapsed: float
    model: dict
    optimizer: dict
    data: dict  # the batch stream's position (see lmforge.train.loop._Counted)
    rng: dict  # rank 0's generators
    rng_ranks: list | None  # every process's generators, under torchrun
    window: dict
    window_steps: int
    window_tokens: int
    scheduler: dict  # {name, step, lr}: for reading; the schedule is a pure function of the step
    train_config: dict
    world_size: int = 1
    model_config: dict | None = None
    skipped: int = 0  # updates skipped for a non-finite loss or gradient (train.on_nonfinite=skip)
    format: int = FORMAT

    @classmethod
    def capture(cls, model, optimizer, data, *, step: int, tokens: int, elapsed: float, rngs: list[dict],
                window: dict, window_steps: int, window_tokens: int, train_config, lr: float,
                world_size: int = 1, skipped: int = 0) -> TrainState:
        """The state of a running loop; `rngs` holds `rng_state()` of every process (rank 0 first)."""
        return cls(step=step, tokens=tokens, elapsed=elapsed, model=model.state_dict(),
                   optimizer=optimizer.state_dict(), data=data.state_dict(), rng=rngs[0],
                   rng_ranks=rngs if world_size > 1 else None,
                   window={k: float(v) for k, v in window.items()}, window_steps=window_steps,
                   window_tokens=window_tokens,
                   scheduler={"name": train_config.schedule, "step": step, "lr": lr},
                   train_config=asdict(train_config), world_size=world_size,
                   model_config=model.cfg.to_dict() if hasattr(model, "cfg") else None, skipped=skipped)

    def restore(self, model, optimizer, data, rank: int = 0, source: str = "<checkpoint>") -> None:
        """Put the weights, optimizer moments, data position and this process's generators back.
        A checkpoint of another model (names or shapes differ) is refused, naming both shapes and
        the config fields that differ."""
        try:
            load_checked(model, self.model, source)
        except ValueError as e:
            own = model.cfg.to_dict() if hasattr(model, "cfg") else {}
            diff = [f"{k}: checkpoint {v!r}, this run {own[k]!r}" for k, v in (self.model_config or {}).items()
                    if k in own and own[k] != v]
            raise ValueError(f"{e}. The checkpoint is of another model" + (f" ({'; '.join(diff)})" if diff else "")
                             + "; resume with the recipe that wrote it, or start afresh in another out_dir") from None
        optimizer.load_state_dict(self.optimizer)
        ranks = self.rng_ranks or []
        set_rng_state(ranks[rank] if rank < len(ranks) else self.rng)
        data.load_state_dict(self.data)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "<checkpoint>") -> TrainState:
        known = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING]
        if missing or d.get("format", FORMAT) != FORMAT:
            raise ValueError(f"{source}: not a training checkpoint of format {FORMAT} (missing {', '.join(missing)})")
        return cls(**{k: v for k, v in d.items() if k in known})


def save_state(directory: str | Path, state: TrainState, keep_last: int = 3) -> Path:
    """Write a TrainState as ckpt-<step>.pt (atomically), keeping the newest `keep_last`."""
    return save_checkpoint(directory, state.step, state.to_dict(), keep_last)


def load_state(path: str | Path) -> TrainState:
    """Read a TrainState written by `save_state`."""
    return TrainState.from_dict(load_checkpoint(path), str(path))


def load_latest_state(directory: str | Path, warn=None) -> tuple[Path, TrainState] | None:
    """The newest checkpoint in `directory` that passes its checksum and reads, as (path, state);
    each bad one on the way is reported in one line through `warn` and skipped. None when the
    folder holds no checkpoint; a ValueError when it holds some but none is usable."""
    found, errors = list_checkpoints(directory), []
    for path in reversed(found):
        try:
            return path, load_state(path)
        except ValueError as e:
            errors.append(str(e))
            if warn is not None:
                warn(f"{e}; falling back to the previous checkpoint")
    if found:
        raise ValueError(f"no usable checkpoint in {directory}: {'; '.join(errors)}. "
                         f"Move them away (or drop train.resume) to start afresh")
    return None
