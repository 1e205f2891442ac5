"""lmforge contender. Every call into lmforge's API lives in this module: the generation API
is being reworked, and `lmforge_generate` below is the one place to adapt."""

import contextlib
import time

import torch

import lmforge
from bench.workers.serve import serve, threads
from lmforge.embed import embed as lmforge_embed
from lmforge.generate import GenerationConfig, generate
from lmforge.generate.native import float_fits, native_fits
from lmforge.interop.hf import load_hf
from lmforge.models.heads import LMHead
from lmforge.objectives import causal_lm, masked_lm, seq2seq
from lmforge.train.config import TrainConfig
from lmforge.train.loop import make_optimizer
from lmforge.train.memory import keep_freed_memory

OBJECTIVES = {"gpt2": causal_lm, "bert": masked_lm, "t5": seq2seq}
_models: dict = {}


def lmforge_generate(model, ids: torch.Tensor, new_tokens: int, num_beams: int = 1, top_k: int | None = None,
                     compile: bool = False):
    """Exactly new_tokens per prompt (no EOS): greedy, beam search (num_beams > 1) or top-k
    sampling (seeded), with the compiled step if asked. Returns the number of new tokens of the answers."""
    strategy = "beam" if num_beams > 1 else "sample" if top_k else "greedy"
    config = GenerationConfig(max_new_tokens=new_tokens, strategy=strategy, num_beams=num_beams, top_k=top_k or 0,
                              seed=0 if top_k else None, compile=compile)
    out = generate(model, ids, attention_mask=torch.ones_like(ids), config=config, eos_ids=[])
    return float(sum(len(row) for row in out.tolist()))


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decoding step reads: every linear layer on the decoder's path and
    the LM head (encoder layers and cross-attention k/v run once per generation, not per step)."""
    total = 0
    for name, m in model.named_modules():
        if ".encoder." in f".{name}." or name.endswith(("cross.k", "cross.v")) or name == "lm_head":
            continue
        if isinstance(m, torch.nn.Linear) or type(m).__name__ in ("Int8Linear", "Int4Linear"):
            total += sum(t.numel() * t.element_size() for t in [*m.parameters(False), *m.buffers(False)])
    head = getattr(model, "lm_head", None)
    if isinstance(head, LMHead):
        w = model.backbone.tokens.weight if head.weight is None else head.weight
        total += w.numel() * w.element_size()
    elif head is not None:  # quantised head: its own int8 (or int4) copy and scales
        total += sum(t.numel() * t.element_size() for t in [*head.parameters(), *head.buffers()])
    return total


def _load(path: str, int8: bool = False, quantize: str | None = None):
    """A model from an HF directory or a GGUF file (cached: one per path and precision)."""
    from lmforge.models.quantize import quantize as quantize_model
    from lmforge.models.quantize import quantize_kind
    kind = quantize_kind(quantize, int8)
    key = (path, kind)
    if key not in _models:
        if path.endswith(".gguf"):
            _models[key] = lmforge.load(path, quantize=kind)
        else:
            model = load_hf(path).eval()
            _models[key] = (quantize_model(model, kind) if kind else model), None
    return _models[key]


def train(dir: str, family: str, batch: dict, dtype: str, steps: int, tokens: int):
    """AdamW (lr 1e-4, weight decay 0.01, torch's betas) steps on one fixed batch through lmforge's
    objective, with the optimizer the training loop makes (its parameter groups, fused kernel) and
    the freed memory it keeps for reuse (lmforge.train.memory)."""
    keep_freed_memory()
    model = load_hf(dir).train()
    b = {k: torch.tensor(v) for k, v in batch.items()}
    opt = make_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.01, beta2=0.999), torch.device("cpu"))
    objective = OBJECTIVES[family]
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

    def step():
        with cast:
            loss = objective(model, b)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first_loss = step()

    def run():
        for _ in range(steps):
            step()
        return float(tokens * steps)
    return run, {"first_loss": first_loss}


def decode(dir: str, prompts: list[list[int]], new_tokens: int, num_beams: int = 1, top_k: int | None = None,
           int8: bool = False, compile: bool = False):
    model, _ = _load(dir, int8)
    ids = torch.tensor(prompts)

    def run():
        with torch.inference_mode():
            return lmforge_generate(model, ids, new_tokens, num_beams, top_k, compile)
    step = step_taken(model, len(prompts) * max(1, num_beams), compile)
    return run, {"weight_bytes_per_step": weight_bytes_per_step(model), "step": step,
                 **_compiled_first(run, step == "compiled")}


def step_taken(model, rows: int, compile: bool) -> str:
    """Which decoding step lmforge runs for `rows` unpadded rows: a native one where it applies,
    whatever `compile` says (lmforge.generate.native), else the compiled or the eager one."""
    if rows == 1 and native_fits(model):
        return "native int4"
    if float_fits(model, rows):
        return "native float"
    return "compiled" if compile else "eager"


def _compiled_first(run, compile: bool) -> dict:
    """With the compiled step: run once now, and report how long that took (it compiles)."""
    if not compile:
        return {}
    start = time.perf_counter()
    run()
    return {"first_call_s": round(time.perf_counter() - start, 1)}


def chat_prompt(gguf: str, text: str, repeat: int = 1):
    """The token ids of a one-turn chat prompt (text repeated `repeat` times), with the
    model's own chat template: every contender then gets the very same ids."""
    model, tok = _load(gguf)
    ids = tok.encode(lmforge.api.chat_prompt(tok, [{"role": "user", "content": " ".join([text] * repeat)}]))
    # prompt processing multiplies every weight matrix but the token table (the LM head runs
    # for the last position only): ~2 FLOPs per such weight per prompt token
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "tokens" not in n)
    return (lambda: 0.0), {"ids": ids, "weight_bytes_per_step": weight_bytes_per_step(model),
                           "matmul_params": matmul_params}


def chat(gguf: str, prompt: list[int], new_tokens: int, int8: bool = False, quantize: str | None = None,
         compile: bool = False):
    """Batch-1 greedy decoding of exactly new_tokens (new_tokens=1: prompt processing)."""
    model, _ = _load(gguf, int8, quantize)
    ids = torch.tensor([prompt])

    def run():
        with torch.inference_mode():
            n = lmforge_generate(model, ids, new_tokens, compile=compile)
        return n if new_tokens > 1 else float(len(prompt))
    step = step_taken(model, 1, compile)
    return run, {"weight_bytes_per_step": weight_bytes_per_step(model), "step": step,
                 **_compiled_first(run, step == "compiled")}


def embed(model_dir: str, sentences: list[str], batch_size: int, check: int = 16, dtype: str = "float32"):
    model, tok = lmforge.load(model_dir)
    # the useful work, whoever does it: 2 FLOPs per weight of the layers' linear maps per real
    # token (padding and attention not counted)
    layer_params = sum(m.weight.numel() for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}.")
    tokens = sum(len(tok.encode(s)) for s in sentences)

    def run():
        lmforge_embed(model, tok, sentences, batch_size=batch_size, dtype=dtype)
        return float(len(sentences))
    return run, {"check": lmforge_embed(model, tok, sentences[:check], batch_size=batch_size, dtype=dtype).tolist(),
                 "flops_per_sentence": 2 * layer_params * tokens / len(sentences), "tokens": tokens}


if __name__ == "__main__":
    torch.set_num_threads(threads())
    serve({"train": train, "decode": decode, "chat_prompt": chat_prompt, "chat": chat, "embed": embed})
