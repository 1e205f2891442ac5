"""The request bodies of the server, and the OpenAI shapes of what it returns.

OpenAI's fields mean what they mean there: max_tokens (chat also max_completion_tokens),
temperature (0: greedy, > 0: sampling; default 1 as OpenAI's), top_p, n, stop, seed, stream,
stream_options.include_usage, logprobs/top_logprobs. lmforge adds top_k, min_p,
repetition_penalty, no_repeat_ngram_size, min_new_tokens, num_beams (> 1: beam search, not
streamed), length_penalty, early_stopping and truncate.

Other fields are accepted when they ask for nothing this server would have to do: the
informational ones (`user`, `metadata`, ...) with any value, any other with a neutral
value (null, false, 0, "", [], {}, or OpenAI's default such as best_of 1 or
response_format {"type": "text"}). A field with any other value is a 400 naming it, so a
request is never silently answered differently from what it asked (presence_penalty 0.5,
echo true, a misspelt max_token ...).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from lmforge.generate.config import FIELDS, GenerationConfig
from lmforge.serve.errors import bad_value

INFORMATIONAL = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls",
                           "prompt_cache_key", "safety_identifier"})
OPENAI_DEFAULTS = {"best_of": (1,), "response_format": ({"type": "text"},), "tool_choice": ("none", "auto"),
                   "function_call": ("none", "auto"), "modalities": (["text"],)}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    """The fields the completions and chat endpoints share."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # lmforge's own
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    num_beams: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    truncate: bool = False


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=20)


class ChatRequest(_Request):
    messages: list[dict]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    normalize: bool = True  # lmforge's own: unit-length vectors (cosine similarity = dot product)


# options the server decides for every request, not a request: its engine batches the steps
# of all running requests itself and runs their prompts as it schedules them (`compile` and
# `prefill_chunk` apply to `generate` and `chat`)
SERVER_CHOSEN = ("compile", "prefill_chunk")


def generate_request_model():
    """The body of lmforge's own /v1/generate: a prompt, stream, and one field per
    `GenerationConfig` option (its type, default and help). GenerationConfig checks the values."""
    hints, fields = typing.get_type_hints(GenerationConfig), {}
    for f in dataclasses.fields(GenerationConfig):
        if f.name in SERVER_CHOSEN:
            continue
        kind, default = hints[f.name], f.default
        if typing.get_origin(kind) is tuple:
            kind, default = list[str], list(default)
        fields[f.name] = (kind, Field(default, description=f.metadata["help"]))
    return create_model("GenerateRequest", prompt=(str, ...), stream=(bool, False), **fields)


def check_extras(r: BaseModel) -> None:
    """400 for an unknown field that asks for something (see the module docstring)."""
    for name, value in (r.model_extra or {}).items():
        if name in INFORMATIONAL or _neutral(value) or value in OPENAI_DEFAULTS.get(name, ()):
            continue
        raise bad_value(f"{name}={value!r} is not supported by this server; leave it out (or at its default)", name)


def _neutral(value) -> bool:
    """null, false, a zero, or empty: a value that asks for nothing."""
    if value is None or value is False:
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    return isinstance(value, (str, list, dict)) and not value


def generation_config(r: _Request, max_new_tokens: int, seed: int | None) -> GenerationConfig:
    """The GenerationConfig an OpenAI-style request asks for (400 naming the field if invalid)."""
    beam = r.num_beams is not None and r.num_beams > 1
    if r.num_beams is not None and r.num_beams < 1:
        raise bad_value(f"num_beams must be >= 1, got {r.num_beams}", "num_beams")
    options = dict(max_new_tokens=max_new_tokens, strategy="beam" if beam else "sample" if r.temperature > 0 else
                   "greedy", num_beams=r.num_beams if beam else None, num_return_sequences=r.n if beam else 1,
                   temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, min_p=r.min_p,
                   repetition_penalty=r.repetition_penalty, no_repeat_ngram_size=r.no_repeat_ngram_size,
                   min_new_tokens=r.min_new_tokens, seed=seed, truncate=r.truncate,
                   stop=() if r.stop is None else (r.stop,) if isinstance(r.stop, str) else tuple(r.stop),
                   length_penalty=r.length_penalty, early_stopping=r.early_stopping)
    try:
        return GenerationConfig(**options)
    except ValueError as e:
        raise value_error(e, r) from None


def value_error(e: Exception, r: BaseModel | None = None):
    """A ValueError from the generation code as a 400, in OpenAI's words (max_tokens), naming
    the request field its message is about."""
    message = str(e)
    if isinstance(r, _Request):
        message = message.replace("max_new_tokens", "max_tokens").replace("num_return_sequences", "n")
    names = sorted(type(r).model_fields if r is not None else (*FIELDS, "max_tokens", "n"), key=len, reverse=True)
    if re.match(r"(the |empty )?prompt", message):  # about the prompt, whatever else it mentions
        param = "messages" if isinstance(r, ChatRequest) else "prompt"
    else:
        param = next((n for n in names if re.search(rf"\b{re.escape(n)}\b", message)), None)
    return bad_value(message, param)


def message_text(messages: list[dict]) -> list[dict]:
    """Chat messages with their content as a string (OpenAI's text parts joined); 400 when empty
    or malformed."""
    if not messages:
        raise bad_value("messages is empty: send at least one message", "messages")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad_value(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if content is None and m.get("role") == "assistant":
            content = ""
        if not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise bad_value(f"messages[{i}] needs a string 'role' and a string (or text parts) 'content'",
                            f"messages[{i}]")
        out.append({**m, "content": content})
    return out


# ---- log-probabilities ------------------------------------------------------------------------
def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def completion_logprobs(tokenizer, events, offset: int) -> dict:
    """OpenAI's legacy completions logprobs of `events` (each carrying a token); text_offset
    counts characters from the start of the prompt, whose length is `offset`."""
    tokens, offsets = [], []
    for e in events:
        offsets.append(offset)
        tokens.append(token_text(tokenizer, e.token))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [None if e.top_logprobs is None else
                             {token_text(tokenizer, t): lp for t, lp in e.top_logprobs} for e in events],
            "text_offset": offsets}


def chat_logprobs(tokenizer, events) -> dict:
    """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""
    def entry(token: int, logprob: float) -> dict:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(e.token, e.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in (e.top_logprobs or [])]} for e in events]}
