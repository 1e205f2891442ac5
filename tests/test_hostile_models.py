"""Hostile input around models: token ids out of range, configs of the wrong type or with unknown
keys, checkpoints of another model, a tokenizer that does not fit, prompts longer than the context;
and loading security: no code runs from a checkpoint, chat templates render in a sandbox.

Every case asserts the message (what is wrong, with the values) and, for commands, that what was
saved before is byte for byte unchanged.
"""

import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.generate import generate
from lmforge.models.heads import Model
from lmforge.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _tiny(preset: str, **kw) -> Model:
    torch.manual_seed(0)
    return Model(ModelConfig.preset(preset, **kw)).eval()


def _sha(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


# ---- token ids out of range -------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [1000, 1 << 40, -1])
@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny", "bert-tiny", "t5-tiny", "bart-tiny"])
def test_forward_refuses_ids_outside_the_vocabulary(preset, bad):
    model = _tiny(preset)
    ids = torch.tensor([[5, 6, bad, 7]])
    msg = rf"input_ids holds token id {bad} at \(0, 2\), outside the model's vocabulary of 1000 tokens \(ids 0 to 999\)"
    dec = {"decoder_input_ids": torch.tensor([[0, 1]])} if model.cfg.family == "encoder-decoder" else {}
    with pytest.raises(ValueError, match=msg):
        model(ids, **dec)
    if dec:
        with pytest.raises(ValueError, match=rf"decoder_input_ids holds token id {bad} at \(0, 1\)"):
            model(torch.tensor([[5, 6]]), decoder_input_ids=torch.tensor([[0, bad]]))


@pytest.mark.parametrize("bad", [1000, -3])
@pytest.mark.parametrize("preset", ["gpt-tiny", "t5-tiny"])
def test_generate_refuses_prompt_ids_outside_the_vocabulary(preset, bad):
    with pytest.raises(ValueError, match=rf"the prompt holds token id {bad} .* vocabulary of 1000 tokens"):
        generate(_tiny(preset), [[5, bad, 6]], max_new_tokens=2)


# ---- configs with wrong types or unknown keys ----------------------------------------------------
CHECKPOINT_CONFIGS = {  # change to config.json → what the message says
    "string for int": ({"d_model": "64"}, r"ModelConfig.d_model='64' has type str; expected int"),
    "float for int": ({"n_heads": 4.5}, r"ModelConfig.n_heads=4.5 has type float; expected int"),
    "string for bool": ({"bias": "yes"}, r"ModelConfig.bias='yes' has type str; expected bool"),
    "bool for int": ({"vocab_size": True}, r"ModelConfig.vocab_size=True has type bool; expected int"),
    "list of ints for labels": ({"labels": [1, 2]}, r"ModelConfig.labels=\[1, 2\] has type list; expected a list of str or None"),
    "unknown family": ({"family": "rnn"}, r"ModelConfig.family='rnn' is not one of"),
    "unknown key": ({"colour": "blue"}, r"unknown ModelConfig field\(s\): colour"),
    "negative size": ({"d_ff": -1}, r"ModelConfig.d_ff=-1 must be > 0"),
}


@pytest.mark.parametrize("case", CHECKPOINT_CONFIGS)
def test_checkpoint_config_of_wrong_type_or_unknown_key(tmp_path, case):
    change, expected = CHECKPOINT_CONFIGS[case]
    lmforge.save(_tiny("gpt-tiny"), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=rf"config.json: {expected}"):
        lmforge.load(tmp_path)


@pytest.mark.parametrize("change, expected", [
    ({"n_embd": "32"}, r"ModelConfig.d_model='32' has type str; expected int"),
    ({"n_layer": 2.5}, r"ModelConfig.n_decoder_layers=2.5 has type float; expected int"),
    ({"n_head": None}, r"ModelConfig.n_heads=None has type NoneType; expected int"),
])
def test_hf_config_of_wrong_type_names_the_file(tmp_path, change, expected):
    from tests.conftest import tiny_hf
    tiny_hf("gpt2").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=rf"config.json: {expected}"):
        lmforge.load(tmp_path)


