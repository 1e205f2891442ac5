"""Crash-safe training: SIGKILL at random moments (one mid-write) and resume gives the weights of an
uninterrupted run bit for bit; SIGINT/SIGTERM save and exit cleanly; bad checkpoints are named and
skipped; a full disk keeps the old checkpoint; NaN/inf is stopped on or skipped and counted."""

import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from lmforge.data.batches import lm_batches
from lmforge.objectives import causal_lm
from lmforge.train import checkpoint as ckpt
from lmforge.train.loop import MAX_SKIPS_IN_A_ROW, TrainingDiverged, train
from lmforge.train.recipe import load_recipe
from tests.train.test_train import CONFIGS, _cfg, _losses, _model, _tokens

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
RUN = dict(max_steps=24, ckpt_every=2, keep_last=2, grad_accum=2)  # the run every crash test repeats


def _data():
    return lm_batches(_tokens(), 16, 4, seed=7)


def worker(out: str, pause_write: int = 0, step_sleep: float = 0.0, **run) -> None:
    """A training process for the tests below: prints BATCH <n> as it reads batches; with
    `pause_write`, its n-th checkpoint write stops half-way (MID-WRITE) until it is killed."""
    torch.set_num_threads(1)
    real_save, writes, calls = torch.save, [0], [0]

    def paused_save(obj, path):
        writes[0] += 1
        if writes[0] != pause_write:
            return real_save(obj, path)
        buf = io.BytesIO()
        real_save(obj, buf)
        with open(path, "wb") as f:
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            print("MID-WRITE", path, flush=True)
            time.sleep(120)

    def objective(model, batch):
        calls[0] += 1
        print("BATCH", calls[0], flush=True)
        time.sleep(step_sleep)
        return causal_lm(model, batch)
    ckpt.torch.save = paused_save
    model = _model(dropout=0.1)
    train(model, objective, _data(), _cfg(out_dir=out, resume=True, progress=True, **{**RUN, **run}))
    ckpt.torch.save = real_save
    torch.save(model.state_dict(), Path(out) / "final.pt")
    print("DONE", flush=True)


class _Forked:
    """`worker` in a child forked from this process: torch is already imported, so it starts at once
    (a fresh interpreter takes seconds). Reads like a Popen: stdout, send_signal, wait."""

    def __init__(self, out: Path, **kw):
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.close(r)
                sys.stdout = sys.stderr = os.fdopen(w, "w", buffering=1)
                worker(str(out), **kw)
                code = 0
            except SystemExit as e:
                code = e.code
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code)
        os.close(w)
        self.stdout = os.fdopen(r)

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self) -> int:
        return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])


def _start(out: Path, **kw) -> subprocess.Popen:
    """`worker` in a fresh interpreter, as a user's training run would be."""
    code = f"from tests.train.test_crash_safety import worker; worker({str(out)!r}, **{kw!r})"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-u", "-c", code], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _until(proc: subprocess.Popen, marker) -> list[str]:
    """Read the process's lines until `marker(line)` is true (or the output ends)."""
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if marker(line):
            break
    return lines


