"""The engine's prefix cache: what it keeps and drops, and requests that reuse an earlier
prompt's keys and values still give what `generate` gives them alone."""

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.generate import GenerationConfig, generate
from lmforge.models.heads import Model
from lmforge.nn.packed import packing_enabled
from lmforge.serve.engine import Engine, Limits
from lmforge.serve.prefix import PrefixCache, common_prefix


def kv(n: int) -> torch.Tensor:
    """Stand-in keys/values of an n-token prompt: (layers 2, 2, KV 1, n, hd 4), 64 bytes a token."""
    return torch.arange(n, dtype=torch.float32).view(1, 1, 1, n, 1).expand(2, 2, 1, n, 4).clone()


def test_match_takes_the_longest_shared_beginning_but_never_the_last_token():
    cache = PrefixCache(1 << 20)
    cache.add([1, 2, 3, 4, 5], lambda: kv(5))
    cache.add([1, 2, 9], lambda: kv(3))
    assert cache.match([1, 2, 3, 7])[0] == 3
    assert cache.match([1, 2, 9, 9])[0] == 3
    assert cache.match([1, 2, 3, 4, 5])[0] == 4  # the same prompt: its last token is computed again
    assert cache.match([8, 2, 3]) == (0, None)
    m, found = cache.match([1, 2, 3, 4, 6])
    assert m == 4 and torch.equal(found, kv(5))
    assert common_prefix([1, 2, 3], (1, 2, 4, 5)) == 2


def test_add_keeps_one_entry_per_line_of_prompts_and_evicts_the_least_recent():
    cache = PrefixCache(10 * 64)  # room for 10 tokens of kv() (16 floats, 64 bytes each)
    calls = []

    def take(n):
        calls.append(n)
        return kv(n)
    cache.add([1, 2, 3], lambda: take(3))
    cache.add([1, 2], lambda: take(2))  # a kept prompt starts with it: nothing new
    assert list(cache.entries) == [(1, 2, 3)] and calls == [3]
    cache.add([1, 2, 3, 4], lambda: take(4))  # extends the kept one: replaces it
    assert list(cache.entries) == [(1, 2, 3, 4)] and cache.bytes == 4 * 64
    cache.add([5, 6, 7], lambda: take(3))
    cache.match([1, 2, 3, 4, 0])  # used: now the most recent
    cache.add([8, 9, 10, 11], lambda: take(4))  # 11 tokens > 10: the least recent ([5, 6, 7]) goes
    assert set(cache.entries) == {(1, 2, 3, 4), (8, 9, 10, 11)} and cache.bytes == 8 * 64
    cache.add(list(range(20, 40)), lambda: take(20))  # larger than the whole cache: not kept
    assert len(cache) == 2
    few = PrefixCache(1 << 20, max_entries=2)
    for i in range(3):
        few.add([i, i], lambda: kv(2))
    assert list(few.entries) == [(1, 1), (2, 2)]


def test_weights_version_changes_with_any_weight():
    from lmforge.generate.compiled import weights_version
    model = Model(ModelConfig(family="decoder", vocab_size=50, d_model=16, n_heads=2, n_decoder_layers=1,
                              d_ff=16, max_len=32))
    before = weights_version(model)
    assert weights_version(model) == before
    with torch.no_grad():
        model.backbone.tokens.weight[0, 0] += 1  # written in place
    assert weights_version(model) != before
    before = weights_version(model)
    model.backbone.tokens.weight = torch.nn.Parameter(model.backbone.tokens.weight.detach().clone())  # replaced
    assert weights_version(model) != before


@pytest.fixture(scope="module")
def llama_like():
    from lmforge.tokenizer import train_tokenizer_from_iterator
    tok = train_tokenizer_from_iterator([f"a small dog runs after {i} red balls" for i in range(100)],
                                        kind="bpe", vocab_size=300, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(family="decoder", vocab_size=tok.vocab_size, d_model=32, n_heads=4, n_kv_heads=2,
                      n_decoder_layers=2, d_ff=48, max_len=96, eos_id=tok.eos_id, init_std=0.3, position="rope",
                      norm="rmsnorm", activation="swiglu", bias=False)
    return Model(cfg).eval(), tok


SYSTEM = list(range(10, 40))  # 30 tokens every prompt starts with, like a chat template's system message


def test_requests_sharing_a_beginning_reuse_it_and_still_get_their_answer_alone(llama_like):
    model, tok = llama_like
    config = GenerationConfig(max_new_tokens=8)
    prompts = [SYSTEM + [50 + i, 60 + i, 70 + i][: 1 + i % 3] for i in range(6)] + [SYSTEM + [50, 60, 70, 80]]
    engine = Engine(model, tok, Limits(max_batch=4))
    try:
        first = engine.submit(prompts[0], config)
        assert [e.token for e in first.result()[1]] == generate(model, [prompts[0]], config=config).tolist()[0]
        assert engine.stats["cached_prompt_tokens"] == 0
        reqs = [engine.submit(p, config) for p in prompts[1:]]  # more than max_batch: some wait for a slot
        for p, r in zip(prompts[1:], reqs):
            assert [e.token for e in r.result()[1]] == generate(model, [p], config=config).tolist()[0]
        # each of the six reused at least the 30 shared tokens; the last one, prompts[0]'s 31 too
        assert engine.stats["cached_prompt_tokens"] >= 6 * 30
    finally:
        engine.close()


def test_no_reuse_without_the_cache_or_after_a_weight_change(llama_like):
    model, tok = llama_like
    config = GenerationConfig(max_new_tokens=6)
    prompts = [SYSTEM + [50], SYSTEM + [51]]
    engine = Engine(model, tok, Limits(prefix_cache_mb=0))
    try:
        for p in prompts:
            engine.submit(p, config).result()
        assert engine.stats["cached_prompt_tokens"] == 0
    finally:
        engine.close()
    engine = Engine(model, tok, Limits())
    engine._batch.pack = packing_enabled()  # packed weights too must follow the change
    saved = model.state_dict()["backbone.tokens.weight"].clone()
    try:
        engine.submit(prompts[0], config).result()
        with torch.no_grad():  # between two busy periods: the kept keys/values are stale
            model.backbone.tokens.weight.mul_(-1.5)
            for layer in model.backbone.decoder.layers:
                layer.ff.down.weight.mul_(-1)
        got = [e.token for e in engine.submit(prompts[1], config).result()[1]]
        assert got == generate(model, [prompts[1]], config=config).tolist()[0]
        assert engine.stats["cached_prompt_tokens"] == 0
    finally:
        engine.close()
        with torch.no_grad():
            model.backbone.tokens.weight.copy_(saved)
            for layer in model.backbone.decoder.layers:
                layer.ff.down.weight.mul_(-1)
