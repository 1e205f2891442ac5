"""The generation commands of `lmforge`: generate, chat and serve, their flags derived from
`GenerationConfig`. Imports stay inside the functions, so `lmforge --help` loads no torch."""

from __future__ import annotations

import argparse
import sys


class _Quantize(argparse.Action):
    """--quantize KIND and its alias --int8: sets `quantize` ("int4", "int8" or None) and, for
    what takes only int8 (serve), `int8`; a second, different choice is an error."""

    def __call__(self, parser, namespace, values, option_string=None):
        kind = self.const or values
        if namespace.quantize not in (None, kind):
            given = option_string if self.const else f"{option_string} {kind}"
            parser.error(f"{given} contradicts the earlier {namespace.quantize} (--int8 is --quantize int8)")
        namespace.quantize, namespace.int8 = kind, kind == "int8"


def _quantize_args(s) -> None:
    s.set_defaults(quantize=None, int8=False)
    s.add_argument("--quantize", choices=("int4", "int8"), action=_Quantize,
                   help="4- or 8-bit weights for faster CPU inference (int4: from a GGUF file, its own 4-bit "
                        "blocks); logits move by a few %%")
    s.add_argument("--int8", nargs=0, const="int8", action=_Quantize, help="the same as --quantize int8")


def _generation_args(s, **defaults) -> None:
    """One flag per GenerationConfig field; `defaults` overrides a field's default here."""
    from lmforge.generate.config import add_arguments
    add_arguments(s, **defaults)


def _gen_config(a):
    from lmforge.generate.config import from_arguments
    return from_arguments(a)


def _fit(model, tok, prompt: str, config):
    """config with max_new_tokens clipped to the model's context beside `prompt`, and the note."""
    from lmforge.generate import fit_to_context
    if tok is None:
        raise ValueError("text generation needs a tokenizer saved with the model")
    return fit_to_context(model, len(tok.encode(prompt)), config)


def _cmd_generate(a) -> int:
    from lmforge import api
    config = _gen_config(a)  # bad options fail before the model loads
    model, tok = api.load(a.model, quantize=a.quantize)
    prompt = api.chat_prompt(tok, [{"role": "user", "content": a.prompt}]) if a.chat else a.prompt
    config, note = _fit(model, tok, prompt, config)
    if note:
        print(note, file=sys.stderr)
    if a.stream:
        for piece in api.generate_text(model, tok, prompt, config=config, stream=True):
            print(piece, end="", flush=True)
        print()
    else:
        print(api.generate_text(model, tok, prompt, config=config))
    return 0


def _cmd_chat(a) -> int:
    from lmforge import api
    wanted = _gen_config(a)
    model, tok = api.load(a.model, quantize=a.quantize)
    history = [{"role": "system", "content": a.system}] if a.system else []
    print("chat with the model; /reset clears the history, /quit or Ctrl-D leaves")
    noted = False
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history = history[:1] if a.system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        prompt = api.chat_prompt(tok, history)
        try:
            config, note = _fit(model, tok, prompt, wanted)
            if note and not noted:  # once: the room left shrinks as the history grows
                print(note, file=sys.stderr)
                noted = True
            pieces = api.generate_text(model, tok, prompt, config=config, stream=True)
        except ValueError as e:  # e.g. the history no longer fits: say so, keep the session
            print(f"lmforge chat: error: {e}; /reset clears the history", file=sys.stderr)
            history.pop()
            continue
        reply = ""
        for piece in pieces:
            reply += piece
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": reply})


def _cmd_serve(a) -> int:
    import os

    from lmforge.serve import Limits, serve
    given = dict(max_batch=a.max_batch, max_queue=a.max_queue, max_prompt_tokens=a.max_prompt_tokens,
                 max_new_tokens=a.max_tokens, prefix_cache_mb=a.prefix_cache_mb)
    limits = Limits(**{k: v for k, v in given.items() if v is not None})  # the rest: Limits' defaults
    serve(a.model, host=a.host, port=a.port, quantize=a.quantize, model_name=a.model_name,
          api_key=a.api_key or os.environ.get("LMFORGE_API_KEY") or None, limits=limits,
          max_body_bytes=a.max_body_bytes)
    return 0


def add_commands(sub) -> None:
    """Register `generate`, `chat` and `serve` on the `lmforge` subparsers."""
    s = sub.add_parser("generate", help="generate text (for encoder-decoders the prompt is the source)")
    s.add_argument("model", help="model directory or .gguf file, or a packaged model name")
    s.add_argument("--prompt", required=True)
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    s.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    _quantize_args(s)
    _generation_args(s)
    s.set_defaults(fn=_cmd_generate)

    s = sub.add_parser("chat", help="interactive chat with streaming output and history")
    s.add_argument("model", help="model directory or .gguf file, or a packaged model name")
    s.add_argument("--system", help="system message")
    _quantize_args(s)
    _generation_args(s, max_new_tokens=256)
    s.set_defaults(fn=_cmd_chat)

    s = sub.add_parser("serve", help="HTTP server with OpenAI's API: /v1/completions, /v1/chat/completions, "
                                     "/v1/embeddings, /v1/models; /v1/generate, /health, /metrics")
    s.add_argument("model", help="model directory or .gguf file, or a packaged model name")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model-name", help="the model's name in the API (default: the model directory's name)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health and / "
                                     "(default: $LMFORGE_API_KEY; none: no key)")
    s.add_argument("--max-batch", type=int, help="sequences decoded together (default 16)")
    s.add_argument("--max-queue", type=int, help="requests waiting beyond the batch; more get 429 (default 64)")
    s.add_argument("--max-prompt-tokens", type=int, help="longest prompt taken (default: the model's context)")
    s.add_argument("--max-tokens", type=int, help="largest max_tokens a request may ask (default: the context)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    s.add_argument("--prefix-cache-mb", type=int, help="keys/values of recent prompts kept for the prompts "
                                                       "that start the same way (default 64; 0: none)")
    _quantize_args(s)
    s.set_defaults(fn=_cmd_serve)