def _checkpoints_are_whole(directory: Path) -> list[Path]:
    """Every visible checkpoint has its checksum and reads; returns them."""
    found = ckpt.list_checkpoints(directory)
    for p in found:
        assert ckpt.checksum_path(p).is_file(), p
        assert ckpt.load_state(p).step == int(p.stem.split("-")[1])
    return found


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight = _model(dropout=0.1)
    train(straight, causal_lm, _data(), _cfg(out_dir=str(tmp_path / "straight"), **RUN))

    out, rng = tmp_path / "crashed", random.Random(16)
    # (batches read before the kill, or the checkpoint write to kill in the middle of)
    kills = [("batch", rng.randint(5, 12)), ("write", rng.randint(2, 3)), ("batch", rng.randint(5, 12)),
             ("write", rng.randint(2, 3))]
    expect_resume = None  # the newest whole checkpoint when the last process was killed
    for kind, at in kills:
        proc = _Forked(out, pause_write=at if kind == "write" else 0)
        marker = (lambda line: line == f"BATCH {at}\n") if kind == "batch" else (lambda line: "MID-WRITE" in line)
        lines = _until(proc, marker)
        time.sleep(rng.uniform(0, 0.02))
        proc.send_signal(signal.SIGKILL)
        lines += proc.stdout.read().splitlines()
        assert proc.wait() == -signal.SIGKILL
        assert any(marker(line + "\n") for line in lines), lines
        started = "nothing to resume" if expect_resume is None else f"resumed from {expect_resume}: step"
        assert any(started in line for line in lines), (started, lines)
        found = _checkpoints_are_whole(out / "checkpoints")
        if kind == "write":  # the half-written file is a hidden temporary, never a checkpoint
            assert list((out / "checkpoints").glob(".ckpt-*.tmp"))
        assert expect_resume is None or found[-1].name > expect_resume.name  # each process got further
        expect_resume = found[-1]

    proc = _Forked(out)
    lines = _until(proc, lambda line: line.startswith("DONE"))
    assert proc.wait() == 0, lines
    assert any(f"resumed from {expect_resume}: step" in line for line in lines), lines
    _checkpoints_are_whole(out / "checkpoints")
    assert not list((out / "checkpoints").glob(".*tmp"))  # leftovers of the killed writes are gone
    assert _losses(out / "log.jsonl") == _losses(tmp_path / "straight" / "log.jsonl")
    final = torch.load(out / "final.pt", weights_only=True)
    for name, p in straight.state_dict().items():
        assert torch.equal(p, final[name]), name


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_save_a_checkpoint_and_exit_cleanly(tmp_path, sig):
    proc = _start(tmp_path, step_sleep=0.05, max_steps=10_000, ckpt_every=0)
    lines = _until(proc, lambda line: line == "BATCH 5\n")
    proc.send_signal(sig)
    lines += proc.stdout.read().splitlines()
    assert proc.wait(timeout=60) == 128 + sig, lines
    name = signal.Signals(sig).name
    stop = [line for line in lines if line.startswith(f"stopped by {name} at step ")]
    assert len(stop) == 1 and "Traceback" not in "\n".join(lines), lines
    step = int(stop[0].split()[5].rstrip(":"))
    saved = ckpt.checkpoint_path(tmp_path / "checkpoints", step)
    assert step >= 2 and stop[0].endswith(f"saved {saved}; continue with train.resume=true")
    assert _checkpoints_are_whole(tmp_path / "checkpoints") == [saved]


# ---- bad checkpoints and a full disk (in process) ----------------------------------------------------
def test_a_corrupt_or_truncated_checkpoint_is_named_and_resume_uses_the_one_before(tmp_path, capsys):
    kw = dict(max_steps=6, ckpt_every=2, keep_last=3, schedule="constant")  # 6 steps, then 2 more
    train(_model(), causal_lm, _data(), _cfg(out_dir=str(tmp_path / "a"), **kw))
    newest = ckpt.latest_checkpoint(tmp_path / "a" / "checkpoints")
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit: torch.load alone might not notice
    newest.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"ckpt-00000006.pt: checksum mismatch .*truncated or corrupt"):
        ckpt.load_checkpoint(newest)
    capsys.readouterr()
    res = train(_model(seed=5), causal_lm, _data(), _cfg(out_dir=str(tmp_path / "a"), resume=True, progress=True,
                                                         **{**kw, "max_steps": 8}))
    err = capsys.readouterr().err.splitlines()
    fallback = [line for line in err if "falling back" in line]
    assert len(fallback) == 1 and "ckpt-00000006.pt: checksum mismatch" in fallback[0]
    assert res["resumed_step"] == 4 and res["steps"] == 8
    straight = _model()
    train(straight, causal_lm, _data(), _cfg(**{**kw, "max_steps": 8, "ckpt_every": 0}))
    resumed = ckpt.load_state(ckpt.latest_checkpoint(tmp_path / "a" / "checkpoints")).model
    for name, p in straight.state_dict().items():
        assert torch.equal(p, resumed[name]), name

    for p in ckpt.list_checkpoints(tmp_path / "a" / "checkpoints"):  # truncate them all
        p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"no usable checkpoint in .*ckpt-00000008.pt: checksum mismatch"):
        train(_model(), causal_lm, _data(), _cfg(out_dir=str(tmp_path / "a"), resume=True, **kw))
    legacy = tmp_path / "a" / "checkpoints" / "ckpt-00000008.pt"  # no checksum: torch.load judges
    ckpt.checksum_path(legacy).unlink()
    with pytest.raises(ValueError, match="ckpt-00000008.pt: not a readable lmforge checkpoint"):
        ckpt.load_checkpoint(legacy)


