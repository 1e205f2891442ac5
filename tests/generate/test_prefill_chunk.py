"""Chunked prefill (`prefill_chunk`): the prompt run a few positions at a time through the KV
cache gives the one-pass first logits (within float rounding), the same cache and the same
greedy tokens, for learned (GPT-2) and rotary (Llama) positions, with and without left
padding (whole chunks of padding included), for compiled states too; encoder-decoders
ignore it; a bad value is an error that names the option."""

import pytest
import torch

from lmforge.generate import GenerationConfig, generate
from lmforge.generate.state import DecoderState
from tests.generate.test_generate import pairs  # noqa: F401  (a fixture)

NEW = 10
CHUNKS = [1, 3, 7, 64]  # 64: more than the prompt, one pass
TIGHT = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def models(pairs):
    """arch -> our tiny model of that family (test_generate's, with its varied weights)."""
    return lambda arch: pairs(arch)[1]


def _prompts(model, padded: bool, length: int = 16):
    """(3, length) random prompts; padded: rows 1 and 2 have 3 and 9 pads on the left (row 2's
    first chunks of 1, 3 and 7 positions are all padding)."""
    ids = torch.randint(3, 99, (3, length), generator=torch.Generator().manual_seed(7))
    if not padded:
        return ids, None
    mask = torch.ones_like(ids)
    pad = model.cfg.pad_id if model.cfg.pad_id is not None else 0
    for row, n in ((1, 3), (2, 9)):
        ids[row, :n], mask[row, :n] = pad, 0
    return ids, mask


def _real_kv(state, mask, S):
    """Each layer's cached keys and values at the prompt's real positions: (N_real, KV, hd) each.
    Padded positions are left out: their keys are masked, whatever the cache holds there."""
    keep = torch.ones(state.cache.batch, S, dtype=torch.bool) if mask is None else mask.bool()
    return [t[:, :, :S].transpose(1, 2)[keep] for kv in state.cache.kv for t in kv]


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_chunked_prefill_equals_one_pass(models, arch, padded):
    model = models(arch)
    ids, mask = _prompts(model, padded)
    whole, first = DecoderState.prefill(model, ids, mask, NEW)
    tokens = first.argmax(-1)
    after = whole.step(tokens)
    want = generate(model, ids, mask, max_new_tokens=NEW, eos_ids=[]).sequences
    for chunk in CHUNKS:
        state, logits = DecoderState.prefill(model, ids, mask, NEW, chunk=chunk)
        torch.testing.assert_close(logits, first, **TIGHT, msg=lambda m: f"chunk={chunk}: {m}")
        assert state.cache.pos == ids.shape[1]
        for a, b in zip(_real_kv(state, mask, ids.shape[1]), _real_kv(whole, mask, ids.shape[1])):
            torch.testing.assert_close(a, b, **TIGHT)
        torch.testing.assert_close(state.step(tokens), after, **TIGHT)  # the positions go on from there
        got = generate(model, ids, mask, max_new_tokens=NEW, eos_ids=[], prefill_chunk=chunk).sequences
        assert torch.equal(got, want), f"chunk={chunk}"


def test_chunk_larger_than_the_prompt_is_the_one_pass_bit_for_bit(models):
    model = models("llama")
    ids, mask = _prompts(model, padded=True)
    _, first = DecoderState.prefill(model, ids, mask, NEW)
    for chunk in (0, None, ids.shape[1], 64):
        assert torch.equal(DecoderState.prefill(model, ids, mask, NEW, chunk=chunk)[1], first), chunk


def test_chunked_prefill_of_a_compiled_state(models):
    """The prompt runs eagerly into the compiled step's per-layer cache; the compiled steps go on
    from the same keys and values."""
    model = models("gpt2")
    ids, mask = _prompts(model, padded=True)
    whole, first = DecoderState.prefill(model, ids, mask, NEW)
    state, logits = DecoderState.prefill(model, ids, mask, NEW, compiled=True, chunk=3)
    torch.testing.assert_close(logits, first, **TIGHT)
    for a, b in zip(_real_kv(state, mask, ids.shape[1]), _real_kv(whole, mask, ids.shape[1])):
        torch.testing.assert_close(a, b, **TIGHT)
    eager = generate(model, ids, mask, max_new_tokens=NEW, eos_ids=[]).sequences
    compiled = generate(model, ids, mask, max_new_tokens=NEW, eos_ids=[], compile=True, prefill_chunk=3)
    assert torch.equal(compiled.sequences, eager)


def test_beam_search_and_lists_of_prompts_take_the_option(models):
    model = models("llama")
    ids, mask = _prompts(model, padded=True)
    beam = dict(strategy="beam", num_beams=3, num_return_sequences=2, max_new_tokens=NEW, eos_ids=[])
    want = generate(model, ids, mask, **beam)
    got = generate(model, ids, mask, prefill_chunk=4, **beam)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.scores, want.scores, **TIGHT)
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]  # padded here
    assert generate(model, rows, max_new_tokens=NEW, prefill_chunk=2).tolist() == \
        generate(model, rows, max_new_tokens=NEW).tolist()


def test_encoder_decoders_ignore_it(models):
    model = models("t5")
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(2))
    want = generate(model, ids, max_new_tokens=6, eos_ids=[]).sequences
    assert torch.equal(generate(model, ids, max_new_tokens=6, eos_ids=[], prefill_chunk=2).sequences, want)


def test_bad_values_name_the_option(models):
    assert GenerationConfig(prefill_chunk=None).prefill_chunk == 0  # None: one pass, like 0
    assert GenerationConfig().prefill_chunk == 0
    for bad in (-1, 2.5, "8", True):
        with pytest.raises(ValueError, match=rf"prefill_chunk must be an int >= 0 .*got {bad!r}"):
            GenerationConfig(prefill_chunk=bad)
    model = models("gpt2")
    with pytest.raises(ValueError, match="prefill_chunk must be an int >= 0"):
        generate(model, [[5, 6, 7]], max_new_tokens=2, prefill_chunk=-3)
    with pytest.raises(ValueError, match="prefill_chunk must be an int >= 0"):
        DecoderState.prefill(model, torch.tensor([[5, 6, 7]]), None, 2, chunk=-3)
