"""The one training loop, readable top to bottom.

    cfg = TrainConfig(lr=1e-3, max_steps=2000, warmup_steps=100, out_dir="runs/x", ckpt_every=500)
    result = train(model, causal_lm, batches, cfg, eval_batches=val)

Whatever the objective (`(model, batch) -> (loss, metrics)`, see lmforge.objectives), the
loop does the same things: AdamW with weight decay on weight matrices only, a learning-rate
schedule (schedule.py), gradient accumulation and clipping, optional bf16 autocast and
`torch.compile`, data parallelism under torchrun (distributed.py), periodic evaluation,
JSONL metrics (+ TensorBoard when installed; log.py), progress (a bar on a terminal, plain
lines elsewhere), checksummed checkpoints that resume exactly (checkpoint.TrainState), a policy
for a NaN/inf loss or gradient (`on_nonfinite`: stop, or skip the update and count it), a final
checkpoint and a clean exit on SIGINT/SIGTERM (signals.py), and a loss plot at the end. It
tells its user the parameter count before the first step and, on resume,
which checkpoint it continued from.

Exact resume: the data stream (`batches`) is restored from its `state_dict()` when it has
one (lmforge.data.batches.Batches does); any other iterator is fast-forwarded by the number
of batches it had given. On CPU in float32 a run stopped and resumed then gives the same
losses and weights, bit for bit, as one that ran straight through.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from lmforge.data.noising import IGNORE_INDEX
from lmforge.evaluate import perplexity
from lmforge.progress import Progress, say
from lmforge.train import checkpoint as ckpt
from lmforge.train import distributed
from lmforge.train.config import TrainConfig, TrainingDiverged, TrainingInterrupted
from lmforge.train.log import MetricsLog, plot_losses
from lmforge.train.memory import keep_freed_memory
from lmforge.train.schedule import make_schedule
from lmforge.train.signals import StopSignals

MAX_SKIPS_IN_A_ROW = 10  # on_nonfinite=skip: more than this many bad steps in a row is divergence


# ---- pieces the loop uses ----------------------------------------------------------------------
def decay_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names that get weight decay, names that do not). nanoGPT's rule, "2+ dims decays", minus
    embedding tables: those never decay, nor do the weights of a module that says
    `no_weight_decay = True` (a table in disguise, such as T5's relative-position bias). Frozen
    parameters are left out; a tied weight appears once."""
    embeddings = {id(m.weight) for m in model.modules()
                  if isinstance(m, nn.Embedding) or getattr(m, "no_weight_decay", False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(name)
    return decay, no_decay


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over two groups (decay / no decay), fused (one kernel over all parameters) on CPU and
    CUDA: on a 2-core CPU a step over 14M parameters takes ~10 ms fused against ~38 ms with
    torch's default per-operation (foreach) one."""
    params = dict(model.named_parameters())
    decay, no_decay = decay_split(model)
    groups = [{"params": [params[n] for n in decay], "weight_decay": cfg.weight_decay},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}  # torch >= 2.4 has both kernels
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
    number of targets (labels != IGNORE_INDEX; else its rows), named valid_<metric>, plus
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
        w = float((labels != IGNORE_INDEX).sum()) if labels is not None and labels.dim() == 2 \
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


# ---- the loop --------------------------------------------------------------------------------------
def train(model: nn.Module, objective: Callable, batches: Iterable[dict], cfg: TrainConfig,
          eval_batches: Iterable[dict] | Callable[[], Iterable[dict]] | None = None) -> dict:
    """Train `model` in place on `batches` (an endless iterable of batch dicts) until
    `cfg.max_steps` updates or `cfg.max_minutes`, whichever comes first. With a time budget the
    decaying schedules (cosine, linear) are stretched over it: a run the budget stops early still
    ends its schedule (at min_lr) rather than being cut off halfway.

    eval_batches: validation batches (a list, re-read at each evaluation, or a function that
    returns fresh ones). Returns {steps, tokens, seconds, tokens_per_s, parameters, train_loss,
    first_train_loss, valid_loss, first_valid_loss, valid_perplexity, other valid_* metrics,
    stopped ("max_steps", "max_minutes" or "data"), resumed_from, resumed_step, skipped_steps,
    checkpoint, log, plot}.
    A NaN/inf loss or gradient norm raises TrainingDiverged before that update is applied
    (cfg.on_nonfinite="stop"), or the update is skipped and counted ("skip"). SIGINT or SIGTERM
    ends the current step, saves a checkpoint and raises TrainingInterrupted (a SystemExit).
    """
    if (cfg.ckpt_every or cfg.resume) and not cfg.out_dir:
        raise ValueError("TrainConfig.ckpt_every and resume need out_dir (where checkpoints are written)")
    d, device = distributed.setup(cfg.device)  # under torchrun: this process's rank and device
    if device.type == "cpu":
        keep_freed_memory()  # no page faults for each step's fresh buffers (memory.py)
    torch.manual_seed(cfg.seed + d.rank)  # dropout differs between processes; batch streams have their own
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    out = Path(cfg.out_dir) if cfg.out_dir else None
    ckpt_dir = out / "checkpoints" if out else None
    talk = cfg.progress and d.main
    model.to(device).train()
    optimizer = make_optimizer(model, cfg, device)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    d_model = getattr(getattr(model, "cfg", None), "d_model", None)
    horizon = cfg.decay_steps or cfg.max_steps
    lr_at = make_schedule(cfg.schedule, cfg.lr, cfg.warmup_steps, horizon, cfg.min_lr, d_model)
    data = _Counted(distributed.Strided(batches, d.rank, d.world) if d.enabled else batches)
    get_eval = eval_batches if callable(eval_batches) else (lambda: eval_batches)
    n_params = sum(p.numel() for p in model.parameters())
    if talk:
        budget = f" or {cfg.max_minutes:g} minutes" if cfg.max_minutes is not None else ""
        say(f"model: {n_params:,} parameters ({sum(p.numel() for p in params):,} trained); "
            f"training for {cfg.max_steps} steps{budget} on {device}")

    # resume: model, optimizer, RNGs, data position and counters from the newest checkpoint
    step, tokens, elapsed_before, last_ckpt, skipped = 0, 0, 0.0, None, 0
    window, window_steps, window_tokens = {}, 0, 0  # metric sums since the last log record
    # the newest checkpoint that passes its checksum; a bad one is named and the one before used
    found = ckpt.load_latest_state(ckpt_dir, say if talk else None) if cfg.resume and ckpt_dir is not None else None
    if found is not None:
        last_ckpt, state = found
        state.restore(model, optimizer, data, d.rank, str(last_ckpt))
        step, tokens, elapsed_before, skipped = state.step, state.tokens, state.elapsed, state.skipped
        window, window_steps, window_tokens = state.window, state.window_steps, state.window_tokens
        if talk:
            say(f"resumed from {last_ckpt}: step {step} of {cfg.max_steps}, "
                f"{elapsed_before / 60:.1f} minutes of training done")
    elif cfg.resume and talk:
        say(f"nothing to resume in {ckpt_dir}: starting from step 0")
    resumed_from, resumed_step = (str(last_ckpt), step) if last_ckpt is not None else (None, None)
    log = MetricsLog(out if d.main else None, keep_until=step if last_ckpt is not None else None)
    # a fresh run replaces an earlier run's checkpoints in out_dir (when it writes its first one)
    stale = [] if last_ckpt is not None or ckpt_dir is None or not d.main else ckpt.list_checkpoints(ckpt_dir)

    def checkpoint() -> Path:
        """Every process calls it (their RNG states are gathered); rank 0 writes the file."""
        rngs = distributed.gather_objects(ckpt.rng_state())
        if not d.main:
            return ckpt.checkpoint_path(ckpt_dir, step)
        while stale:
            ckpt.remove_checkpoint(stale.pop())
        state = ckpt.TrainState.capture(model, optimizer, data, step=step, tokens=tokens, elapsed=elapsed(),
                                        rngs=rngs, window=window, window_steps=window_steps,
                                        window_tokens=window_tokens, train_config=cfg, lr=lr_at(step),
                                        world_size=d.world, skipped=skipped)
        return ckpt.save_state(ckpt_dir, state, cfg.keep_last)

    def run_eval() -> dict:
        metrics = evaluate(model, objective, get_eval(), cfg.eval_batches, device, cfg.dtype)
        log.write({"step": step, **metrics})
        return metrics

    def schedule_step() -> float:
        """The step the schedule reads: the update count or, under a time budget, the share of the
        budget used times the schedule's length, whichever is further. A run the budget stops
        before max_steps thus goes through the whole schedule (warmup included) in its time."""
        if cfg.max_minutes is None or cfg.schedule not in ("cosine", "linear"):
            return step
        used = min(1.0, elapsed() / (cfg.max_minutes * 60))
        if d.enabled:  # every process must use the same learning rate
            used = distributed.sum_all([used], device)[0] / d.world
        return max(step, used * horizon)

    # find_unused_parameters: a task may leave parameters without gradient (BERT's pooler when
    # training embeddings); it also allows objectives that call the model twice (sentence pairs)
    ddp = _DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True) \
        if d.enabled else None
    fwd = ddp if ddp is not None else model
    fwd = torch.compile(fwd) if cfg.compile else fwd
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    start = time.perf_counter()
    elapsed = lambda: elapsed_before + time.perf_counter() - start  # noqa: E731
    # off a terminal, about 20 plain progress lines per run, each at a log record
    every = cfg.log_every * max(1, math.ceil(cfg.max_steps / 20 / cfg.log_every))
    bar = Progress(cfg.max_steps, "training", "step", every=every, initial=step, disable=not talk)
    window_t0 = time.perf_counter()
    last_train, valid, stopped, evaluated_at, in_a_row, norm = {}, {}, "max_steps", None, 0, None
    signals = StopSignals()
    try:
        signals.__enter__()
        while step < cfg.max_steps:
            if distributed.any_all(signals.received is not None, device) if d.enabled else signals.received:
                raise _interrupted(signals, step, d, checkpoint if ckpt_dir is not None else None, last_ckpt)
            if cfg.max_minutes is not None and distributed.any_all(elapsed() >= cfg.max_minutes * 60, device):
                stopped = "max_minutes"
                break
            lr = lr_at(schedule_step())
            for group in optimizer.param_groups:
                group["lr"] = lr
            # forward/backward over grad_accum batches; the loss is averaged like one big batch
            try:
                micro = [_to(next(data), device) for _ in range(cfg.grad_accum)]
            except StopIteration:
                stopped = "data"
                break
            step_tokens, bad, pending = 0, None, []  # bad: (what, value) when something is NaN/inf
            for i, batch in enumerate(micro):
                # DDP averages gradients over processes at the last micro-batch's backward only
                sync = ddp.no_sync() if ddp is not None and i < len(micro) - 1 else contextlib.nullcontext()
                with sync:
                    with autocast:
                        loss, metrics = objective(fwd, batch)
                    if bad is None and not torch.isfinite(loss):
                        bad = ("the loss", loss.item())
                        if not d.enabled and cfg.on_nonfinite == "stop":
                            raise TrainingDiverged(step + 1, *bad, last_ckpt)
                    (loss / cfg.grad_accum).backward()  # under DDP every process must take part
                pending += [(k, v.detach() / cfg.grad_accum) for k, v in metrics.items()]
                step_tokens += _count_tokens(batch, model)
            if d.enabled:  # tokens of every process; a diverged loss anywhere is one everywhere
                n_bad, step_tokens = distributed.sum_all([bad is not None, step_tokens], device)
                step_tokens = int(step_tokens)
                bad = bad or (("the loss", math.nan) if n_bad else None)
            if bad is None:
                total = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                if torch.isfinite(total):
                    norm = total  # the norm logged: that of the last update applied
                else:
                    bad = ("the gradient norm", total.item())
            if bad is not None and cfg.on_nonfinite == "stop":
                raise TrainingDiverged(step + 1, *bad, last_ckpt)
            if bad is not None:  # skip: no update, no metrics; the step and its data are used up
                skipped, in_a_row = skipped + 1, in_a_row + 1
                if in_a_row > MAX_SKIPS_IN_A_ROW:
                    raise TrainingDiverged(step + 1, f"{bad[0]} (for {in_a_row} steps in a row)", bad[1], last_ckpt)
                if talk:
                    say(f"step {step + 1}: {bad[0]} is {bad[1]}; update skipped ({skipped} so far)")
            else:
                optimizer.step()
                in_a_row = 0
                for k, v in pending:
                    window[k] = window.get(k, 0.0) + v
                window_steps += 1
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += step_tokens
            window_tokens += step_tokens

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                dt = time.perf_counter() - window_t0
                last_train = _mean_over_processes(window, window_steps, d, device)
                record = {"step": step, **last_train, "lr": lr,
                          **({"grad_norm": float(norm)} if norm is not None else {}),
                          **({"skipped_steps": skipped} if skipped else {}),
                          "tokens": tokens, "tokens_per_s": window_tokens / dt if dt > 0 else 0.0,
                          "elapsed": round(elapsed(), 3)}
                log.write(record)
                bar.set_postfix(loss=f"{last_train.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                window, window_steps, window_tokens, window_t0 = {}, 0, 0, time.perf_counter()
            if eval_batches is not None and cfg.eval_every and step % cfg.eval_every == 0:
                t = time.perf_counter()
                valid, evaluated_at = run_eval(), step
                bar.set_postfix(**bar.postfix, val=f"{valid['valid_loss']:.4f}")
                window_t0 += time.perf_counter() - t  # evaluation time is not training throughput
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                t = time.perf_counter()
                last_ckpt = checkpoint()
                window_t0 += time.perf_counter() - t  # nor is checkpointing
            bar.update(1)
        if window_steps and step != resumed_step:  # steps since the last log record (not logged yet)
            last_train = _mean_over_processes(window, window_steps, d, device)
            log.write({"step": step, **last_train, "tokens": tokens, "elapsed": round(elapsed(), 3)})
        if eval_batches is not None and evaluated_at != step:
            valid = run_eval()
        if cfg.ckpt_every and (last_ckpt is None or _ckpt_step(last_ckpt) != step):
            last_ckpt = checkpoint()
    finally:
        signals.__exit__()
        bar.close()
        log.close()
    distributed.barrier()  # every process returns once rank 0 has written its files
    seconds = elapsed()
    plot = plot_losses(log.records, out / "loss.png") if out and d.main else None
    train_losses = [r["loss"] for r in log.records if "loss" in r]
    valid_losses = [r["valid_loss"] for r in log.records if "valid_loss" in r]
    return {"steps": step, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0, "parameters": n_params,
            "train_loss": last_train.get("loss", train_losses[-1] if train_losses else None),
            "first_train_loss": train_losses[0] if train_losses else None,
            "first_valid_loss": valid_losses[0] if valid_losses else None, **valid, "stopped": stopped,
            "resumed_from": resumed_from, "resumed_step": resumed_step, "skipped_steps": skipped,
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


def _interrupted(signals: StopSignals, step: int, d: distributed.Dist, checkpoint: Callable | None,
                 last_ckpt: Path | None) -> TrainingInterrupted:
    """After SIGINT/SIGTERM between two steps: save a checkpoint of this step (unless there is one),
    say so, and the exception that ends the run."""
    if checkpoint is not None and (last_ckpt is None or _ckpt_step(last_ckpt) != step):
        last_ckpt = checkpoint()
    name = signals.received or "SIGTERM"  # under torchrun another process may have been signalled
    stop = TrainingInterrupted(name, signals.signum or 15, step, last_ckpt if checkpoint is not None else None)
    if d.main:
        say(stop.message)
    return stop


def _ckpt_step(path: Path) -> int:
    return int(path.stem.split("-")[1])

