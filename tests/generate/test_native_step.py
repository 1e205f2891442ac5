"""The native decoding step (lmforge.generate.native, `qstep.c`) against the eager one on the
same int4 model: a tiny Llama (GQA, a feed-forward width of 37, which no block or row group
divides), the same logits within float rounding, the same greedy tokens; where it applies and
where the state steps as before (batches, padding, beam search, other families, no kernel);
and the kernel's argument checks."""

import copy

import pytest
import torch

from lmforge.generate import generate
from lmforge.generate.native import NativeStep, native_fits
from lmforge.generate.state import DecoderState
from lmforge.models import qkernel
from lmforge.models.quantize import quantize
from tests.generate.test_generate import pairs, prompts  # noqa: F401  (pairs: a fixture)

pytestmark = pytest.mark.skipif(not qkernel.available(), reason="lmforge.models._qkernel was not built here")


@pytest.fixture
def int4_llama(pairs, monkeypatch):
    from lmforge.models import int4
    monkeypatch.setattr(int4, "_native_rows", 16)  # lmforge's kernel, whatever this CPU measures
    return quantize(copy.deepcopy(pairs("llama")[1]), "int4")


def _one_prompt(model, length=9):
    return prompts(model, batch=1, length=length)[0]


def _eager(monkeypatch):
    monkeypatch.setenv("LMFORGE_NATIVE_STEP", "0")


def test_native_logits_equal_the_eager_ones(int4_llama, monkeypatch):
    ids = _one_prompt(int4_llama)
    native, first = DecoderState.prefill(int4_llama, ids, None, 12)
    assert isinstance(native._native, NativeStep)
    _eager(monkeypatch)
    eager, first_eager = DecoderState.prefill(int4_llama, ids, None, 12)
    assert eager._native is None
    torch.testing.assert_close(first, first_eager)  # the prompt runs eagerly in both
    tokens = first.argmax(-1)
    for _ in range(11):
        a, b = eager.step(tokens), native.step(tokens)
        # not bit for bit: another summation order moves an input of a product across the edge of
        # an int16 code (qkernel), which alone moves these logits by up to ~5e-5 of their norm
        assert (b - a).norm() <= 1e-3 * a.norm(), f"native logits off by {(b - a).norm() / a.norm():.2e}"
        tokens = a.argmax(-1)
    assert native.cache.pos == eager.cache.pos == ids.shape[1] + 11
    torch.testing.assert_close(native.cache.buf, eager.cache.buf, rtol=1e-3, atol=1e-3)  # the same keys, values


def test_native_greedy_and_sampling_equal_eager(int4_llama, monkeypatch):
    ids = _one_prompt(int4_llama)
    native = [generate(int4_llama, ids, max_new_tokens=20, eos_ids=[]),
              generate(int4_llama, ids, max_new_tokens=20, eos_ids=[], strategy="sample", top_k=5, seed=3),
              generate(int4_llama, ids, max_new_tokens=20, eos_ids=[], compile=True)]  # native wins over compiling
    _eager(monkeypatch)
    eager = [generate(int4_llama, ids, max_new_tokens=20, eos_ids=[]),
             generate(int4_llama, ids, max_new_tokens=20, eos_ids=[], strategy="sample", top_k=5, seed=3)]
    assert native[0].tolist() == eager[0].tolist() == native[2].tolist()
    assert native[1].tolist() == eager[1].tolist()


def test_prompt_lookup_mixes_native_steps_and_eager_passes(int4_llama, monkeypatch):
    """Prompt lookup checks its guesses in eager passes over the same cache and rewinds it; the
    native steps between them write and read that cache at its position: the greedy tokens."""
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])  # a repeating prompt: guesses to check
    looked = generate(int4_llama, ids, max_new_tokens=16, eos_ids=[], prompt_lookup=3)
    _eager(monkeypatch)
    assert looked.tolist() == generate(int4_llama, ids, max_new_tokens=16, eos_ids=[]).tolist()


def test_beam_search_leaves_the_native_step(int4_llama, monkeypatch):
    """Beam search makes rows of the cache after the prompt: the state then steps eagerly."""
    ids = _one_prompt(int4_llama)
    beams = generate(int4_llama, ids, max_new_tokens=8, eos_ids=[], strategy="beam", num_beams=3)
    _eager(monkeypatch)
    eager = generate(int4_llama, ids, max_new_tokens=8, eos_ids=[], strategy="beam", num_beams=3)
    assert beams.tolist() == eager.tolist()
    torch.testing.assert_close(beams.scores, eager.scores)


def test_where_it_applies(int4_llama, pairs, monkeypatch):
    ids, mask = prompts(int4_llama)  # three rows, two of them left-padded
    assert DecoderState.prefill(int4_llama, ids, mask, 4)[0]._native is None
    assert DecoderState.prefill(int4_llama, ids[:1], None, 4)[0]._native is not None
    assert DecoderState.prefill(int4_llama, ids[1:2], mask[1:2], 4)[0]._native is None  # padded
    assert not native_fits(pairs("llama")[1])  # float weights
    assert not native_fits(quantize(copy.deepcopy(pairs("gpt2")[1]), "int4"))  # LayerNorm, biases
    monkeypatch.setattr(qkernel, "_qkernel", None)
    assert not native_fits(int4_llama)
    monkeypatch.undo()
    _eager(monkeypatch)
    assert not native_fits(int4_llama)


def test_a_full_cache_is_a_clear_error(int4_llama):
    state, first = DecoderState.prefill(int4_llama, _one_prompt(int4_llama), None, 1)
    state.step(first.argmax(-1))
    with pytest.raises(ValueError, match="KV cache is full"):
        state.step(first.argmax(-1))


def test_decode_step_checks_its_arguments():
    x, table = torch.zeros(8), torch.zeros(1, 11, dtype=torch.int64)
    row = torch.zeros(4)
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        qkernel.decode_step(torch.zeros(8, dtype=torch.float64), x, table, row, row, x, 1, 8, 2, 1, 4, 8, 0, 4, 1e-5, 0.5)
    with pytest.raises(ValueError, match=r"table must be \(2, 11\)"):
        qkernel.decode_step(x, x.clone(), table, row, row, x, 2, 8, 2, 1, 4, 8, 0, 4, 1e-5, 0.5)
    with pytest.raises(ValueError, match="have other sizes"):
        qkernel.decode_step(x, x.clone(), table, row, row, x, 1, 6, 2, 1, 4, 8, 0, 4, 1e-5, 0.5)
    with pytest.raises(ValueError, match="pos=4 max_len=4 do not fit"):
        qkernel.decode_step(x, x.clone(), table, row, row, x, 1, 8, 2, 1, 4, 8, 4, 4, 1e-5, 0.5)