RECIPES = {  # YAML text or overrides → what the message says
    "unknown section": ("colour: blue\n", [], r"unknown key 'colour'; a recipe has: model, tokenizer"),
    "unknown train key": ("train:\n  speed: 3\n", [], r"unknown key 'train.speed'; train takes: "),
    "wrong type": ("train:\n  lr: fast\n", [], r"train.lr='fast': expected float"),
    "wrong model type": ("model:\n  d_model: big\n", [], r"model.d_model='big': expected int"),
    "unknown model key": ("model:\n  width: 3\n", [], r"unknown key 'model.width'"),
    "not a mapping": ("- a\n- b\n", [], r"a recipe must be a mapping, got list"),
    "bad override type": ("", ["train.max_steps=many"], r"train.max_steps='many': expected int"),
    "unknown override": ("", ["train.colour=1"], r"unknown key 'train.colour'"),
    "override without =": ("", ["train.lr"], r"override 'train.lr': expected key=value"),
    "bad choice": ("", ["data.split=chapter"], r"data.split='chapter': expected one of 'file', 'paragraph', 'line'"),
    "impossible model": ("", ["model.n_heads=3"], r"model: ModelConfig.d_model=\d+ is not divisible by n_heads=3"),
}


@pytest.mark.parametrize("case", RECIPES)
def test_recipe_errors_name_file_key_and_value_and_write_nothing(tmp_path, capsys, case):
    text, overrides, expected = RECIPES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(recipe), f"out_dir={out}", *overrides]) == 2
    err = capsys.readouterr().err
    assert re.search(expected, err) and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("option, expected", [
    ("lr=fast", r"lr='fast': expected float"), ("colour=blue", r"unknown option 'colour'"),
    ("steps=1.5", r"option steps='1.5': expected an integer"), ("model.width=3", r"unknown option 'model.width'"),
])
def test_finetune_options_of_wrong_type_or_unknown(tmp_path, capsys, tiny_text_model, option, expected):
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    assert main(["finetune", "--task", "classify", "--model", str(tiny_text_model), "--train", str(train),
                 "--out", str(tmp_path / "ft"), option]) == 2
    assert re.search(expected, capsys.readouterr().err)
    assert not (tmp_path / "ft").exists()


# ---- damaged model files ------------------------------------------------------------------------------
MODEL_DAMAGES = {  # case → (file, bytes written over it (None: its first half), what the message says)
    "safetensors truncated": ("model.safetensors", None, r"model.safetensors: not a readable safetensors file"),
    "safetensors garbage": ("model.safetensors", b"\x00" * 64, r"model.safetensors: not a readable safetensors file"),
    "safetensors empty": ("model.safetensors", b"", r"model.safetensors: not a readable safetensors file"),
    "config.json binary": ("config.json", b"\x89PNG\r\n\x1a\n\x00", r"no usable config.json"),
    "config.json a list": ("config.json", b"[1, 2]", r"no usable config.json"),
    "gguf empty": ("model.gguf", b"", r"model.gguf: not a valid GGUF file, or truncated"),
    "gguf garbage": ("model.gguf", b"\x89PNG\r\n\x1a\n" * 10, r"model.gguf: not a valid GGUF file, or truncated"),
    "gguf truncated": ("model.gguf", b"GGUF\x03\x00\x00\x00" + b"\xff" * 16, r"model.gguf: not a valid GGUF file"),
}


