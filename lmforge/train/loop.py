"""The one training loop, readable top to bottom.

    cfg = TrainConfig(lr=1e-3, max_steps=2000, warmup_steps=100, out_dir="runs/x", ckpt_every=500)
    result = train(model, causal_lm, batches, cfg, eval_batches=val)

Whatever the objective (`(model, batch) -> (loss, metrics)`, see lmforge.objectives), the
loop does the same things: AdamW with weight decay on weight matrices only, a learning-rate
schedule (schedule.py), gradient accumulation and clipping, optional bf16 autocast and
`torch.compile`, data parallelism under torchrun (distributed.py), periodic evaluation,
JSONL metrics (+ TensorBoard when installed), a progress bar, atomic checkpoints that resume
exactly, and a loss plot at the end.

Exact resume: the data stream (`batches`) is restored from its `state_dict()` when it has
one (lmforge.data.batches.Batches does); any other iterator is fast-forwarded by the number
of batches it had given. On CPU in float32 a run stopped and resumed then gives the same
losses and weights, bit for bit, as one that ran straight through.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from lmforge.evaluate import perplexity
from lmforge.nn.layers import RelativeBias
from lmforge.train import checkpoint as ckpt
from lmforge.train import distributed
from lmforge.train.schedule import make_schedule


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; nothing from that step was applied."""

    def __init__(self, step: int, what: str, value: float, checkpoint: Path | None):
        self.step, self.value, self.checkpoint = step, value, checkpoint
        where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written"
        super().__init__(f"training diverged at step {step}: {what} is {value}; the update was not applied "
                         f"and {where}. Lower train.lr, raise train.warmup_steps or set train.grad_clip.")


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
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"TrainConfig.max_minutes={self.max_minutes} must be > 0")


# ---- pieces the loop uses ----------------------------------------------------------------------
def decay_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names that get weight decay, names that do not). nanoGPT's rule, "2+ dims decays", minus
    embedding tables (tokens, positions, relative biases): those never decay. Frozen
    parameters are left out; a tied weight appears once."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, RelativeBias))}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(name)
    return decay, no_decay


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over two groups (decay / no decay); fused kernels on CUDA."""
    params = dict(model.named_parameters())
    decay, no_decay = decay_split(model)
    groups = [{"params": [params[n] for n in decay], "weight_decay": cfg.weight_decay},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _count_tokens(batch: dict, model: nn.Module) -> int:
    """Tokens the model reads: encoder (or decoder) inputs, plus the decoder side of a seq2seq model."""
    n = batch["input_ids"].numel()
    if getattr(getattr(model, "cfg", None), "family", None) == "encoder-decoder":
        dec = batch.get("decoder_input_ids", batch.get("labels"))
        n += dec.numel() if dec is not None else 0
    return n


class _Counted:
    """An iterator that counts what it gives, to fast-forward a stream without `state_dict` on resume."""

    def __init__(self, batches: Iterable):
        self.source, self.it, self.given = batches, iter(batches), 0

    def __next__(self):
        batch = next(self.it)
        self.given += 1
        return batch

    def state_dict(self) -> dict:
        if hasattr(self.source, "state_dict"):
            return {"state": self.source.state_dict(), "given": self.given}
        return {"given": self.given}

    def load_state_dict(self, state: dict) -> None:
        if "state" in state:
            self.source.load_state_dict(state["state"])
        else:
            for _ in range(state["given"]):
                next(self.it)
        self.given = state["given"]


@torch.no_grad()
def evaluate(model: nn.Module, objective: Callable, batches: Iterable[dict], max_batches: int = 0,
             device: torch.device | str = "cpu", dtype: str = "float32") -> dict[str, float]:
    """Mean of the objective's metrics over validation batches, each batch weighted by its
    number of targets (labels != -100; else its rows), named valid_<metric>, plus
    valid_perplexity = exp(valid_nll)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sums, n = {}, 0.0
    d = distributed.from_env() if torch.distributed.is_initialized() else distributed.Dist()
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        if i % d.world != d.rank:  # under torchrun each process evaluates its share
            continue
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            _, metrics = objective(model, _to(batch, device))
        labels = batch.get("labels")
        w = float((labels != -100).sum()) if labels is not None and labels.dim() == 2 \
            else float(batch["input_ids"].shape[0])
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * w
        n += w
    model.train(was_training)
    if d.enabled:  # sums over every process; a metric some process lacks counts as 0 there
        names = sorted(set().union(*distributed.gather_objects(sorted(sums))))
        *values, n = distributed.sum_all([sums.get(k, 0.0) for k in names] + [n], device)
        sums = dict(zip(names, values))
    if n == 0:
        raise ValueError("evaluate: no validation batches")
    out = {f"valid_{k}": v / n for k, v in sums.items()}
    nll = out.get("valid_nll", out.get("valid_loss"))
    if nll is not None and math.isfinite(nll):
        out["valid_perplexity"] = perplexity(nll)
    return out


