"""`lmforge generate` and `lmforge chat` on a model with a 128-token context: flags derived from
GenerationConfig, max_new_tokens clipped to the context with a note, --truncate, errors in
the user's terms."""

import pytest

from lmforge.cli import build_parser, main

LONG = "the quick brown fox " * 60  # far more than 128 tokens


def test_every_generation_option_is_a_flag_with_its_default():
    from lmforge.generate.config import FIELDS, GenerationConfig
    for command in ("generate", "chat"):
        args = build_parser().parse_args([command, "m"] + (["--prompt", "x"] if command == "generate" else []))
        for name in FIELDS:
            assert hasattr(args, name), (command, name)
    a = build_parser().parse_args(["generate", "m", "--prompt", "x", "--no-repeat-ngram-size", "3", "--stop", "a",
                                   "--stop", "b", "--early-stopping", "never", "--truncate", "--seed", "4",
                                   "--prefill-chunk", "16"])
    from lmforge.cli_generate import _gen_config
    assert _gen_config(a) == GenerationConfig(no_repeat_ngram_size=3, stop=("a", "b"), early_stopping="never",
                                              truncate=True, seed=4, prefill_chunk=16)
    assert _gen_config(build_parser().parse_args(["chat", "m"])).max_new_tokens == 256


def test_generate_clips_max_new_tokens_to_the_context(tiny_text_model, capsys):
    assert main(["generate", str(tiny_text_model), "--prompt", "the quick", "--max-new-tokens", "500",
                 "--min-new-tokens", "200"]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "max_new_tokens 500 -> 126" in err and "128 tokens" in err
    assert out.endswith("\n")


def test_long_prompts_need_truncate_and_the_error_names_the_flag(tiny_text_model, capsys):
    assert main(["generate", str(tiny_text_model), "--prompt", LONG, "--max-new-tokens", "8"]) == 2
    err = capsys.readouterr().err
    assert "--truncate" in err and "prompt of" in err
    assert main(["generate", str(tiny_text_model), "--prompt", LONG, "--max-new-tokens", "8", "--truncate"]) == 0
    assert not capsys.readouterr().err
    # a too-long answer asked for with a long prompt: half the context stays for the prompt
    assert main(["generate", str(tiny_text_model), "--prompt", LONG, "--max-new-tokens", "500", "--truncate"]) == 0
    assert "max_new_tokens 500 -> 64" in capsys.readouterr().err


def test_chat_works_with_its_defaults_on_a_small_context(tiny_text_model, monkeypatch, capsys):
    lines = iter(["hello there", "and again", LONG, "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", str(tiny_text_model)]) == 0  # max_new_tokens 256 > the 128-token context
    out, err = capsys.readouterr()
    assert err.count("note: max_new_tokens 256 ->") == 1  # said once
    assert "--truncate" in err and "/reset" in err  # the long message is refused, the session goes on
    monkeypatch.setattr("builtins.input", lambda prompt="", _l=iter([LONG, "/quit"]): next(_l))
    assert main(["chat", str(tiny_text_model), "--truncate"]) == 0
    assert "error" not in capsys.readouterr().err


@pytest.mark.parametrize("bad, field", [(["--top-p", "1.5"], "top_p"), (["--num-beams", "3"], "num_beams"),
                                        (["--no-repeat-ngram-size", "-1"], "no_repeat_ngram_size"),
                                        (["--prefill-chunk", "-1"], "prefill_chunk")])
def test_bad_options_are_named(tiny_text_model, capsys, bad, field):
    assert main(["generate", str(tiny_text_model), "--prompt", "x", *bad]) == 2
    assert field in capsys.readouterr().err


def test_quantize_flag_and_its_int8_alias(tiny_text_model, capsys):
    for command in ("generate", "chat", "serve"):
        extra = ["--prompt", "x"] if command == "generate" else []
        for flags, kind in (([], None), (["--int8"], "int8"), (["--quantize", "int8"], "int8"),
                            (["--quantize", "int4"], "int4"), (["--int8", "--quantize", "int8"], "int8")):
            a = build_parser().parse_args([command, "m", *extra, *flags])
            assert (a.quantize, a.int8) == (kind, kind == "int8"), (command, flags)
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "m", *extra, "--int8", "--quantize", "int4"])
        assert "--quantize int4 contradicts the earlier int8" in capsys.readouterr().err
    for kind in ("int4", "int8"):
        assert main(["generate", str(tiny_text_model), "--prompt", "the quick", "--max-new-tokens", "4",
                     "--quantize", kind]) == 0
        assert capsys.readouterr().out.strip()


def test_compile_flag_gives_the_eager_text(tiny_text_model, capsys):
    args = ["generate", str(tiny_text_model), "--prompt", "the quick", "--max-new-tokens", "12"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    assert main([*args, "--compile"]) == 0
    assert capsys.readouterr().out == eager


def test_prefill_chunk_flag_gives_the_one_pass_text(tiny_text_model, monkeypatch, capsys):
    args = ["generate", str(tiny_text_model), "--prompt", "the quick brown fox jumps", "--max-new-tokens", "12"]
    assert main(args) == 0
    one_pass = capsys.readouterr().out
    assert main([*args, "--prefill-chunk", "2"]) == 0
    assert capsys.readouterr().out == one_pass

    def chat(*flags):
        monkeypatch.setattr("builtins.input", lambda prompt="", _l=iter(["hello there", "/quit"]): next(_l))
        assert main(["chat", str(tiny_text_model), "--max-new-tokens", "8", *flags]) == 0
        return capsys.readouterr().out
    assert chat("--prefill-chunk", "3") == chat()
