"""The training loop, schedules, checkpoints and recipes: resume equals uninterrupted, gradient
accumulation equals one big batch, divergence stops cleanly, recipes run end to end."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.data.batches import lm_batches
from lmforge.models.heads import Model
from lmforge.models.io import load_model
from lmforge.objectives import causal_lm
from lmforge.tokenizer import Tokenizer
from lmforge.train import checkpoint as ckpt
from lmforge.train.loop import TrainConfig, TrainingDiverged, decay_split, make_optimizer, train
from lmforge.train.pretrain import run_pretraining
from lmforge.train.recipe import load_recipe
from lmforge.train.schedule import constant, cosine, linear, make_schedule, noam

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed=0, dropout=0.0, **kw):
    torch.manual_seed(seed)
    return Model(ModelConfig.preset("gpt-tiny", vocab_size=64, d_model=32, n_heads=2, d_ff=64, max_len=32,
                                    dropout=dropout, **kw))


def _tokens(n=2000, seed=0):
    return np.random.default_rng(seed).integers(0, 64, n).astype(np.uint16)


def _cfg(**kw):
    return TrainConfig(**{"lr": 3e-3, "max_steps": 8, "log_every": 1, "progress": False, **kw})


def _losses(log: str | Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, Path(log).read_text().splitlines()) if "loss" in r]


# ---- schedules ------------------------------------------------------------------------------------
def test_schedules_against_hand_values():
    lr, lo = 1e-3, 1e-4
    assert cosine(0, lr, 100, 2000, lo) == pytest.approx(1e-3 / 101)  # nanoGPT: (it + 1) / (warmup + 1)
    assert cosine(99, lr, 100, 2000, lo) == pytest.approx(1e-3 * 100 / 101)
    assert cosine(100, lr, 100, 2000, lo) == pytest.approx(1e-3)
    assert cosine(1050, lr, 100, 2000, lo) == pytest.approx(5.5e-4)  # half way: the mean of lr and min_lr
    assert cosine(2000, lr, 100, 2000, lo) == pytest.approx(1e-4)
    assert cosine(5000, lr, 100, 2000, lo) == 1e-4
    assert linear(1050, lr, 100, 2000, lo) == pytest.approx(5.5e-4)
    assert linear(575, lr, 100, 2000, lo) == pytest.approx(1e-3 - 0.25 * 9e-4)
    assert constant(5, lr, 10) == pytest.approx(1e-3 * 6 / 11) and constant(50, lr, 10) == lr
    # the paper: d_model 512, warmup 4000 → peak 512^-0.5 · 4000^-0.5 = 6.99e-4 at update 4000
    assert noam(3999, 512, 4000) == pytest.approx(6.98771242e-4)
    assert noam(0, 512, 4000) == pytest.approx(512 ** -0.5 * 4000 ** -1.5)
    assert noam(15999, 512, 4000) == pytest.approx(512 ** -0.5 * 16000 ** -0.5)
    assert noam(999, 512, 4000, factor=2.0) == pytest.approx(2 * 512 ** -0.5 * 1000 * 4000 ** -1.5)
    assert make_schedule("noam", 1.0, 4000, 0, d_model=512)(3999) == noam(3999, 512, 4000)
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        make_schedule("step", 1e-3, 0, 10)


def test_loop_follows_the_schedule(tmp_path):
    train(_model(), causal_lm, lm_batches(_tokens(), 16, 2), _cfg(warmup_steps=3, min_lr=1e-4, out_dir=str(tmp_path)))
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "lr" in r]
    assert lrs == pytest.approx([cosine(s, 3e-3, 3, 8, 1e-4) for s in range(8)])


# ---- optimizer ------------------------------------------------------------------------------------
def test_weight_decay_only_on_weight_matrices():
    model = _model()
    decay, no_decay = decay_split(model)
    names = {n for n, _ in model.named_parameters()}
    assert set(decay) | set(no_decay) == names and not set(decay) & set(no_decay)
    assert "backbone.tokens.weight" in no_decay  # embeddings (tied to the LM head) never decay
    assert any("positions" in n for n in no_decay)
    assert all(p.dim() >= 2 for n, p in model.named_parameters() if n in decay)
    assert all(n.endswith("bias") or "norm" in n or n.startswith(("backbone.tokens", "backbone.decoder.positions"))
               for n in no_decay)
    assert any(n.endswith("attn.q.weight") for n in decay) and any(n.endswith("ff.up.weight") for n in decay)
    t5 = Model(ModelConfig.preset("t5-tiny"))
    assert any("rel" in n for n in decay_split(t5)[1])  # T5's relative-position bias table is an embedding
    model.backbone.tokens.weight.requires_grad_(False)  # frozen parameters are not optimised at all
    assert "backbone.tokens.weight" not in sum(decay_split(model), [])
    groups = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu")).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_grad_accumulation_equals_one_big_batch():
    batches = list(itertools.islice(lm_batches(_tokens(), 16, 8, seed=1), 3))
    halves = [{k: v[i:i + 4] for k, v in b.items()} for b in batches for i in (0, 4)]
    a, b = _model(), _model()
    # eps=1 makes Adam's step ≈ lr · gradient: a parameter whose gradient is round-off (the key
    # bias, to which softmax is blind) then moves by round-off, not by ±lr
    kw = dict(max_steps=3, lr=0.5, eps=1.0, schedule="constant")
    la = train(a, causal_lm, iter(batches), _cfg(**kw))["train_loss"]
    lb = train(b, causal_lm, iter(halves), _cfg(grad_accum=2, **kw))["train_loss"]
    assert la == pytest.approx(lb, abs=1e-6)
    moved = 0.0
    for (name, p), q, p0 in zip(a.named_parameters(), b.parameters(), _model().parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
        moved = max(moved, (p - p0).abs().max().item())
    assert moved > 1e-3


# ---- resume -------------------------------------------------------------------------------------------
class _Interrupt:
    """A batch stream that dies (like Ctrl-C) when asked for batch number `at`."""

    def __init__(self, stream, at):
        self.stream, self.at, self.n = stream, at, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        if self.n == self.at:
            raise KeyboardInterrupt
        return next(self.stream)

    def __getattr__(self, name):  # state_dict / load_state_dict exactly when the stream has them
        return getattr(self.stream, name)


@pytest.mark.parametrize("stream", ["resumable", "plain generator"])
def test_resume_continues_exactly(tmp_path, stream):
    """8 updates straight = 4 updates, a crash in update 6, and a resume from the step-4 checkpoint:
    the same losses and bit-identical weights (dropout on, grad accumulation 2, evaluation on)."""
    def data(seed):
        if stream == "resumable":
            return lm_batches(_tokens(), 16, 4, seed=seed)
        fixed = list(itertools.islice(lm_batches(_tokens(), 16, 4, seed=7), 16))
        return (b for b in fixed)  # no state_dict: the loop fast-forwards it on resume
    val = list(itertools.islice(lm_batches(_tokens(seed=1), 16, 4), 2))
    kw = dict(max_steps=8, grad_accum=2, ckpt_every=4, eval_every=4, keep_last=5)
    straight = _model(dropout=0.1)
    res = train(straight, causal_lm, data(7), _cfg(out_dir=str(tmp_path / "a"), **kw), val)

    broken = _model(dropout=0.1)
    with pytest.raises(KeyboardInterrupt):
        train(broken, causal_lm, _Interrupt(data(7), at=11), _cfg(out_dir=str(tmp_path / "b"), **kw), val)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b" / "checkpoints")] == ["ckpt-00000004.pt"]
    resumed = _model(seed=123, dropout=0.1)  # different initial weights and data seed: all must come from disk
    res2 = train(resumed, causal_lm, data(999 if stream == "resumable" else 7),
                 _cfg(out_dir=str(tmp_path / "b"), resume=True, **kw), val)

    assert _losses(tmp_path / "a" / "log.jsonl") == _losses(tmp_path / "b" / "log.jsonl")
    assert len(_losses(tmp_path / "a" / "log.jsonl")) == 8
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    assert res["valid_loss"] == res2["valid_loss"] and res["tokens"] == res2["tokens"]


def test_fresh_run_replaces_old_checkpoints(tmp_path):
    train(_model(), causal_lm, lm_batches(_tokens(), 16, 2), _cfg(max_steps=6, ckpt_every=3, out_dir=str(tmp_path)))
    train(_model(), causal_lm, lm_batches(_tokens(), 16, 2), _cfg(max_steps=2, ckpt_every=1, out_dir=str(tmp_path)))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["ckpt-00000001.pt",
                                                                                  "ckpt-00000002.pt"]


# ---- checkpoints --------------------------------------------------------------------------------------
def test_checkpoints_keep_last_k_and_survive_a_failing_write(tmp_path, monkeypatch):
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000004.pt", "ckpt-00000005.pt"]
    assert ckpt.latest_checkpoint(tmp_path).name == "ckpt-00000005.pt"
    before = sorted(p.name for p in tmp_path.iterdir())

    def failing_save(obj, path):  # writes half a file, then the disk "fills up"
        Path(path).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")
    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        ckpt.save_checkpoint(tmp_path, 6, {"step": 6}, keep_last=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp file, nothing pruned
    assert torch.equal(ckpt.load_checkpoint(tmp_path / "ckpt-00000005.pt")["w"], torch.full((3,), 5.0))
    (tmp_path / "ckpt-00000007.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="ckpt-00000007.pt: not a readable lmforge checkpoint"):
        ckpt.load_checkpoint(tmp_path / "ckpt-00000007.pt")


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def poisoned(model, batch):
        loss, metrics = causal_lm(model, batch)
        calls["n"] += 1
        return (loss * float("nan"), metrics) if calls["n"] == 5 else (loss, metrics)
    model = _model()
    with pytest.raises(TrainingDiverged, match="diverged at step 5: the loss is nan") as e:
        train(model, poisoned, lm_batches(_tokens(), 16, 2), _cfg(ckpt_every=2, out_dir=str(tmp_path)))
    assert e.value.step == 5 and e.value.checkpoint.name == "ckpt-00000004.pt"
    assert "ckpt-00000004.pt" in str(e.value)
    state = ckpt.load_checkpoint(e.value.checkpoint)
    assert state["step"] == 4
    for name, p in model.state_dict().items():  # the poisoned update was never applied
        assert torch.equal(p, state["model"][name]), name
    inf_grad = _model()
    with torch.no_grad():
        inf_grad.backbone.decoder.layers[0].ff.up.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="step 1"):
        train(inf_grad, causal_lm, lm_batches(_tokens(), 16, 2), _cfg())


# ---- outputs, precision, budget ----------------------------------------------------------------------
def test_logs_plot_eval_metrics_and_time_budget(tmp_path):
    val = list(itertools.islice(lm_batches(_tokens(seed=1), 16, 4), 2))
    out = train(_model(), causal_lm, lm_batches(_tokens(), 16, 4), _cfg(max_steps=6, log_every=2, eval_every=3,
                                                                          out_dir=str(tmp_path)), val)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if "loss" in r]
    evals = [r for r in records if "valid_loss" in r]
    assert [r["step"] for r in train_recs] == [2, 4, 6] and [r["step"] for r in evals] == [3, 6]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 and "grad_norm" in r for r in train_recs)
    assert evals[-1]["valid_perplexity"] == pytest.approx(math.exp(evals[-1]["valid_nll"]))
    assert out["valid_loss"] == evals[-1]["valid_loss"] and out["tokens"] == 6 * 4 * 16
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG" and out["plot"] == str(tmp_path / "loss.png")
    quick = train(_model(), causal_lm, lm_batches(_tokens(), 16, 4), _cfg(max_steps=10_000, max_minutes=1e-4))
    assert quick["stopped"] == "max_minutes" and quick["steps"] < 10_000


def _step_losses(tmp_path, name, **kw) -> list[float]:
    train(_model(), causal_lm, lm_batches(_tokens(), 16, 4), _cfg(max_steps=4, out_dir=str(tmp_path / name), **kw))
    return [loss for _, loss in _losses(tmp_path / name / "log.jsonl")]


def test_bfloat16_autocast_matches_float32(tmp_path):
    """bfloat16 keeps 8 bits of mantissa (a rounding error of up to 0.4% per operation); the logits and
    the loss are computed in float32 (lmforge.nn.cross_entropy), so every step's loss stays within 1%."""
    f32, bf16 = _step_losses(tmp_path, "f32"), _step_losses(tmp_path, "bf16", dtype="bfloat16")
    assert len(bf16) == len(f32) == 4
    assert bf16 == pytest.approx(f32, rel=1e-2)
    with pytest.raises(ValueError, match="dtype='float16'"):
        TrainConfig(dtype="float16")