@pytest.mark.parametrize("case", MODEL_DAMAGES)
def test_a_damaged_model_file_is_named_and_convert_leaves_its_destination(tmp_path, capsys, tiny_text_model, case):
    name, data, expected = MODEL_DAMAGES[case]
    shutil.copytree(tiny_text_model, tmp_path / "m")
    f = tmp_path / "m" / name
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2] if data is None else data)
    src = f if name.endswith(".gguf") else tmp_path / "m"
    with pytest.raises(ValueError, match=expected):
        lmforge.load(src)
    shutil.copytree(tiny_text_model, tmp_path / "dst")
    before = _sha(tmp_path / "dst")
    for argv in (["info", str(src)], ["convert", str(src), str(tmp_path / "dst")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert re.search(expected, err) and "Traceback" not in err, err
    assert _sha(tmp_path / "dst") == before


# ---- checkpoints of another model ------------------------------------------------------------------
@pytest.mark.parametrize("other, expected", [
    ({"preset": "gpt-tiny", "vocab_size": 500}, r"refusing a partial load: wrong shape: backbone.tokens.weight: checkpoint \(500, 64\) vs model \(1000, 64\)"),
    ({"preset": "gpt-tiny", "d_model": 32}, r"refusing a partial load: wrong shape: .*checkpoint \(32, 32\) vs model \(64, 64\)"),
    ({"preset": "bert-tiny"}, r"refusing a partial load: missing \d+ tensor\(s\).* \| unexpected \d+ tensor\(s\)"),
    ({"preset": "t5-tiny"}, r"refusing a partial load: missing"),
])
def test_weights_of_another_model_are_refused_naming_both_shapes(tmp_path, other, expected):
    lmforge.save(_tiny("gpt-tiny"), tmp_path / "a")
    lmforge.save(_tiny(**other), tmp_path / "b")
    shutil.copy(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    with pytest.raises(ValueError, match=rf"a/model.safetensors: {expected}"):
        lmforge.load(tmp_path / "a")


@pytest.mark.parametrize("change, expected", [
    ({"vocab_size": 100}, r"checkpoint \(64, 32\) vs model \(100, 32\).*vocab_size: checkpoint 64, this run 100"),
    ({"n_decoder_layers": 3}, r"missing \d+ tensor\(s\): backbone.decoder.layers.2.*n_decoder_layers: checkpoint 2, this run 3"),
])
def test_resuming_from_another_models_checkpoint_names_both(tmp_path, change, expected):
    from lmforge.data.batches import lm_batches
    from lmforge.objectives import causal_lm
    from lmforge.train.loop import train
    from tests.train.test_train import _cfg, _model, _tokens
    run = dict(out_dir=str(tmp_path), max_steps=2, ckpt_every=2)
    train(_model(), causal_lm, lm_batches(_tokens(), 16, 4, seed=7), _cfg(**run))
    ckpts = sorted((tmp_path / "checkpoints").iterdir())
    before = {p.name: p.read_bytes() for p in ckpts}
    torch.manual_seed(0)
    other = Model(ModelConfig.preset("gpt-tiny", **{**dict(vocab_size=64, d_model=32, n_heads=2, d_ff=64, max_len=32),
                                                    **change}))
    with pytest.raises(ValueError, match=rf"ckpt-00000002.pt: refusing a partial load: .*{expected}"):
        train(other, causal_lm, lm_batches(_tokens(), 16, 4, seed=7), _cfg(resume=True, **run))
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "checkpoints").iterdir())} == before


# ---- a tokenizer that does not fit the model ---------------------------------------------------------
def test_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, capsys, tiny_text_model):
    tok = Tokenizer.load(tiny_text_model)
    lmforge.save(_tiny("gpt-tiny", vocab_size=100), tmp_path / "m", tokenizer=tok)
    msg = rf"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary has 100"
    with pytest.raises(ValueError, match=msg):
        lmforge.load(tmp_path / "m")
    shutil.copytree(tiny_text_model, tmp_path / "dst")
    before = _sha(tmp_path / "dst")
    for argv in (["generate", str(tmp_path / "m"), "--prompt", "hello"], ["convert", str(tmp_path / "m"), str(tmp_path / "dst")],
                 ["info", str(tmp_path / "m")]):
        assert main(argv) == 2
        assert re.search(msg, capsys.readouterr().err)
    assert _sha(tmp_path / "dst") == before


TOKENIZER_DAMAGES = {  # file → (bytes written over it, what the message says)
    "tokenizer.json garbage": ("tokenizer.json", b"{not json", r"tokenizer.json: not a readable tokenizer file"),
    "tokenizer.json binary": ("tokenizer.json", b"\x89PNG\r\n\x1a\n\x00\x00", r"tokenizer.json: not a readable tokenizer file"),
    "tokenizer.json empty": ("tokenizer.json", b"", r"tokenizer.json: not a readable tokenizer file"),
    "tokenizer.json truncated": ("tokenizer.json", None, r"tokenizer.json: not a readable tokenizer file"),
    "config not JSON": ("tokenizer_config.json", b"eos_token: </s>", r"tokenizer_config.json: not a readable JSON file"),
    "config not UTF-8": ("tokenizer_config.json", b'{"eos_token": "\xff"}', r"tokenizer_config.json: not a readable JSON file"),
    "config a list": ("tokenizer_config.json", b"[1, 2]", r"tokenizer_config.json: expected a JSON object, got list"),
}


