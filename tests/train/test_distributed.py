"""Data-parallel training (torchrun's environment, gloo on CPU): two processes equal one process
with the same batches per update; rank 0 alone writes files; a resumed run continues exactly."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from lmforge.config import ModelConfig
from lmforge.data.batches import lm_batches
from lmforge.models.heads import Model
from lmforge.objectives import causal_lm
from lmforge.train import distributed
from lmforge.train.loop import TrainConfig, train

TOKENS = np.random.default_rng(0).integers(0, 64, 4000).astype(np.int64)


def _model() -> Model:
    torch.manual_seed(0)
    return Model(ModelConfig.preset("gpt-tiny", vocab_size=64, d_model=32, n_heads=2, d_ff=64, max_len=32,
                                    dropout=0.0))


def _cfg(out_dir, **kw) -> TrainConfig:
    base = dict(lr=3e-3, max_steps=6, warmup_steps=2, batch_size=4, log_every=2, eval_every=3, progress=False,
                out_dir=str(out_dir), ckpt_every=3, keep_last=5)
    return TrainConfig(**{**base, **kw})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, max_steps: int, resume: bool) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model = _model()
    valid = lm_batches(TOKENS, 16, 4, seed=99).take(3)
    result = train(model, causal_lm, lm_batches(TOKENS, 16, 4, seed=1),
                   _cfg(out_dir, device="cpu", max_steps=max_steps, resume=resume), eval_batches=valid)
    torch.save({"result": result, "weights": model.state_dict()}, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _run_two(out_dir: Path, max_steps: int = 6, resume: bool = False) -> list[dict]:
    mp.start_processes(_worker, args=(2, _free_port(), str(out_dir), max_steps, resume), nprocs=2,
                       start_method="spawn")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    return _run_two(tmp_path_factory.mktemp("ddp"))


def test_two_processes_equal_one_with_their_batches_accumulated(two_processes, tmp_path):
    torch.set_num_threads(1)
    single = _model()
    valid = lm_batches(TOKENS, 16, 4, seed=99).take(3)
    # one process, two batches per update: batches 2k and 2k+1, what ranks 0 and 1 read at update k
    ref = train(single, causal_lm, lm_batches(TOKENS, 16, 4, seed=1),
                _cfg(tmp_path, device="cpu", grad_accum=2), eval_batches=valid)
    r0, r1 = two_processes
    for k, w in single.state_dict().items():
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k  # the processes stay identical
        assert torch.allclose(r0["weights"][k], w, atol=1e-5), k
    assert r0["result"]["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-5)
    assert r0["result"]["valid_loss"] == pytest.approx(ref["valid_loss"], abs=1e-5)  # evaluation is sharded
    assert r1["result"]["valid_loss"] == pytest.approx(ref["valid_loss"], abs=1e-5)
    assert r0["result"]["tokens"] == ref["tokens"]  # tokens of both processes


def test_rank_zero_alone_writes_and_a_resumed_run_continues_exactly(two_processes, tmp_path):
    run = tmp_path / "run"
    _run_two(run, max_steps=3)  # stop at step 3 (a checkpoint) ...
    resumed = _run_two(run, max_steps=6, resume=True)  # ... and go on to 6
    straight = two_processes
    for k, w in straight[0]["weights"].items():
        assert torch.equal(resumed[0]["weights"][k], w), k
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    # one writer, no duplicate records (3: the stopped run's last, partial window)
    assert [r["step"] for r in records if "loss" in r] == [2, 3, 4, 6]
    state = torch.load(run / "checkpoints" / "ckpt-00000006.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2


def _pair_batches():
    g = torch.Generator().manual_seed(0)
    while True:
        yield {"input_ids": torch.randint(5, 60, (4, 8), generator=g), "attention_mask": torch.ones(4, 8, dtype=torch.long),
               "b_ids": torch.randint(5, 60, (4, 8), generator=g), "b_mask": torch.ones(4, 8, dtype=torch.long)}


def _encoder() -> Model:  # BERT-like with its pooler, which embeddings do not use: a parameter without gradient
    torch.manual_seed(0)
    return Model(ModelConfig.preset("bert-tiny", vocab_size=64, d_model=32, n_heads=2, d_ff=64, max_len=32,
                                    task="embed", dropout=0.0))


def _pair_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from lmforge.tasks.pairs import contrastive
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model = _encoder()
    train(model, contrastive, _pair_batches(), TrainConfig(max_steps=3, grad_accum=2, progress=False, device="cpu"))
    if rank == 0:
        torch.save(model.state_dict(), Path(out_dir) / "weights.pt")
    torch.distributed.destroy_process_group()


def test_two_forwards_unused_parameters_and_accumulation(tmp_path):
    """Contrastive embedding training (two forward passes per batch, an unused pooler) with
    grad_accum=2 on two processes equals one process with grad_accum=4."""
    from lmforge.tasks.pairs import contrastive
    mp.start_processes(_pair_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    torch.set_num_threads(1)
    single = _encoder()
    train(single, contrastive, _pair_batches(), TrainConfig(max_steps=3, grad_accum=4, progress=False, device="cpu"))
    got = torch.load(tmp_path / "weights.pt")
    for k, w in single.state_dict().items():
        assert torch.allclose(got[k], w, atol=1e-5), k


def test_strided_streams_split_the_batches_and_keep_one_position():
    parts = [distributed.Strided(iter(range(10)), r, 3) for r in range(3)]
    assert [list(p) for p in parts] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]  # 9 is no full group: all stop


def test_torchrun_environment_is_checked(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK=2"):
        distributed.from_env()


def test_torchrun_pretrain_cli(tmp_path):
    """The README's command: torchrun over the CLI, two CPU processes."""
    cfg = Path(__file__).resolve().parents[2] / "configs" / "gpt-tiny.yaml"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "lmforge.cli", "pretrain", "--config", str(cfg), f"out_dir={tmp_path}", "train.max_steps=4",
           "train.device=cpu", "--no-samples"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert p.stdout.count("saved model and tokenizer") == 1  # rank 0 prints