@pytest.mark.slow
def test_torch_compile_matches_eager(tmp_path):
    """torch.compile fuses and reorders float32 operations: the same losses up to round-off (1e-4 relative)."""
    eager, compiled = _step_losses(tmp_path, "eager"), _step_losses(tmp_path, "compiled", compile=True)
    assert len(compiled) == 4 and compiled == pytest.approx(eager, rel=1e-4)


# ---- what the loop tells its user ----------------------------------------------------------------------
def test_progress_off_a_terminal_is_plain_lines_after_the_parameter_count(capsys):
    model = _model()
    out = train(model, causal_lm, lm_batches(_tokens(), 16, 2), _cfg(max_steps=40, log_every=2, progress=True))
    err = capsys.readouterr().err  # captured: not a terminal
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith(f"model: {model.num_parameters():,} parameters")  # before training starts
    progress = [line for line in lines if line.startswith("training ")]
    assert 2 <= len(progress) <= 21 and progress[-1].startswith("training 40/40 (100%)")
    assert all(" loss " in line for line in progress) and out["parameters"] == model.num_parameters()


def test_result_carries_first_and_last_losses(tmp_path):
    val = list(itertools.islice(lm_batches(_tokens(seed=1), 16, 4), 2))
    out = train(_model(), causal_lm, lm_batches(_tokens(), 16, 4),
                _cfg(max_steps=6, log_every=2, eval_every=3, out_dir=str(tmp_path)), val)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if "loss" in r]
    valid_losses = [r["valid_loss"] for r in records if "valid_loss" in r]
    assert (out["first_train_loss"], out["train_loss"]) == (train_losses[0], train_losses[-1])
    assert (out["first_valid_loss"], out["valid_loss"]) == (valid_losses[0], valid_losses[-1])


