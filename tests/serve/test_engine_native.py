"""The engine on an int4 Llama-family model: while one sequence runs it steps through the native
step (lmforge.generate.native), with more it runs the batched step, and every request gets the
tokens `generate` gives it alone with the eager step (LMFORGE_NATIVE_STEP=0), across the
switches between the two."""

import copy

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.generate import GenerationConfig, generate
from lmforge.models import qkernel
from lmforge.models.heads import Model
from lmforge.models.quantize import quantize
from lmforge.serve.engine import Engine, Limits

pytestmark = pytest.mark.skipif(not qkernel.available(), reason="lmforge.models._qkernel was not built here")


@pytest.fixture
def int4_llama(tiny_text_model, monkeypatch):
    """tiny_text_model's tokenizer with a Llama-family model (GQA, a feed-forward of 40), in int4
    on lmforge's kernel."""
    import lmforge
    from lmforge.models import int4
    monkeypatch.setattr(int4, "_native_rows", 16)
    _, tok = lmforge.load(tiny_text_model)
    torch.manual_seed(1)
    cfg = ModelConfig(family="decoder", vocab_size=tok.vocab_size, d_model=64, n_heads=4, n_kv_heads=2,
                      n_decoder_layers=2, d_ff=40, max_len=128, position="rope", norm="rmsnorm",
                      activation="swiglu", bias=False, eos_id=tok.eos_id, bos_id=tok.bos_id)
    model = Model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)  # varied, non-repeating greedy answers
    return quantize(copy.deepcopy(model), "int4"), tok


def eager(model, ids, config, monkeypatch):
    """What `generate` gives alone, eagerly (not through the step under test)."""
    with monkeypatch.context() as m:
        m.setenv("LMFORGE_NATIVE_STEP", "0")
        return generate(model, [ids], config=config).tolist()[0]


def test_one_sequence_steps_natively_and_equals_generate(int4_llama, monkeypatch):
    model, tok = int4_llama
    ids = tok.encode("the quick brown")
    config = GenerationConfig(max_new_tokens=12)
    engine = Engine(model, tok, Limits())
    try:
        text, events = engine.submit(ids, config).result()
        assert engine._batch._native is not None  # the native step ran
    finally:
        engine.close()
    assert [e.token for e in events if e.token is not None] == eager(model, ids, config, monkeypatch)


def test_switching_between_batched_and_native_steps(int4_llama, monkeypatch):
    """Three requests of different lengths: batched steps while two or three run, native ones
    once one is left; each answer is the one `generate` gives alone."""
    model, tok = int4_llama
    prompts = ["the quick brown", "over the lazy dog", "fox jumps"]
    configs = [GenerationConfig(max_new_tokens=n) for n in (4, 9, 16)]
    engine = Engine(model, tok, Limits())
    try:
        reqs = [engine.submit(tok.encode(p), c) for p, c in zip(prompts, configs)]
        got = [[e.token for e in r.result()[1] if e.token is not None] for r in reqs]
        assert engine._batch._native is not None
    finally:
        engine.close()
    for p, c, g in zip(prompts, configs, got):
        assert g == eager(model, tok.encode(p), c, monkeypatch), p
