"""A compiled decoding step: one token per row through the whole model as one Inductor graph.

Eager decoding runs each layer's dozen small ops one by one from Python; at one row a step
of a small model spends more time on that than on reading its weights. `compiled_step`
gives `DecoderState` a step compiled with torch.compile (Inductor, `freezing`: the weights
become constants laid out once for the CPU's GEMM), over a cache of fixed shape (`StaticKV`):
the token is written at a column given as a tensor, attention sees every column with those
not yet written masked, so one graph serves every step of a generation, and of every later
generation with the same batch size and cache length.

The cache length is rounded up to a power of two (`bucket_length`, up to the model's context),
so that generations of nearby lengths share a graph. Compiling takes seconds to minutes (the
first call of each shape pays it); after that a step takes a fraction of the eager one. The
graphs are kept per model, and made anew when a weight changes (`weights_version`). Values
differ from the eager step's in the last bits (other summation orders), so greedy tokens can
differ where two logits are within rounding of each other.
"""

from __future__ import annotations

import os
import types

import torch
import torch.nn as nn

from lmforge.models.int4 import concat_ok
from lmforge.nn.attention import StaticKV
from lmforge.nn.linear import TracedBlocks
from lmforge.nn.measure import bucket

MIN_LENGTH = 64


def weights_version(model: nn.Module) -> tuple:
    """Changes when any weight does: another tensor, or one written in place (torch counts each
    tensor's in-place writes)."""
    return tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))


def bucket_length(n: int, context: int) -> int:
    """The cache length of a generation that needs n positions: the next power of two from
    `MIN_LENGTH` on, at most the model's context (n itself when that is less). A chat whose
    history grows compiles a few times (64, 128, 256, ...), not once per turn; attention reads
    at most twice the columns it needs."""
    return max(n, min(context, max(MIN_LENGTH, bucket(n))))


def _make_step(model: nn.Module, blocked: bool):
    """The step of `model` as a closure: torch.compile then sees its weights as parameters
    (which `freezing` turns into constants), not as inputs."""
    blocks = TracedBlocks() if blocked else None

    def step(kv, at, tokens, positions, key_mask, memory, memory_mask, cross, rel_bias):
        """One decoding step over a `StaticKV` of `kv`: the next-token logits (B, V) in float32.
        key_mask (B, max_len): 1 where a row's column holds a real token once written."""
        cache = StaticKV(kv, at.view(1), cross, rel_bias, blocks)
        columns = torch.arange(cache.max_len, device=at.device)
        mask = key_mask * (columns <= at)
        hidden = model.backbone.decode(tokens.view(-1, 1), memory=memory, memory_mask=memory_mask,
                                       attention_mask=mask, position_ids=positions, cache=cache)
        return model.logits(hidden)[:, 0].float()
    return step


def compiled_step(model: nn.Module, shape: tuple):
    """The model's compiled step for this shape (batch, cache length, ...), compiled at its first
    call. Every graph of the model is dropped when one of its weights has changed."""
    version = weights_version(model)
    kept = model.__dict__.get("_compiled_steps")  # kept on the model: they live and die with it
    if kept is None or kept[0] != version:
        kept = model.__dict__["_compiled_steps"] = (version, {})
    steps = kept[1]
    if shape not in steps:
        concat_ok()  # measured now, eagerly: the trace reads its answer
        # a code object of its own: torch.compile caches graphs per code object, and this one
        # holds one graph, for one model, shape and set of weights (frozen into it)
        fn = _make_step(model, os.environ.get("LMFORGE_TRACED_BLOCKS", "1") != "0")
        code = fn.__code__.replace(co_name=f"step_{len(steps)}")
        fn = types.FunctionType(code, fn.__globals__, code.co_name, None, fn.__closure__)
        steps[shape] = _frozen(torch.compile(fn, fullgraph=True, dynamic=False))
    return steps[shape]


def _frozen(compiled):
    """Calls `compiled` with Inductor's freezing on (read from the global config when it compiles;
    torch.compile's `options` do not reach it). After the first call its guards are not
    evaluated: its code object holds this one graph, and `compiled_step`'s key (shape, weights)
    already says it is the right one; checking every weight's guard took 0.3 ms a step. Should
    an input differ in a way the key does not see (dynamo then refuses to run the graph
    unchecked), this and every later call evaluate the guards."""
    first, checked = True, False

    def call(*args):
        nonlocal first, checked
        skip, first = not first and not checked, False
        with torch._inductor.config.patch(freezing=True):
            if skip:
                try:
                    with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                        return compiled(*args)
                except RuntimeError as e:
                    if "skip_guard_eval_unsafe" not in str(e):
                        raise
                    checked = True
            return compiled(*args)
    return call