def test_time_budget_ends_the_schedule_instead_of_cutting_it(monkeypatch, tmp_path):
    """A budget that allows fewer steps than max_steps lays the schedule over the budget: warmup,
    then a smooth cosine whose last update runs at (nearly) min_lr, not halfway down. A fake clock
    (1 s per reading) makes it exact."""
    from lmforge.train import loop
    clock = itertools.count()
    monkeypatch.setattr(loop.time, "perf_counter", lambda: float(next(clock)))
    out = train(_model(), causal_lm, lm_batches(_tokens(), 16, 2),
                _cfg(max_steps=1000, max_minutes=5.0, warmup_steps=100, min_lr=1e-4, out_dir=str(tmp_path)))
    assert out["stopped"] == "max_minutes" and 20 < out["steps"] < 1000
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "lr" in r]
    peak = lrs.index(max(lrs))
    assert 0 < peak < len(lrs) // 4 and lrs[:peak + 1] == sorted(lrs[:peak + 1])  # a warmup
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # then a decay
    assert max(abs(a - b) for a, b in zip(lrs, lrs[1:])) < 0.2 * (3e-3 - 1e-4)  # smooth, no jump
    assert lrs[-1] < 1e-4 + 0.02 * (3e-3 - 1e-4)  # that reaches the end of the cosine


