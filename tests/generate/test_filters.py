"""Logits filters: numerical parity with HF transformers' logits processors."""

import pytest
import torch

from lmforge.generate.filters import (
    SamplingParams,
    apply_temperature,
    min_new_tokens_filter,
    min_p_filter,
    no_repeat_ngram_filter,
    no_repeat_ngram_mask,
    repetition_penalty,
    sample_next,
    top_k_filter,
    top_p_filter,
)

lp = pytest.importorskip("transformers.generation.logits_process")

B, V = 3, 50


def make_logits() -> torch.Tensor:
    """Seeded (3, 50): a plain row, a row full of ties, a very peaked row."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, V, generator=g) * 2
    x[1] = torch.randint(0, 5, (V,), generator=g).float()  # only 5 distinct values
    x[2, 7] = 30.0  # nearly all the mass on one token
    x[2, 11] = 25.0
    return x


def make_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 8, (B, 12), generator=g)
    ids[0, -3:] = ids[0, :3]  # the suffix repeats an earlier n-gram prefix
    return ids


def assert_same(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isneginf(ours), torch.isneginf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(ours[finite], ref[finite], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1), atol=1e-6, rtol=0)


def check_pure(fn, *args):
    """Run fn and check that it left its tensor arguments untouched."""
    copies = [a.clone() if torch.is_tensor(a) else a for a in args]
    out = fn(*args)
    for a, c in zip(args, copies):
        if torch.is_tensor(a):
            assert torch.equal(a, c)
    return out


@pytest.mark.parametrize("t", [0.3, 1.0, 1.7])
def test_temperature_matches_hf(t):
    x, ids = make_logits(), make_ids()
    assert_same(check_pure(apply_temperature, x, t), lp.TemperatureLogitsWarper(t)(ids, x.clone()))


@pytest.mark.parametrize("k", [1, 2, 3, 10, 49, 50, 80])
def test_top_k_matches_hf_including_ties(k):
    x, ids = make_logits(), make_ids()
    assert_same(check_pure(top_k_filter, x, k), lp.TopKLogitsWarper(k)(ids, x.clone()))


def test_top_k_keeps_all_ties_at_cut():
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0]])
    out = top_k_filter(x, 2)
    assert torch.isfinite(out).tolist() == [[True, False, True, False, True]]
    assert top_k_filter(x, 0) is x


@pytest.mark.parametrize("p", [0.01, 0.3, 0.5, 0.9, 0.95, 0.999])
def test_top_p_matches_hf(p):
    x, ids = make_logits(), make_ids()
    assert_same(check_pure(top_p_filter, x, p), lp.TopPLogitsWarper(p)(ids, x.clone()))


@pytest.mark.parametrize("p", [0.0, 0.01, 0.1, 0.5, 0.9, 1.0])
def test_min_p_matches_hf(p):
    x, ids = make_logits(), make_ids()
    assert_same(check_pure(min_p_filter, x, p), lp.MinPLogitsWarper(p)(ids, x.clone()))


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 2.0])
def test_repetition_penalty_matches_hf(penalty):
    x, ids = make_logits(), make_ids()
    x[0, 3] = -2.0  # make sure a negative logit is among the penalised ones
    ids[0, 0] = 3
    ref = lp.RepetitionPenaltyLogitsProcessor(penalty)(ids, x.clone())
    assert_same(check_pure(repetition_penalty, x, ids, penalty), ref)


def test_repetition_penalty_ignores_ids_outside_vocab():
    x, ids = make_logits(), make_ids()
    ids[1, 0] = V + 5
    ref = lp.RepetitionPenaltyLogitsProcessor(1.5)(ids, x.clone())
    assert_same(repetition_penalty(x, ids, 1.5), ref)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 13])
def test_no_repeat_ngram_matches_hf(n):
    x, ids = make_logits(), make_ids()
    ref = lp.NoRepeatNGramLogitsProcessor(n)(ids, x.clone())
    out = check_pure(no_repeat_ngram_filter, x, ids, n)
    assert_same(out, ref)
    banned = no_repeat_ngram_mask(ids, n)
    assert banned == [torch.isneginf(ref[b]).nonzero().flatten().tolist() for b in range(B)]


def test_no_repeat_ngram_hand_example():
    ids = torch.tensor([[5, 6, 7, 5, 6]])
    assert no_repeat_ngram_mask(ids, 3) == [[7]]  # "5 6" was followed by 7
    assert no_repeat_ngram_mask(ids, 2) == [[7]]  # "6" was followed by 7
    assert no_repeat_ngram_mask(ids, 0) == [[]]
    x = torch.zeros(1, 10)
    assert no_repeat_ngram_filter(x, ids, 0) is x


@pytest.mark.parametrize("cur_new", [0, 2, 3, 5])
@pytest.mark.parametrize("eos", [4, [4, 9]])
def test_min_new_tokens_matches_hf(cur_new, eos):
    x = make_logits()
    prompt_len = 7
    ids = torch.zeros(B, prompt_len + cur_new, dtype=torch.long)
    ref = lp.MinNewTokensLengthLogitsProcessor(prompt_len, 3, eos)(ids, x.clone())
    assert_same(check_pure(min_new_tokens_filter, x, eos, cur_new, 3), ref)


def test_sampling_params_process_matches_hf_chain():
    x, ids = make_logits(), make_ids()
    params = SamplingParams(
        temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2, no_repeat_ngram_size=2
    )
    chain = lp.LogitsProcessorList(
        [
            lp.RepetitionPenaltyLogitsProcessor(1.2),
            lp.NoRepeatNGramLogitsProcessor(2),
            lp.TemperatureLogitsWarper(0.7),
            lp.TopKLogitsWarper(20),
            lp.TopPLogitsWarper(0.9),
            lp.MinPLogitsWarper(0.05),
        ]
    )
    assert_same(check_pure(params.process, x, ids), chain(ids, x.clone()))


def test_default_params_are_identity():
    x, ids = make_logits(), make_ids()
    assert torch.equal(SamplingParams().process(x, ids), x)


def test_greedy_temperature_zero_keeps_argmax():
    x, ids = make_logits(), make_ids()
    params = SamplingParams(temperature=0.0, top_k=5, top_p=0.5)
    assert torch.equal(params.process(x, ids).argmax(-1), x.argmax(-1))
    with pytest.raises(ValueError, match="temperature"):
        params.validate()  # sampling needs temperature > 0


def test_sample_next_is_deterministic_under_seed():
    x = top_k_filter(make_logits(), 10)
    draws = [sample_next(x, torch.Generator().manual_seed(42)) for _ in range(2)]
    assert draws[0].shape == (B,) and draws[0].dtype == torch.long
    assert torch.equal(draws[0], draws[1])
    # Same stream as torch.multinomial on the softmax, which is what HF generate does.
    ref = torch.multinomial(x.softmax(-1), 1, generator=torch.Generator().manual_seed(42)).squeeze(1)
    assert torch.equal(draws[0], ref)
    many = torch.stack([sample_next(x, torch.Generator().manual_seed(s)) for s in range(50)])
    assert torch.isfinite(x.gather(1, many.T)).all()  # never a filtered token


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -1.0),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("no_repeat_ngram_size", -2),
    ],
)
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"{field}.*{value}"):
        SamplingParams(**{field: value})
    params = SamplingParams()
    setattr(params, field, value)
    with pytest.raises(ValueError, match=field):
        params.validate()


@pytest.mark.parametrize(
    "fn, arg", [(apply_temperature, 0.0), (top_k_filter, -1), (top_p_filter, 0.0), (min_p_filter, 1.5)]
)
def test_filters_reject_bad_values(fn, arg):
    with pytest.raises(ValueError):
        fn(make_logits(), arg)
