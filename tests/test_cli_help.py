"""The CLI explains itself: --version, bare `lmforge`, defaults in every --help, help without torch,
and errors that name the file, line, extension or preset in the user's terms."""

import argparse
import json
import os
import subprocess
import re
import sys

import pytest

import lmforge
from lmforge.cli import build_parser, main
from lmforge.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parsers(parser, path=()):
    """(argv prefix, parser) for the root and every subcommand, nested ones included."""
    yield list(path), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"lmforge {lmforge.__version__}"
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = f.read()  # the one place the version is written is lmforge/__init__.py
    assert not re.search(r"^version\s*=\s*[\"']", pyproject, re.M)
    assert 'dynamic = ["version"]' in pyproject and 'version = {attr = "lmforge.__version__"}' in pyproject


def test_bare_command_prints_the_full_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lmforge") and "pretrain" in out and "embed" in out and "--version" in out
    with pytest.raises(SystemExit) as e:  # a command group without its action: its own help, not just usage
        main(["index"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "build" in err and "embed documents" in err


def test_every_help_shows_the_defaults():
    checked = 0
    for path, parser in _parsers(build_parser()):
        text = " ".join(parser.format_help().split())  # undo line wrapping
        for action in parser._actions:
            d = action.default
            if action.nargs == 0 or d in (None, [], "") or d is argparse.SUPPRESS:
                continue
            if action.help and "default" in action.help.lower() and "%(default)" not in action.help:
                continue  # the help says it in words
            assert f"(default: {d})" in text, f"lmforge {' '.join(path)} --help: {action.dest} hides default {d!r}"
            checked += 1
    assert checked >= 20  # batch sizes, sampling options, ports, ...
    chat = next(s for p, s in _parsers(build_parser()) if p == ["chat"])
    assert "(default: 256)" in " ".join(chat.format_help().split())  # chat's own max_new_tokens


def test_help_and_import_do_not_load_torch():
    helps = [p + ["--help"] for p, _ in _parsers(build_parser())]
    code = f"""
import sys
import lmforge
assert "torch" not in sys.modules, "import lmforge loaded torch"
from lmforge.cli import main
assert main([]) == 0
for argv in {json.dumps(helps)} + [["--version"]]:
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
heavy = sorted(m for m in ("torch", "numpy", "tokenizers", "transformers") if m in sys.modules)
assert not heavy, heavy
print("ok", len({json.dumps(helps)}))
"""
    r = _run_python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(f"ok {len(helps)}")


def test_lazy_package_names_still_work():
    r = _run_python("import sys, lmforge\n"
                    "assert 'torch' not in sys.modules\n"
                    "assert 'gpt-tiny' in lmforge.PRESETS and 'load' in dir(lmforge)\n"
                    "assert 'torch' not in sys.modules\n"
                    "from lmforge import Model, build_model, describe, save, load, ModelConfig\n"
                    "assert lmforge.load is load is lmforge.api.load\n"
                    "import lmforge as L\n"
                    "assert L.api.chat_prompt  # a submodule by attribute, as before\n"
                    "try:\n    lmforge.no_such_name\nexcept AttributeError as e:\n    print(e)\n")
    assert r.returncode == 0, r.stderr
    assert "no attribute 'no_such_name'" in r.stdout


def test_unknown_preset_lists_the_presets(capsys):
    with pytest.raises(ValueError, match=r"unknown preset 'gpt-tinny'; did you mean 'gpt-tiny'\? available: .*llama-tiny"):
        ModelConfig.preset("gpt-tinny")
    assert main(["info", "gpt-tinny"]) == 2
    err = capsys.readouterr().err
    assert "gpt-tinny: no such model directory" in err and "did you mean 'gpt-tiny'" in err and "bert-tiny" in err
    assert main(["info", "gpt-tiny"]) == 0
    assert "parameters:" in capsys.readouterr().out


def test_embed_refuses_an_unknown_extension_before_loading(tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("a line\n")
    for out in ("x.txt", "x.parquet", "x"):
        # the model does not exist: the extension must be refused first, naming the accepted ones
        assert main(["embed", str(tmp_path / "no-model"), "--input", str(texts), "--out", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        ext = os.path.splitext(out)[1]
        assert (f"extension '{ext}'" if ext else "no extension") in err
        assert ".npy, .jsonl, .csv, .tsv" in err and "no-model" not in err
        assert not (tmp_path / out).exists()


def test_embed_errors_name_the_file_and_line(tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("first line\ncaf\u00e9 au lait\n".encode("latin-1"))
    out = tmp_path / "e.csv"
    assert main(["embed", str(tmp_path / "no-model"), "--input", str(latin1), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "latin1.txt is not valid UTF-8: line 2, byte offset 14" in err and not out.exists()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"text": ""}\n')
    assert main(["embed", str(tmp_path / "no-model"), "--input", str(rows), "--out", str(out)]) == 2
    assert "rows.jsonl:2: empty 'text'" in capsys.readouterr().err
    assert main(["similarity", str(tmp_path / "no-model"), "a cat", " "]) == 2
    assert "TEXT_B is empty" in capsys.readouterr().err
