"""Property (Hypothesis): whatever the model, the batch limit, the arrival steps, the order
of submission, the beginnings prompts share (which the prefix cache reuses) and the weights'
layout (oneDNN-packed or not), every engine request gets exactly its own greedy `generate` answer."""

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.config import ModelConfig
from lmforge.generate import GenerationConfig, generate
from lmforge.models.heads import Model
from lmforge.nn.packed import packing_enabled
from lmforge.serve.engine import Engine, Limits
from tests.serve.test_engine import submit_at

# gpt2-like (learned positions, LayerNorm, biases), llama-like (rope, GQA, RMSNorm, SwiGLU, no
# biases), and sinusoidal positions with multi-query attention
SHAPES = {
    "gpt2": dict(position="learned", norm="layernorm", activation="gelu", n_kv_heads=4),
    "llama": dict(position="rope", norm="rmsnorm", activation="swiglu", bias=False, n_kv_heads=2,
                  tie_embeddings=False),
    "sinusoidal-mqa": dict(position="sinusoidal", norm="layernorm", activation="gelu", n_kv_heads=1),
}


@pytest.fixture(scope="module")
def tok():
    from lmforge.tokenizer import train_tokenizer_from_iterator
    return train_tokenizer_from_iterator([f"a small dog runs after {i} red balls" for i in range(100)],
                                         kind="bpe", vocab_size=300, progress=False)


@functools.lru_cache(maxsize=None)
def model_for(shape: str, layers: int, vocab: int, eos: int) -> Model:
    torch.manual_seed(layers)
    # init_std 0.3: logits far apart, so a near tie cannot hide a real difference nor flip
    cfg = ModelConfig(family="decoder", vocab_size=vocab, d_model=32, n_heads=4, n_decoder_layers=layers,
                      d_ff=48, max_len=64, eos_id=eos, init_std=0.3, **SHAPES[shape])
    return Model(cfg).eval()


@st.composite
def workloads(draw):
    n = draw(st.integers(1, 7))
    shared = draw(st.lists(st.integers(3, 10_000), max_size=20))  # a beginning some prompts share (prefix cache)
    requests = [dict(prompt=shared[:draw(st.integers(0, len(shared)))]
                     + draw(st.lists(st.integers(3, 10_000), min_size=1, max_size=14)),  # ids mod vocab
                     max_new=draw(st.integers(1, 14)), step=draw(st.integers(0, 12)),
                     min_new=draw(st.sampled_from([0, 0, 3]))) for _ in range(n)]
    order = draw(st.permutations(range(n)))
    return (draw(st.sampled_from(sorted(SHAPES))), draw(st.integers(1, 2)), draw(st.integers(1, 4)), requests, order,
            draw(st.booleans()))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=workloads())
def test_every_request_gets_its_greedy_answer_alone(tok, case):
    shape, layers, max_batch, requests, order, packed = case
    model = model_for(shape, layers, tok.vocab_size, tok.eos_id)
    engine = Engine(model, tok, Limits(max_batch=max_batch, max_queue=100))
    engine._batch.pack = packed and packing_enabled()  # oneDNN-packed weights or not, whatever pays here
    try:
        futures = {}
        prompts = [[3 + t % (tok.vocab_size - 3) for t in r["prompt"]] for r in requests]
        for i in order:  # submitted in a random order, each at its own step
            r = requests[i]
            config = GenerationConfig(max_new_tokens=r["max_new"], min_new_tokens=r["min_new"])
            futures[i] = (config, submit_at(engine, r["step"], prompts[i], config))
        for i, (config, future) in futures.items():
            events = future.result(30).result()[1]
            want = generate(model, [prompts[i]], config=config).tolist()[0]
            assert [e.token for e in events] == want
            assert events[-1].finish_reason == ("stop" if want[-1] == tok.eos_id else "length")
        assert engine.stats["batch_tokens"] <= max_batch * engine.stats["steps"]
    finally:
        engine.close()
