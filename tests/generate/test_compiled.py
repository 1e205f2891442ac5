"""The compiled decoding step (`compile=True`, lmforge.generate.compiled) against the eager one:
the same greedy tokens and beam hypotheses on tiny models of each family (padded batches,
rotary and learned positions, relative bias, cross-attention), the same logits within
rounding, graphs made anew when a weight changes, and the option's errors.

The native steps (lmforge.generate.native), which take the place of both where they apply, are
off here (tests/generate/test_float_step.py checks them against the eager step).

Each compile takes seconds on two cores: one family (GPT-2) and T5's relative bias and
cross-attention run in the default suite, the other families with -m slow.
"""

import copy

import pytest
import torch

from lmforge.generate import GenerationConfig, generate
from lmforge.generate.compiled import bucket_length
from lmforge.generate.state import DecoderState
from tests.generate.test_generate import pairs, prompts  # noqa: F401  (pairs: a fixture)

NEW = 10


@pytest.fixture(autouse=True)
def no_native_step(monkeypatch):
    monkeypatch.setenv("LMFORGE_NATIVE_STEP", "0")


@pytest.fixture(scope="module")
def models(pairs):
    """arch -> our tiny model of that family (test_generate's, with its varied weights)."""
    return lambda arch: pairs(arch)[1]


def _same_as_eager(model, **options):
    ids, mask = prompts(model)
    eager = generate(model, ids, mask, max_new_tokens=NEW, eos_ids=[], **options)
    compiled = generate(model, ids, mask, max_new_tokens=NEW, eos_ids=[], compile=True, **options)
    assert torch.equal(compiled.sequences, eager.sequences)
    if eager.scores is not None:
        torch.testing.assert_close(compiled.scores, eager.scores, rtol=1e-4, atol=1e-4)
    return compiled


def test_compiled_step_logits_equal_the_eager_ones(models):
    model = models("gpt2")
    ids, mask = prompts(model)
    eager, first = DecoderState.prefill(model, ids, mask, NEW)
    compiled, first_c = DecoderState.prefill(model, ids, mask, NEW, compiled=True)
    assert compiled.cache.max_len == bucket_length(ids.shape[1] + NEW, model.cfg.max_len)
    torch.testing.assert_close(first_c, first)
    tokens = first.argmax(-1)
    for _ in range(4):
        a, b = eager.step(tokens), compiled.step(tokens)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        tokens = a.argmax(-1)
    assert compiled.cache.pos == eager.cache.pos


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_compiled_greedy_and_beam_equal_eager(models, arch):
    _same_as_eager(models(arch))
    _same_as_eager(models(arch), strategy="beam", num_beams=3, num_return_sequences=2)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "bart", "marian"])
def test_compiled_equals_eager_other_families(models, arch):
    _same_as_eager(models(arch))
    _same_as_eager(models(arch), strategy="sample", seed=5, top_k=20)


def test_a_weight_change_recompiles(models):
    """Freezing bakes the weights into the graph: after a change the graph must be a new one."""
    model = models("gpt2")
    ids, mask = prompts(model)
    before = generate(model, ids, mask, max_new_tokens=NEW, eos_ids=[], compile=True).sequences
    with torch.no_grad():
        model.backbone.decoder.layers[0].ff.up.weight.mul_(-1.5)
    try:
        eager = generate(model, ids, mask, max_new_tokens=NEW, eos_ids=[]).sequences
        after = generate(model, ids, mask, max_new_tokens=NEW, eos_ids=[], compile=True).sequences
        assert not torch.equal(eager, before)  # the change matters
        assert torch.equal(after, eager)
    finally:
        with torch.no_grad():
            model.backbone.decoder.layers[0].ff.up.weight.div_(-1.5)


def test_bucket_length():
    assert bucket_length(1, 512) == 64 and bucket_length(64, 512) == 64 and bucket_length(65, 512) == 128
    assert bucket_length(129, 4096) == 256 and bucket_length(1025, 4096) == 2048
    assert bucket_length(100, 80) == 100  # never below what is needed
    assert bucket_length(70, 100) == 100  # nor above the context when the need fits in it


def test_compile_option_errors():
    with pytest.raises(ValueError, match="compile must be True or False"):
        GenerationConfig(compile="yes")
    with pytest.raises(ValueError, match="compile and prompt_lookup"):
        GenerationConfig(compile=True, prompt_lookup=3)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_compiled_quantised_steps_stay_close(models, kind):
    """int8/int4 products round their activations (to bfloat16, or to int16 in lmforge's kernel),
    and the graph may round at other places: the logits stay within that rounding, not bit for bit."""
    from lmforge.models.quantize import quantize
    model = quantize(copy.deepcopy(models("llama") if kind == "int4" else models("gpt2")), kind)  # in place
    ids, mask = prompts(model)
    eager, first = DecoderState.prefill(model, ids, mask, NEW)
    compiled, _ = DecoderState.prefill(model, ids, mask, NEW, compiled=True)
    tokens = first.argmax(-1)
    for _ in range(3):
        a, b = eager.step(tokens), compiled.step(tokens)
        assert (b - a).norm() <= 0.02 * a.norm(), f"{kind}: compiled logits off by {(b - a).norm() / a.norm():.2%}"
        tokens = a.argmax(-1)
