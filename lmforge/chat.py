"""Render chat conversations with Hugging Face chat templates (Jinja2), as transformers does."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# ChatML, for models that ship no template of their own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters and non-ASCII; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # Templates come from model files, so they are untrusted code: always render in the sandbox.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"invalid chat template (line {e.lineno}): {e.message}") from e


def validate_messages(messages: list[dict]) -> None:
    """Raise ValueError unless `messages` is a list of dicts with string `role` and `content`."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"messages[{i}] has no {key!r} key: {message!r}")
            if not isinstance(message[key], str):
                raise ValueError(f"messages[{i}][{key!r}] must be a string, got {type(message[key]).__name__}")


def render_chat(
    template: str | None,
    messages: list[dict],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **kwargs,
) -> str:
    """Render `messages` with a HF chat template; `template=None` uses `DEFAULT_CHAT_TEMPLATE`.

    Extra keyword arguments (e.g. `unk_token`, `pad_token`, `tools`) are passed to the template,
    the way `tokenizer.apply_chat_template(..., tokenize=False)` passes them.
    """
    validate_messages(messages)
    compiled = _compile(DEFAULT_CHAT_TEMPLATE if template is None else template)
    context = {"tools": None, "documents": None, **kwargs}
    try:
        return compiled.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **context,
        )
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template error: {e}") from e