def test_resume_says_what_it_resumed_from_and_when_nothing_is_left(tmp_path, capsys):
    kw = dict(max_steps=4, ckpt_every=2, out_dir=str(tmp_path), progress=True)
    train(_model(), causal_lm, lm_batches(_tokens(), 16, 2), _cfg(**kw))
    capsys.readouterr()
    out = train(_model(), causal_lm, lm_batches(_tokens(), 16, 2), _cfg(resume=True, **kw))
    err = capsys.readouterr().err
    assert f"resumed from {tmp_path / 'checkpoints' / 'ckpt-00000004.pt'}: step 4 of 4" in err
    assert out["resumed_step"] == out["steps"] == 4 and out["resumed_from"].endswith("ckpt-00000004.pt")
    assert [step for step, _ in _losses(tmp_path / "log.jsonl")] == [1, 2, 3, 4]  # nothing logged twice
    assert out["train_loss"] == _losses(tmp_path / "log.jsonl")[-1][1]
    more = train(_model(), causal_lm, lm_batches(_tokens(), 16, 2), _cfg(resume=True, **{**kw, "max_steps": 6}))
    assert more["steps"] == 6 and more["resumed_step"] == 4
    # a run its data stopped between two log records: resuming it logs nothing twice
    short = dict(max_steps=10, log_every=4, ckpt_every=4, out_dir=str(tmp_path / "short"))
    first = train(_model(), causal_lm, itertools.islice(lm_batches(_tokens(), 16, 2), 5), _cfg(**short))
    again = train(_model(), causal_lm, itertools.islice(lm_batches(_tokens(), 16, 2), 5), _cfg(resume=True, **short))
    assert first["stopped"] == again["stopped"] == "data" and again["resumed_step"] == again["steps"] == 5
    assert [step for step, _ in _losses(tmp_path / "short" / "log.jsonl")] == [4, 5]
    assert again["train_loss"] == first["train_loss"]


