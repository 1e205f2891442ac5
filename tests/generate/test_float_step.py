"""The float32 native step (lmforge.generate.native's `FloatStep`, `fstep.c`) against the eager
one on the same model: the GPT-2-, Llama- and T5-like tiny models of test_generate (padded
batches: left-padded decoder prompts, right-padded encoder sources), and a decoder that uses
what those do not (GELU, a gated GELU, sinusoidal positions, embedding scale, GQA with
LayerNorm, an untied LM head with a bias, a feed-forward width no tile divides). The same
logits within float rounding, cache contents, greedy tokens, beam hypotheses and samples;
where it applies; and the kernel's argument checks. (Every test of test_generate against HF
runs through it too, for the models it fits.)"""

import copy

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.generate import generate
from lmforge.generate import native as native_module
from lmforge.generate.native import FloatStep, float_fits
from lmforge.generate.state import DecoderState
from lmforge.models import qkernel
from lmforge.models.heads import build_model
from tests.generate.test_generate import pairs, prompts  # noqa: F401  (pairs: a fixture)

pytestmark = pytest.mark.skipif(not qkernel.available(), reason="lmforge.models._qkernel was not built here")
FITS = ["gpt2", "llama", "t5"]


@pytest.fixture(scope="module")
def odd_decoder():
    """What the HF tiny models do not cover, with varied weights."""
    torch.manual_seed(5)
    cfg = ModelConfig(family="decoder", vocab_size=99, d_model=40, n_heads=4, n_kv_heads=2, n_encoder_layers=0,
                      n_decoder_layers=2, d_ff=37, max_len=64, position="sinusoidal", norm="layernorm",
                      norm_placement="pre", activation="geglu", bias=True, embed_scale=True,
                      tie_embeddings=False, lm_head_bias=True, pad_id=0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def _model(pairs, arch):
    return pairs(arch)[1]


def _eager(monkeypatch):
    monkeypatch.setenv("LMFORGE_NATIVE_STEP", "0")


def _steps_agree(model, ids, mask, monkeypatch, steps=9):
    native, first = DecoderState.prefill(model, ids, mask, steps + 1)
    assert isinstance(native._float, FloatStep)
    with monkeypatch.context() as m:
        _eager(m)
        eager, first_eager = DecoderState.prefill(model, ids, mask, steps + 1)
    assert eager._float is None
    torch.testing.assert_close(first, first_eager)
    tokens = first.argmax(-1)
    for _ in range(steps):
        a, b = eager.step(tokens), native.step(tokens)
        assert (b - a).abs().max() <= 1e-5 * a.abs().max(), f"float step off by {(b - a).abs().max():.2e}"
        assert native.argmax(b) is native._float.last[1]  # the kernel's, taken in the same call
        assert torch.equal(native.argmax(b), b.argmax(-1))
        tokens = a.argmax(-1)
    assert native.cache.pos == eager.cache.pos
    torch.testing.assert_close(native.cache.buf, eager.cache.buf, rtol=1e-5, atol=1e-5)  # the same keys, values


@pytest.mark.parametrize("arch", FITS)
def test_float_logits_equal_the_eager_ones(pairs, arch, monkeypatch):
    model = _model(pairs, arch)
    _steps_agree(model, *prompts(model), monkeypatch)


def test_float_step_covers_the_other_options(odd_decoder, monkeypatch):
    assert float_fits(odd_decoder, 3)
    _steps_agree(odd_decoder, *prompts(odd_decoder), monkeypatch)
    plain = odd_decoder.cfg.replace(activation="gelu", position="learned", embed_scale=False)
    torch.manual_seed(6)
    other = build_model(plain).eval()
    _steps_agree(other, *prompts(other), monkeypatch)


def test_the_kernels_argmax_is_torchs_on_ties_and_nan(odd_decoder):
    """torch.argmax's rules: the first of equal largest logits, and a NaN counts as largest."""
    model = copy.deepcopy(odd_decoder)
    state, first = DecoderState.prefill(model, *prompts(model), 4)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.fill_(-1.0)
        model.lm_head.bias[[5, 9, 40]] = 2.0  # a three-way tie at the top
    state._float = FloatStep(model)  # the head's pointers as they are now
    logits = state.step(first.argmax(-1))
    assert state.argmax(logits).tolist() == logits.argmax(-1).tolist() == [5] * logits.shape[0]
    with torch.no_grad():
        model.lm_head.bias[[30, 70]] = float("nan")
    logits = state.step(first.argmax(-1))
    assert state.argmax(logits).tolist() == logits.argmax(-1).tolist() == [30] * logits.shape[0]
    changed = logits.clone()
    changed[:, 30] = 0.0
    assert state.argmax(changed).tolist() == [70] * logits.shape[0]  # other logits: torch's own argmax


def test_a_token_outside_the_vocabulary_is_a_clear_error(odd_decoder):
    state, first = DecoderState.prefill(odd_decoder, *prompts(odd_decoder), 4)
    tokens = first.argmax(-1)
    tokens[1] = odd_decoder.cfg.vocab_size
    with pytest.raises(ValueError, match="row 1's token 99 .* outside the embeddings \\(99 tokens"):
        state.step(tokens)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_float_generation_equals_eager(pairs, arch, monkeypatch):
    """Greedy, seeded sampling and beam search (whose reorders move the cache's rows, and for
    T5 repeat the encoder memory per beam): the same tokens and scores."""
    model = _model(pairs, arch)
    ids, mask = prompts(model)
    options = [dict(), dict(strategy="sample", top_k=5, seed=3), dict(strategy="beam", num_beams=3)]
    native = [generate(model, ids, mask, max_new_tokens=10, eos_ids=[], **o) for o in options]
    native.append(generate(model, ids, mask, max_new_tokens=10, eos_ids=[], compile=True))  # it takes compile's place
    _eager(monkeypatch)
    eager = [generate(model, ids, mask, max_new_tokens=10, eos_ids=[], **o) for o in options]
    for a, b in zip(native, eager):
        assert a.tolist() == b.tolist()
    assert native[3].tolist() == eager[0].tolist()
    torch.testing.assert_close(native[2].scores, eager[2].scores)


def test_where_it_applies(pairs, odd_decoder, monkeypatch):
    assert all(float_fits(_model(pairs, arch), 3) for arch in FITS)
    assert not any(float_fits(_model(pairs, arch), 3) for arch in ("bart", "marian"))  # post-norm
    model = _model(pairs, "gpt2")
    monkeypatch.setattr(native_module, "FLOAT_ROWS_MAX", 2)
    assert float_fits(model, 2) and not float_fits(model, 3)
    ids, mask = prompts(model)
    assert DecoderState.prefill(model, ids, mask, 4)[0]._float is None  # 3 rows: the batched step
    monkeypatch.undo()
    model.train()
    assert not float_fits(model, 1)
    model.eval()
    monkeypatch.setattr(qkernel, "_qkernel", None)
    assert not float_fits(model, 1)
    monkeypatch.undo()
    _eager(monkeypatch)
    assert not float_fits(model, 1)


def test_a_full_cache_is_a_clear_error(pairs):
    model = _model(pairs, "llama")
    state, first = DecoderState.prefill(model, *prompts(model), 1)
    state.step(first.argmax(-1))
    with pytest.raises(ValueError, match="KV cache is full"):
        state.step(first.argmax(-1))


def test_float_step_checks_its_arguments():
    out, x, cache = torch.zeros(1, 8), torch.zeros(1, 8), torch.zeros(1, 2, 1, 2, 4, 4)
    table = torch.zeros(1, 24, dtype=torch.int64)
    args = dict(cross=0, mask=0, positions=0, cos=0, sin=0, rel=0, mem_mask=0, final_w=0, final_b=0, head_w=0,
                head_b=0, n_layers=1, B=1, d=8, heads=2, kv=2, head_dim=4, d_ff=8, rows=1, length=4, pos=0, S=0,
                vocab=8, rel_n=0, rms=1, act=0, eps=1e-5, scale=0.5, logit_scale=1.0)
    with pytest.raises(ValueError, match="x must be a contiguous float32"):
        qkernel.float_step(out, x.double(), table, cache=cache, **args)
    with pytest.raises(ValueError, match=r"table must be \(2, 24\)"):
        qkernel.float_step(out, x, table, cache=cache, **{**args, "n_layers": 2})
    with pytest.raises(ValueError, match="do not fit"):
        qkernel.float_step(out, x, table, cache=cache, **{**args, "length": 5})
    with pytest.raises(ValueError, match="pos=4 len=4 S=0 rel_n=0 do not fit"):  # the kernel's own check
        qkernel.float_step(out, x, table, cache=cache, **{**args, "pos": 4, "final_w": x.data_ptr()})
