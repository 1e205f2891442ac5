"""The training loop's settings (`TrainConfig`) and how it stops early (`TrainingDiverged`, `TrainingInterrupted`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; nothing from that step was applied."""

    def __init__(self, step: int, what: str, value: float, checkpoint: Path | None):
        self.step, self.value, self.checkpoint = step, value, checkpoint
        where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written"
        super().__init__(f"training diverged at step {step}: {what} is {value}; the update was not applied "
                         f"and {where}. Lower train.lr, raise train.warmup_steps or set train.grad_clip.")


class TrainingInterrupted(SystemExit):
    """SIGINT or SIGTERM arrived: the loop finished its step, saved a checkpoint (when it has an
    out_dir) and stops. A SystemExit, so an uncaught one ends the program quietly with the shell's
    code for the signal (130 for SIGINT, 143 for SIGTERM); the loop has already said why."""

    def __init__(self, signal_name: str, signum: int, step: int, checkpoint: Path | None):
        super().__init__(128 + signum)
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        saved = (f"saved {checkpoint}; continue with train.resume=true" if checkpoint
                 else "no checkpoint was saved (no out_dir)")
        self.message = f"stopped by {signal_name} at step {step}: {saved}"

    def __str__(self) -> str:
        return self.message


@dataclass
class TrainConfig:
    """Every knob of the loop. Steps count optimizer updates; each takes `grad_accum` batches."""

    # optimisation
    lr: float = 3e-4  # peak learning rate; for schedule "noam" the paper's factor (1.0 there)
    schedule: Literal["cosine", "linear", "constant", "noam"] = "cosine"
    warmup_steps: int = 0
    decay_steps: int | None = None  # cosine/linear reach min_lr here; None → max_steps
    min_lr: float = 0.0
    weight_decay: float = 0.1  # on weight matrices only (not biases, norms, embeddings)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    # a NaN/inf loss or gradient norm: "stop" raises TrainingDiverged (the last checkpoint is kept);
    # "skip" drops that update (counted in the log and the result), stopping after 10 in a row
    on_nonfinite: Literal["stop", "skip"] = "stop"
    batch_size: int = 32  # sequences per batch: read by whoever builds the batches
    grad_accum: int = 1  # batches per update
    # how long
    max_steps: int = 1000
    max_minutes: float | None = None  # wall-clock budget (a resumed run counts its earlier time); whichever first
    # runtime
    device: str = "auto"  # "auto" → cuda when available, else cpu
    dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: autocast, weights stay float32
    compile: bool = False  # torch.compile the model for the forward/backward
    seed: int = 0
    # evaluation, logging, checkpoints
    eval_every: int = 0  # steps between evaluations; 0 → only at the end
    eval_batches: int = 0  # at most this many validation batches per evaluation; 0 → all given
    log_every: int = 10
    ckpt_every: int = 0  # steps between checkpoints (needs out_dir); 0 → none
    keep_last: int = 3
    out_dir: str | None = None  # log.jsonl, loss.png, checkpoints/ go here; None → no files
    resume: bool = False  # continue from the newest checkpoint in out_dir/checkpoints
    progress: bool = True  # tqdm progress bar

    def __post_init__(self):
        for name in ("lr", "max_steps", "batch_size", "grad_accum", "log_every", "keep_last"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be > 0")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "eval_every", "eval_batches", "ckpt_every",
                     "min_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 0")
        if self.schedule not in ("cosine", "linear", "constant", "noam"):
            raise ValueError(f"TrainConfig.schedule={self.schedule!r}; expected cosine, linear, constant or noam")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"TrainConfig.dtype={self.dtype!r}; expected 'float32' or 'bfloat16'")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"TrainConfig.on_nonfinite={self.on_nonfinite!r}; expected 'stop' or 'skip'")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"TrainConfig.max_minutes={self.max_minutes} must be > 0")