def test_disk_full_mid_write_keeps_the_old_checkpoint_and_says_why(tmp_path, monkeypatch):
    real_save, calls = torch.save, [0]

    def filling_save(obj, path):  # the second checkpoint fills the disk half-way through
        calls[0] += 1
        if calls[0] == 1:
            return real_save(obj, path)
        Path(path).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(ckpt.torch, "save", filling_save)
    directory = tmp_path / "checkpoints"
    with pytest.raises(OSError, match=r"could not write checkpoint .*ckpt-00000004.pt: No space left on device; "
                                      r"no partial file was left and the previous checkpoint .*ckpt-00000002.pt "
                                      r"is intact; free some disk space") as e:
        train(_model(), causal_lm, _data(), _cfg(max_steps=6, ckpt_every=2, out_dir=str(tmp_path)))
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in directory.iterdir()) == ["ckpt-00000002.pt", "ckpt-00000002.pt.sha256"]
    assert ckpt.load_state(directory / "ckpt-00000002.pt").step == 2


# ---- NaN / inf: stop or skip ---------------------------------------------------------------------------
def _poison_grads(model, bad_calls):
    """Make the gradients non-finite at the given backward passes (1-based), through a hook."""
    calls = [0]

    def hook(grad):
        calls[0] += 1
        return grad * float("inf") if calls[0] in bad_calls or "all" in bad_calls else grad
    model.backbone.decoder.layers[0].ff.up.weight.register_hook(hook)


def test_nonfinite_gradients_stop_with_the_last_checkpoint_kept(tmp_path):
    model = _model()
    _poison_grads(model, {5})
    with pytest.raises(TrainingDiverged, match="diverged at step 5: the gradient norm is (inf|nan)") as e:
        train(model, causal_lm, _data(), _cfg(ckpt_every=2, out_dir=str(tmp_path)))
    assert e.value.checkpoint.name == "ckpt-00000004.pt"
    state = ckpt.load_state(e.value.checkpoint)
    for name, p in model.state_dict().items():  # the bad update was never applied
        assert torch.equal(p, state.model[name]), name


def test_nonfinite_gradients_or_loss_skip_the_update_and_count_it(tmp_path):
    calls = [0]

    def nan_loss_at_7(model, batch):
        loss, metrics = causal_lm(model, batch)
        calls[0] += 1
        return (loss * float("nan"), metrics) if calls[0] == 7 else (loss, metrics)
    model = _model()
    _poison_grads(model, {2, 5})
    res = train(model, nan_loss_at_7, _data(), _cfg(on_nonfinite="skip", ckpt_every=8, out_dir=str(tmp_path)))
    assert res["steps"] == 8 and res["skipped_steps"] == 3 and _finite(model)
    state = ckpt.load_state(tmp_path / "checkpoints" / "ckpt-00000008.pt")
    assert state.skipped == 3
    assert all(s["step"] == 5 for s in state.optimizer["state"].values())  # 8 steps, 5 updates
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r.get("skipped_steps", 0) for r in records] == [0, 1, 1, 1, 2, 2, 3, 3]
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r)  # no NaN reaches the log

    stuck = _model()
    _poison_grads(stuck, {"all"})
    with pytest.raises(TrainingDiverged, match=f"for {MAX_SKIPS_IN_A_ROW + 1} steps in a row"):
        train(stuck, causal_lm, _data(), _cfg(on_nonfinite="skip", max_steps=50))


def _finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def test_on_nonfinite_in_recipes():
    assert load_recipe(CONFIGS / "main.yaml", ["train.on_nonfinite=skip"]).train.on_nonfinite == "skip"
    assert load_recipe(CONFIGS / "main.yaml").train.on_nonfinite == "stop"
    with pytest.raises(ValueError, match="on_nonfinite"):
        load_recipe(CONFIGS / "main.yaml", ["train.on_nonfinite=ignore"])
