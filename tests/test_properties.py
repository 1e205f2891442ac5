"""Property-based tests (Hypothesis): invariants that must hold for every input, not just the
examples the other tests pick. Each property is checked on random inputs Hypothesis draws
(and shrinks to a smallest failing case when one breaks)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.data.noising import mask_tokens, span_corruption
from lmforge.generate.filters import SamplingParams, min_p_filter, top_k_filter, top_p_filter
from lmforge.tokenizer import train_tokenizer_from_iterator
from tests.conftest import FIXTURES

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def bpe():
    text = (FIXTURES / "tinyshakespeare-200k.txt").read_text(encoding="utf-8")[:30_000]
    return train_tokenizer_from_iterator(text.split("\n\n"), "bpe", 500, progress=False)


# Any Unicode text but surrogates (not encodable) and NUL-like controls other than \t \n.
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc"), whitelist_characters="\t\n"), max_size=80)


@FAST
@given(text=TEXT)
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text, add_special_tokens=False)) == text


@st.composite
def batches(draw):
    b, t = draw(st.integers(1, 6)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 60, (b, t), generator=g)
    return ids, draw(st.floats(0.05, 0.95)), seed


SPECIAL = {0, 1, 2, 3}
MASK = 3


@FAST
@given(case=batches())
def test_masking_keeps_shapes_and_never_touches_specials(case):
    ids, p, seed = case
    inputs, labels = mask_tokens(ids, mask_id=MASK, vocab_size=60, special_ids=SPECIAL, mlm_probability=p,
                                 generator=torch.Generator().manual_seed(seed))
    assert inputs.shape == labels.shape == ids.shape
    special = torch.isin(ids, torch.tensor(sorted(SPECIAL)))
    assert torch.equal(inputs[special], ids[special])  # specials stay as they are
    assert (labels[special] == -100).all()  # and are never targets
    chosen = labels != -100
    assert torch.equal(labels[chosen], ids[chosen])  # a target is the original token
    assert torch.equal(inputs[~chosen], ids[~chosen])  # only chosen positions change
    # a random replacement is never a special token
    changed = inputs != ids
    assert not torch.isin(inputs[changed & (inputs != MASK)], torch.tensor(sorted(SPECIAL))).any()


@settings(max_examples=15, deadline=None)
@given(p=st.floats(0.1, 0.5), seed=st.integers(0, 2**31 - 1))
def test_masking_proportions(p, seed):
    ids = torch.randint(4, 1000, (64, 256), generator=torch.Generator().manual_seed(seed))
    inputs, labels = mask_tokens(ids, mask_id=MASK, vocab_size=1000, special_ids=SPECIAL, mlm_probability=p,
                                 generator=torch.Generator().manual_seed(seed + 1))
    chosen = labels != -100
    n = chosen.sum().item()
    # 16,384 draws: each rate is within ~5 standard deviations of its expectation
    assert abs(n / ids.numel() - p) < 5 * (p * (1 - p) / ids.numel()) ** 0.5
    masked = (inputs[chosen] == MASK).float().mean().item()
    kept = (inputs[chosen] == ids[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 5 * (0.16 / n) ** 0.5 + 1e-3
    assert abs(kept - 0.1) < 5 * (0.09 / n) ** 0.5 + 2e-3  # kept, plus random picks of the same id


@FAST
@given(length=st.integers(2, 120), density=st.floats(0.05, 0.5), span=st.floats(1.0, 5.0),
       seed=st.integers(0, 2**31 - 1))
def test_span_corruption_inputs_and_targets_rebuild_the_text(length, density, span, seed):
    ids = torch.randint(10, 500, (length,), generator=torch.Generator().manual_seed(seed))
    sentinels = list(range(1000, 1100))
    inputs, targets = span_corruption(ids, noise_density=density, mean_span_length=span, sentinel_ids=sentinels,
                                      eos_id=1, generator=torch.Generator().manual_seed(seed))
    assert inputs[-1] == 1 and targets[-1] == 1
    # put each sentinel's span back where the sentinel stands in the inputs
    spans, current = {}, None
    for t in targets[:-1].tolist():
        if t >= 1000:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    rebuilt = [x for t in inputs[:-1].tolist() for x in (spans[t] if t >= 1000 else [t])]
    assert rebuilt == ids.tolist()
    used = [t for t in inputs.tolist() if t >= 1000]
    assert used == sentinels[:len(used)]  # sentinels in order, each once


@st.composite
def logits(draw):
    v = draw(st.integers(2, 50))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(0.1, 30.0))
    # a random permutation of distinct values, so "the k largest" is well defined
    perm = torch.randperm(v, generator=torch.Generator().manual_seed(seed)).float()
    return (perm * scale / v).unsqueeze(0)


def _is_distribution(x: torch.Tensor) -> bool:
    p = x.softmax(-1)
    return bool(torch.isfinite(p).all() and (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(1)))


@FAST
@given(x=logits(), k=st.integers(1, 60))
def test_top_k_keeps_exactly_k(x, k):
    out = top_k_filter(x, k)
    kept = torch.isfinite(out)
    assert kept.sum().item() == min(k, x.size(-1))
    assert x[kept].min() >= x[~kept].max() if (~kept).any() else True
    assert _is_distribution(out)


@FAST
@given(x=logits(), p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_set_reaching_p(x, p):
    out = top_p_filter(x, p)
    kept = torch.isfinite(out)
    probs = x.softmax(-1)
    assert probs[kept].sum() >= p - 1e-5 or kept.sum() == x.size(-1)
    # dropping the least likely kept token would fall below p (when more than one is kept)
    if kept.sum() > 1:
        assert probs[kept].sum() - probs[kept].min() < p + 1e-5
    assert _is_distribution(out)


@FAST
@given(x=logits(), temperature=st.floats(0.05, 3.0), k=st.integers(0, 60), p=st.floats(0.01, 1.0),
       min_p=st.floats(0.0, 1.0))
def test_chained_filters_leave_a_distribution(x, temperature, k, p, min_p):
    out = SamplingParams(temperature=temperature, top_k=k, top_p=p, min_p=min_p).process(x, torch.zeros(1, 0, dtype=torch.long))
    assert _is_distribution(out)
    assert torch.isfinite(out).sum() >= 1
    assert torch.isfinite(min_p_filter(x, min_p)).sum() >= 1


@st.composite
def small_configs(draw):
    """Random small decoder or encoder-decoder configs across positions, norms, activations and GQA."""
    from lmforge import ModelConfig
    heads = draw(st.sampled_from([2, 4]))
    kv = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    enc_dec = draw(st.booleans())
    position = draw(st.sampled_from(["learned", "sinusoidal", "rope"] + (["relative"] if enc_dec else [])))
    return ModelConfig(
        family="encoder-decoder" if enc_dec else "decoder", vocab_size=53, d_model=8 * heads, n_heads=heads,
        n_kv_heads=kv, n_encoder_layers=draw(st.integers(1, 2)) if enc_dec else 0,
        n_decoder_layers=draw(st.integers(1, 3)), d_ff=draw(st.integers(8, 40)), max_len=64, position=position,
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])), norm_placement=draw(st.sampled_from(["pre", "post"])),
        activation=draw(st.sampled_from(["gelu", "relu", "swiglu"])), bias=draw(st.booleans()),
        tie_embeddings=draw(st.booleans()), pad_id=0, decoder_start_id=0 if enc_dec else None)


@settings(max_examples=15, deadline=None)
@given(cfg=small_configs(), seed=st.integers(0, 2**16), prompt_len=st.integers(1, 10), new=st.integers(1, 12))
def test_cached_decoding_equals_recomputing_everything(cfg, seed, prompt_len, new):
    from lmforge import Model
    from lmforge.generate import generate
    torch.manual_seed(seed)
    model = Model(cfg).eval()
    with torch.no_grad():  # larger random weights, so that the argmax is decisive
        for p in model.parameters():
            p.normal_(0, 0.5)
    prompt = torch.randint(1, 53, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    cached = generate(model, prompt, max_new_tokens=new).tolist()[0]
    seq = [] if cfg.family == "encoder-decoder" else prompt[0].tolist()
    out = []
    with torch.no_grad():
        for _ in range(new):  # no cache: the whole sequence through the model at every step
            if cfg.family == "encoder-decoder":
                logits = model(prompt, decoder_input_ids=torch.tensor([[0] + out]))
            else:
                logits = model(torch.tensor([seq + out]))
            out.append(int(logits[0, -1].argmax()))
    assert cached == out