class _Log:
    """Metrics records to out_dir/log.jsonl, TensorBoard (if installed) and memory."""

    def __init__(self, out_dir: Path | None, keep_until: int | None):
        self.records: list[dict] = []
        self.path = out_dir / "log.jsonl" if out_dir else None
        self.tb = None
        if self.path is None:
            return
        if keep_until is not None and self.path.is_file():  # resuming: drop what came after the checkpoint
            old = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.records = [r for r in old if r.get("step", 0) <= keep_until]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_losses(records: list[dict], path: Path) -> Path:
    """Train (and validation) loss against step, as a PNG (matplotlib's Agg canvas, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train_pts = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid_pts = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
    if train_pts:
        ax.plot(*zip(*train_pts), label="train loss", lw=1)
    if valid_pts:
        ax.plot(*zip(*valid_pts), "o-", label="validation loss", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# ---- the loop --------------------------------------------------------------------------------------
def train(model: nn.Module, objective: Callable, batches: Iterable[dict], cfg: TrainConfig,
          eval_batches: Iterable[dict] | Callable[[], Iterable[dict]] | None = None) -> dict:
    """Train `model` in place on `batches` (an endless iterable of batch dicts) until
    `cfg.max_steps` updates or `cfg.max_minutes`, whichever comes first.

    eval_batches: validation batches (a list, re-read at each evaluation, or a function that
    returns fresh ones). Returns {steps, tokens, seconds, tokens_per_s, train_loss, valid_loss,
    valid_perplexity, other valid_* metrics, stopped, checkpoint, log, plot}.
    Raises TrainingDiverged on a NaN/inf loss or gradient norm, before applying that update.
    """
    if (cfg.ckpt_every or cfg.resume) and not cfg.out_dir:
        raise ValueError("TrainConfig.ckpt_every and resume need out_dir (where checkpoints are written)")
    d, device = distributed.setup(cfg.device)  # under torchrun: this process's rank and device
    torch.manual_seed(cfg.seed + d.rank)  # dropout differs between processes; batch streams have their own
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    out = Path(cfg.out_dir) if cfg.out_dir else None
    ckpt_dir = out / "checkpoints" if out else None
    model.to(device).train()
    optimizer = make_optimizer(model, cfg, device)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    d_model = getattr(getattr(model, "cfg", None), "d_model", None)
    lr_at = make_schedule(cfg.schedule, cfg.lr, cfg.warmup_steps, cfg.decay_steps or cfg.max_steps,
                          cfg.min_lr, d_model)
    data = _Counted(distributed.Strided(batches, d.rank, d.world) if d.enabled else batches)
    get_eval = eval_batches if callable(eval_batches) else (lambda: eval_batches)

    # resume: model, optimizer, RNGs, data position and counters from the newest checkpoint
    step, tokens, elapsed_before, last_ckpt = 0, 0, 0.0, None
    window, window_steps, window_tokens = {}, 0, 0  # metric sums since the last log record
    if cfg.resume and ckpt_dir is not None and (last_ckpt := ckpt.latest_checkpoint(ckpt_dir)) is not None:
        state = ckpt.load_checkpoint(last_ckpt)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ranks = state.get("rng_ranks") or []
        ckpt.set_rng_state(ranks[d.rank] if d.rank < len(ranks) else state["rng"])
        data.load_state_dict(state["data"])
        step, tokens, elapsed_before = state["step"], state["tokens"], state["elapsed"]
        window, window_steps, window_tokens = state["window"], state["window_steps"], state["window_tokens"]
    log = _Log(out if d.main else None, keep_until=step if last_ckpt is not None else None)
    # a fresh run replaces an earlier run's checkpoints in out_dir (when it writes its first one)
    stale = [] if last_ckpt is not None or ckpt_dir is None or not d.main else ckpt.list_checkpoints(ckpt_dir)

    def checkpoint() -> Path:
        """Every process calls it (their RNG states are gathered); rank 0 writes the file."""
        rngs = distributed.gather_objects(ckpt.rng_state())
        if not d.main:
            return ckpt.checkpoint_path(ckpt_dir, step)
        while stale:
            stale.pop().unlink(missing_ok=True)
        state = {"format": 1, "step": step, "tokens": tokens, "elapsed": elapsed(),
                 "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": {"name": cfg.schedule, "step": step, "lr": lr_at(step)},
                 "rng": rngs[0], "rng_ranks": rngs if d.enabled else None, "data": data.state_dict(),
                 "train_config": asdict(cfg), "world_size": d.world,
                 "window": {k: float(v) for k, v in window.items()}, "window_steps": window_steps,
                 "window_tokens": window_tokens,
                 "model_config": model.cfg.to_dict() if hasattr(model, "cfg") else None}
        return ckpt.save_checkpoint(ckpt_dir, step, state, cfg.keep_last)

    def run_eval() -> dict:
        metrics = evaluate(model, objective, get_eval(), cfg.eval_batches, device, cfg.dtype)
        log.write({"step": step, **metrics})
        return metrics

    # find_unused_parameters: a task may leave parameters without gradient (BERT's pooler when
    # training embeddings); it also allows objectives that call the model twice (sentence pairs)
    ddp = _DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True) \
        if d.enabled else None
    fwd = ddp if ddp is not None else model
    fwd = torch.compile(fwd) if cfg.compile else fwd
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    start = time.perf_counter()
    elapsed = lambda: elapsed_before + time.perf_counter() - start  # noqa: E731
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (cfg.progress and d.main), unit="step",
               dynamic_ncols=True)
    window_t0 = time.perf_counter()
    last_train, valid, stopped, evaluated_at = {}, {}, "max_steps", None
    try:
        while step < cfg.max_steps:
            if cfg.max_minutes is not None and distributed.any_all(elapsed() >= cfg.max_minutes * 60, device):
                stopped = "max_minutes"
                break
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # forward/backward over grad_accum batches; the loss is averaged like one big batch
            try:
                micro = [_to(next(data), device) for _ in range(cfg.grad_accum)]
            except StopIteration:
                stopped = "data"
                break
            step_tokens, bad_loss = 0, None
            for i, batch in enumerate(micro):
                # DDP averages gradients over processes at the last micro-batch's backward only
                sync = ddp.no_sync() if ddp is not None and i < len(micro) - 1 else contextlib.nullcontext()
                with sync:
                    with autocast:
                        loss, metrics = objective(fwd, batch)
                    if not torch.isfinite(loss):
                        if not d.enabled:
                            raise TrainingDiverged(step + 1, "the loss", loss.item(), last_ckpt)
                        bad_loss = loss.item()  # raised below in every process at once
                    (loss / cfg.grad_accum).backward()
                for k, v in metrics.items():
                    window[k] = window.get(k, 0.0) + v.detach() / cfg.grad_accum
                step_tokens += _count_tokens(batch, model)
            if d.enabled:  # tokens of every process; a diverged loss anywhere stops every process
                bad, step_tokens = distributed.sum_all([bad_loss is not None, step_tokens], device)
                step_tokens = int(step_tokens)
                if bad:
                    raise TrainingDiverged(step + 1, "the loss", bad_loss if bad_loss is not None else math.nan,
                                           last_ckpt)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            if not torch.isfinite(norm):
                raise TrainingDiverged(step + 1, "the gradient norm", norm.item(), last_ckpt)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_steps += 1
            tokens += step_tokens
            window_tokens += step_tokens
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                dt = time.perf_counter() - window_t0
                last_train = _mean_over_processes(window, window_steps, d, device)
                record = {"step": step, **last_train, "lr": lr, "grad_norm": float(norm),
                          "tokens": tokens, "tokens_per_s": window_tokens / dt if dt > 0 else 0.0,
                          "elapsed": round(elapsed(), 3)}
                log.write(record)
                bar.set_postfix(loss=f"{last_train.get('loss', float('nan')):.4f}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                window, window_steps, window_tokens, window_t0 = {}, 0, 0, time.perf_counter()
            if eval_batches is not None and cfg.eval_every and step % cfg.eval_every == 0:
                t = time.perf_counter()
                valid, evaluated_at = run_eval(), step
                bar.set_postfix(loss=f"{last_train.get('loss', float('nan')):.4f}",
                                val=f"{valid['valid_loss']:.4f}")
                window_t0 += time.perf_counter() - t  # evaluation time is not training throughput
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                t = time.perf_counter()
                last_ckpt = checkpoint()
                window_t0 += time.perf_counter() - t  # nor is checkpointing
        if window_steps:  # steps since the last log record
            last_train = _mean_over_processes(window, window_steps, d, device)
            log.write({"step": step, **last_train, "tokens": tokens, "elapsed": round(elapsed(), 3)})
        if eval_batches is not None and evaluated_at != step:
            valid = run_eval()
        if cfg.ckpt_every and (last_ckpt is None or _ckpt_step(last_ckpt) != step):
            last_ckpt = checkpoint()
    finally:
        bar.close()
        log.close()
    distributed.barrier()  # every process returns once rank 0 has written its files
    seconds = elapsed()
    plot = plot_losses(log.records, out / "loss.png") if out and d.main else None
    return {"steps": step, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "train_loss": last_train.get("loss"), **valid, "stopped": stopped,
            "checkpoint": str(last_ckpt) if last_ckpt else None,
            "log": str(log.path) if log.path else None, "plot": str(plot) if plot else None}


def _mean_over_processes(window: dict, steps: int, d: distributed.Dist, device: torch.device) -> dict:
    """Metric sums of the last `steps` steps → means (over every process under torchrun)."""
    names = sorted(window)
    values = [float(window[k]) / steps for k in names]
    if d.enabled:
        values = [v / d.world for v in distributed.sum_all(values, device)]
    return dict(zip(names, values))


class _DDP(torch.nn.parallel.DistributedDataParallel):
    """DDP that still shows the model's config (objectives read `model.cfg`)."""

    @property
    def cfg(self):
        return self.module.cfg


def _ckpt_step(path: Path) -> int:
    return int(path.stem.split("-")[1])