def test_a_module_marked_no_weight_decay_is_not_decayed():
    class Table(torch.nn.Module):
        no_weight_decay = True

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4, 3))
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), Table())
    decay, no_decay = decay_split(model)
    assert decay == ["0.weight"] and set(no_decay) == {"0.bias", "1.weight"}


def test_train_state_refuses_a_foreign_checkpoint(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1, "weights": torch.zeros(2)})
    with pytest.raises(ValueError, match="not a training checkpoint of format 1 .*missing tokens"):
        ckpt.load_state(ckpt.latest_checkpoint(tmp_path))


# ---- recipes ------------------------------------------------------------------------------------------
def test_every_shipped_config_loads():
    for path in sorted(CONFIGS.glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.model_config().n_layers > 0, path
    main = load_recipe(CONFIGS / "main.yaml")
    assert main.data.source == "builtin:pydoc" and main.train.max_minutes and main.objective.name == "causal_lm"


def test_recipe_yaml_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  preset: gpt-tiny\n  d_model: 32\ntrain:\n  lr: 3e-4\n  max_steps: 1e3\n"
                    "objective: causal_lm\n")
    r = load_recipe(path, ["train.lr=1e-3", "model.n_heads=2", "data.source=[a.txt, b.txt]", "train.compile=true",
                           "out_dir=x"])
    assert r.train.lr == 1e-3 and isinstance(r.train.lr, float) and r.train.max_steps == 1000
    assert r.model == {"preset": "gpt-tiny", "d_model": 32, "n_heads": 2} and r.data.source == ["a.txt", "b.txt"]
    assert r.train.compile is True and r.out_dir == "x" and r.objective.name == "causal_lm"
    assert load_recipe(path, ["train.max_minutes=2"]).train.max_minutes == 2.0
    assert load_recipe(path, ["train.max_minutes=none", "tokenizer.path=null"]).train.max_minutes is None
    assert load_recipe(path).train.lr == 3e-4  # PyYAML reads 3e-4 as a string; the field type makes it a float
    with pytest.raises(ValueError, match=r"unknown key 'train.lrr'.*"):
        load_recipe(path, ["train.lrr=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  warmup: 10\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown key 'train.warmup'"):
        load_recipe(bad)
    bad.write_text("model:\n  dmodel: 10\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown key 'model.dmodel'"):
        load_recipe(bad)
    bad.write_text("trian: {}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown key 'trian'"):
        load_recipe(bad)
    with pytest.raises(ValueError, match=r"train.max_steps='many': expected int"):
        load_recipe(path, ["train.max_steps=many"])
    with pytest.raises(ValueError, match="unknown preset 'gpt-huge'"):
        load_recipe(path, ["model.preset=gpt-huge"])
    with pytest.raises(ValueError, match="objective.name='bogus'"):
        load_recipe(path, ["objective.name=bogus"])
    assert load_recipe(path, ["objective=mlm"]).objective.name == "masked_lm"  # the earlier name, an alias
    with pytest.raises(ValueError, match="objective.name='span_qa': expected a pretraining objective"):
        load_recipe(path, ["objective.name=span_qa"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


def _tiny_recipe(tmp_path, source, *more):
    return load_recipe(None, [f"data.source={source}", "model.preset=gpt-tiny", "model.d_model=32",
                              "model.n_heads=2", "model.d_ff=64", "model.max_len=32", "data.block_size=16",
                              "tokenizer.vocab_size=300", "train.batch_size=4", "train.max_steps=4",
                              "train.eval_batches=2", "train.ckpt_every=2", "train.progress=false",
                              f"out_dir={tmp_path / 'run'}", *more])


def test_run_pretraining_end_to_end(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(" ".join(f"The {w} sat on the mat number {i}." for w in
                                                     ("cat", "dog", "bird", "fox", "cow") * 8))
    result = run_pretraining(_tiny_recipe(tmp_path, corpus))
    m = result["metrics"]
    assert m["steps"] == 4 and math.isfinite(m["valid_perplexity"]) and m["valid_perplexity"] > 1
    model = load_model(result["model_dir"])
    tok = Tokenizer.load(result["model_dir"])
    assert model.cfg.vocab_size == tok.vocab_size and model.cfg.eos_id == tok.eos_id
    assert Path(result["plot"]).is_file() and Path(result["checkpoint"]).is_file()
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["metrics"]["steps"] == 4 and (tmp_path / "run" / "recipe.yaml").is_file()
    # resuming a finished run trains no further and gives the same weights
    again = run_pretraining(_tiny_recipe(tmp_path, corpus, "train.resume=true"))
    assert again["metrics"]["steps"] == 4
    for k, v in load_model(again["model_dir"]).state_dict().items():
        assert torch.equal(v, model.state_dict()[k])


def test_main_recipe_runs_on_the_builtin_corpus(tmp_path):
    recipe = load_recipe(CONFIGS / "main.yaml", ["train.max_steps=2", "train.batch_size=2", "train.eval_batches=1",
                                                 "train.progress=false", "tokenizer.vocab_size=512",
                                                 f"out_dir={tmp_path}"])
    result = run_pretraining(recipe)
    assert result["metrics"]["steps"] == 2 and result["train_tokens"] > 50_000
    assert (tmp_path / "cache" / "builtin" / "pydoc.jsonl").is_file()


@pytest.mark.parametrize("case", ["empty", "binary", "latin-1", "missing", "too long", "wrong model"])
def test_bad_input_is_a_clear_error(tmp_path, case):
    f = tmp_path / "corpus.txt"
    f.write_text("Some text here. " * 50)
    more, err, match = [], ValueError, None
    if case == "empty":
        f.write_text("\n  \n")
        match = "corpus.txt is empty"
    elif case == "binary":
        f.write_bytes(b"text\x00\x01\x02binary")
        match = "corpus.txt looks binary"
    elif case == "latin-1":
        f.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
        match = "corpus.txt is not valid UTF-8"
    elif case == "missing":
        f = tmp_path / "nope.txt"
        err, match = FileNotFoundError, "nope.txt does not exist"
    elif case == "too long":
        more, match = ["data.block_size=64"], "block_size=64 is longer than the model's max_len=32"
    else:
        more, match = ["model.preset=bert-tiny"], "objective 'causal_lm' trains a decoder model"
    with pytest.raises(err, match=match):
        run_pretraining(_tiny_recipe(tmp_path, f, *more))


# ---- the main job's report ------------------------------------------------------------------------------
def _cli_pretrain(tmp_path, corpus, *more) -> tuple[int, str, str]:
    from lmforge.cli import main
    args = [f"data.source={corpus}", "model.preset=gpt-tiny", "model.d_model=32", "model.n_heads=2", "model.d_ff=64",
            "model.max_len=32", "data.block_size=16", "tokenizer.vocab_size=300", "train.batch_size=4",
            "train.max_steps=4", "train.eval_batches=2", "train.ckpt_every=2", "train.log_every=1",
            f"out_dir={tmp_path / 'run'}", *more]
    return main(["pretrain", *args, "--no-samples"]), args


def test_pretrain_says_why_it_stopped_and_how_to_go_on(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"The {w} sat on the mat." for w in ("cat", "dog", "bird", "fox") * 40))
    rc, args = _cli_pretrain(tmp_path, corpus)
    out, err = capsys.readouterr()
    assert rc == 0 and "\r" not in err
    tokenising = [line for line in err.splitlines() if line.startswith("tokenising")]
    assert len(tokenising) == 1 and "(100%)" in tokenising[0]  # once, and complete
    assert err.index("model: ") < err.index("training 4/4")  # the parameter count comes first
    assert "stopped: all train.max_steps=4 steps done." in out
    assert "to train further: lmforge pretrain data.source=" in out and "train.resume=true train.max_steps=8" in out
    assert "train loss        " in out and "(first log) -> " in out

    rc, _ = _cli_pretrain(tmp_path, corpus, "train.resume=true")
    out, err = capsys.readouterr()
    assert rc == 0 and f"resumed from {tmp_path / 'run' / 'checkpoints' / 'ckpt-00000004.pt'}: step 4 of 4" in err
    assert "nothing left to do: the run resumed from" in out and "it is at train.max_steps=4" in out
    assert "to extend the run: lmforge pretrain" in out and "train.resume=true train.max_steps=8" in out


def test_stop_message_for_a_time_budget():
    from lmforge.train.pretrain import stop_message
    recipe = load_recipe(CONFIGS / "main.yaml")
    cmd = "lmforge pretrain --config configs/main.yaml"
    ran = {"metrics": {"steps": 527, "stopped": "max_minutes", "resumed_from": None, "resumed_step": None}}
    msg = stop_message(ran, recipe, cmd)
    assert "stopped: the time budget train.max_minutes=5 ran out at step 527 of train.max_steps=1000" in msg
    assert "schedule was laid over the budget and has ended" in msg
    assert f"to continue: {cmd} train.resume=true train.max_minutes=10" in msg
    done = {"metrics": {"steps": 527, "stopped": "max_minutes", "resumed_from": "c.pt", "resumed_step": 527}}
    msg = stop_message(done, recipe, cmd)
    assert "nothing left to do" in msg and "budget is used up" in msg and "train.max_minutes=10" in msg