@pytest.mark.parametrize("case", TOKENIZER_DAMAGES)
def test_a_damaged_tokenizer_is_named(tmp_path, capsys, tiny_text_model, case):
    name, data, expected = TOKENIZER_DAMAGES[case]
    shutil.copytree(tiny_text_model, tmp_path / "m")
    f = tmp_path / "m" / name
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2] if data is None else data)
    with pytest.raises(ValueError, match=expected):
        lmforge.load(tmp_path / "m")
    assert main(["generate", str(tmp_path / "m"), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert re.search(expected, err) and "Traceback" not in err


# ---- prompts longer than the context ----------------------------------------------------------------
def test_prompt_longer_than_the_context(tiny_text_model, capsys, monkeypatch):
    model, tok = lmforge.load(tiny_text_model)
    long = "the quick brown fox " * 200  # far more than the 128 tokens of context
    n = len(tok.encode(long))
    with pytest.raises(ValueError, match=rf"the prompt of {n} tokens does not fit: 118 are left for it .*truncate=True"):
        lmforge.api.generate_text(model, tok, long, max_new_tokens=10)
    assert isinstance(lmforge.api.generate_text(model, tok, long, max_new_tokens=10, truncate=True), str)
    assert main(["generate", str(tiny_text_model), "--prompt", long, "--max-new-tokens", "10"]) == 2
    assert f"the prompt of {n} tokens does not fit" in capsys.readouterr().err
    # chat: the error is said, the session goes on (the history that no longer fits is dropped)
    lines = iter([long, "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", str(tiny_text_model), "--max-new-tokens", "4"]) == 0
    assert "does not fit" in capsys.readouterr().err and next(lines, None) is None


def test_embed_truncates_a_long_text_to_the_context_as_documented(tiny_text_model):
    from lmforge.embed import embed
    model, tok = lmforge.load(tiny_text_model)
    long = "the quick brown fox " * 200
    a, b = embed(model, tok, [long, long + "jumps over the lazy dog at the very end"])
    assert torch.isfinite(a).all() and torch.allclose(a, b)  # only the first tokens count


# ---- loading never runs code from a checkpoint -----------------------------------------------------
class _Bomb:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a pickle can run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["zip", "legacy pickle"])
def test_a_pickle_bomb_bin_is_refused_without_running(tmp_path, kind):
    from tests.conftest import tiny_hf
    hf = tiny_hf("gpt2")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    bomb = {"transformer.wte.weight": _Bomb(marker)}
    if kind == "zip":
        torch.save(bomb, tmp_path / "pytorch_model.bin")
    else:
        (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(bomb))
    with pytest.raises(ValueError, match=r"pytorch_model.bin: cannot read PyTorch checkpoint"):
        lmforge.load(tmp_path)
    assert not marker.exists()


def test_a_pickle_bomb_training_checkpoint_is_refused_without_running(tmp_path):
    from lmforge.train import checkpoint as ckpt
    marker = tmp_path / "pwned"
    (tmp_path / "checkpoints").mkdir()
    torch.save({"step": 5, "model": _Bomb(marker)}, tmp_path / "checkpoints" / "ckpt-00000005.pt")
    with pytest.raises(ValueError, match=r"no usable checkpoint in .*ckpt-00000005.pt"):
        ckpt.load_latest_state(tmp_path / "checkpoints")
    assert not marker.exists()


def test_no_loader_can_run_code():
    """Every torch.load in lmforge/ passes weights_only=True; nothing unpickles, evals or execs."""
    sources = {p: p.read_text() for p in (ROOT / "lmforge").rglob("*.py")}
    loads = [(p, m) for p, s in sources.items() for m in re.finditer(r"torch\.load\(([^)]*)\)", s)]
    assert loads and all("weights_only=True" in m.group(1) for _, m in loads)
    for p, s in sources.items():
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import marshal)", s, re.M), p
        assert not re.search(r"(?<![.\w])(eval|exec)\(|yaml\.load\(|yaml\.unsafe_load", s), p


# ---- chat templates render in a sandbox --------------------------------------------------------------
ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__['os'].system('touch pwned') }}",
    "{{ raise_exception.__globals__['__builtins__']['open']('pwned', 'w') }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ (messages | first).update({'role': 'system'}) }}",  # the environment is immutable, too
]


@pytest.mark.parametrize("template", ESCAPES)
def test_chat_template_cannot_reach_python_internals(tmp_path, monkeypatch, template):
    from lmforge.chat import render_chat
    monkeypatch.chdir(tmp_path)
    try:
        out = render_chat(template, [{"role": "user", "content": "hi"}])
    except ValueError as e:
        assert str(e).startswith("chat template error:") and re.search(r"unsafe|undefined|not safely", str(e)), e
    else:
        assert not re.search(r"class|module|function|uid=", out), out
    assert list(tmp_path.iterdir()) == []
