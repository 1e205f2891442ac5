"""Data-parallel training over processes started by torchrun (torch.distributed + DDP).

    torchrun --nproc_per_node=4 --no-python lmforge pretrain --config configs/main.yaml

Every process builds the same model and reads the same batch stream; process r of W trains
on batches r, r+W, r+2W, ... (`Strided`), DDP averages the gradients, so one update sees W
batches, like one process with grad_accum=W. Rank 0 alone writes logs, checkpoints and the
final model. Without torchrun (no RANK/WORLD_SIZE in the environment) nothing changes.
Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def from_env() -> Dist:
    """Rank, world size and local rank as torchrun sets them (one process when unset)."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers (as torchrun sets them): {e}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return Dist(rank, world, local)


def setup(device: str = "auto") -> tuple[Dist, torch.device]:
    """Join the process group when started by torchrun (once per process); return the ranks
    and this process's device ("auto": CUDA when available, else the CPU; under torchrun a
    CUDA device becomes cuda:LOCAL_RANK)."""
    d = from_env()
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if not d.enabled:
        return d, dev
    if dev.type == "cuda":
        dev = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return d, dev


def is_main() -> bool:
    """True in rank 0 (or without torchrun): the process that writes files and prints."""
    return from_env().main


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first(d: Dist):
    """Rank 0 runs the block first (e.g. builds the data caches); the others wait, then run it
    (and find the caches)."""
    if d.enabled and not d.main:
        dist.barrier()
    yield
    if d.enabled and d.main:
        dist.barrier()


def sum_all(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over every process (itself when alone)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_all(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true in any process: a decision every process then takes together."""
    return sum_all([float(flag)], device)[0] > 0


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] in every process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class Strided:
    """Batches r, r+W, r+2W, ... of a stream every process reads in full; the stream's
    position (`state_dict`) is then the same in every process."""

    def __init__(self, batches: Iterable, rank: int, world: int):
        self.source, self.it, self.rank, self.world = batches, iter(batches), rank, world

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        group = [next(self.it) for _ in range(self.world)]  # StopIteration ends every process together
        return group[self.rank]

    def __getattr__(self, name):  # state_dict / load_state_dict of the source, when it has them
        if name in ("state_dict", "load_state_dict"):
            return getattr(self.source, name)
        raise AttributeError(name)
