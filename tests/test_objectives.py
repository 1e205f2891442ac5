"""Objectives: losses equal Hugging Face's own `labels=` losses, each objective lets a tiny
model overfit one batch, and the batch builders give what the objectives read."""

import itertools
import random

import numpy as np
import pytest
import torch
import transformers as T

from lmforge.config import ModelConfig
from lmforge.data import batches as B
from lmforge.data.corpus import TokenArray
from lmforge.data.parallel import read_parallel
from lmforge.interop.hf import load_hf
from lmforge.models.heads import Model
from lmforge.objectives import (IGNORE_INDEX, OBJECTIVES, causal_lm, classification, get_objective, masked_lm, mlm_nsp,
                                seq2seq, shift_right, span_qa)
from lmforge.tokenizer import train_tokenizer_from_iterator
from lmforge.train.loop import TrainConfig, train
from tests.conftest import tiny_hf


pytestmark = pytest.mark.usefixtures("one_thread")


def _hf_and_ours(tmp_path, arch, cls=None, **extra):
    ref = tiny_hf(arch, **({"model_cls": cls} if cls else {}), **extra)
    ref.save_pretrained(tmp_path / "hf")
    return ref, load_hf(tmp_path / "hf").eval()


# ---- parity with the reference losses ----------------------------------------------------------
def test_causal_lm_matches_hf_and_both_label_forms_agree(tmp_path):
    ref, ours = _hf_and_ours(tmp_path, "gpt2")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
        shifted, m = causal_lm(ours, {"input_ids": ids, "attention_mask": mask})
        targets = labels[:, 1:]
        explicit, _ = causal_lm(ours, {"input_ids": ids[:, :-1], "attention_mask": mask[:, :-1], "targets": targets})
    assert torch.allclose(shifted, expected, atol=1e-5)
    assert torch.allclose(explicit, expected, atol=1e-5)
    assert set(m) == {"loss", "nll", "acc"} and 0 <= m["acc"] <= 1


def test_masked_lm_and_mlm_nsp_match_hf(tmp_path):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 99, (3, 10), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 2] = ids[:, 2]
    labels[0, 5] = ids[0, 5]
    nsp = torch.tensor([0, 1, 1])
    ref, ours = _hf_and_ours(tmp_path / "mlm", "bert", T.BertForMaskedLM)
    with torch.no_grad():
        loss, m = masked_lm(ours, {"input_ids": ids, "labels": labels})
        assert torch.allclose(loss, ref(input_ids=ids, labels=labels).loss, atol=1e-5)
    assert set(m) == {"loss", "nll", "mlm_acc"}
    ref, ours = _hf_and_ours(tmp_path / "pre", "bert", T.BertForPreTraining)
    with torch.no_grad():
        loss, m = mlm_nsp(ours, {"input_ids": ids, "labels": labels, "next_sentence_label": nsp})
        assert torch.allclose(loss, ref(input_ids=ids, labels=labels, next_sentence_label=nsp).loss, atol=1e-5)
    assert set(m) == {"loss", "nll", "mlm_acc", "nsp_loss", "nsp_acc"}
    assert torch.allclose(m["loss"], m["nll"] + m["nsp_loss"])


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_seq2seq_matches_hf_shift_and_loss(tmp_path, arch):
    ref, ours = _hf_and_ours(tmp_path, arch, **({"decoder_start_token_id": 0} if arch == "t5" else {}))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, 99, (2, 9), generator=g)
    labels = torch.randint(4, 99, (2, 7), generator=g)
    labels[1, 5:] = IGNORE_INDEX
    cfg = ours.cfg
    if arch == "t5":
        hf_dec = ref._shift_right(labels)
    else:
        from transformers.models.bart.modeling_bart import shift_tokens_right
        hf_dec = shift_tokens_right(labels, ref.config.pad_token_id, ref.config.decoder_start_token_id)
    assert torch.equal(shift_right(labels, cfg.decoder_start_id, cfg.pad_id), hf_dec)
    with torch.no_grad():
        expected = ref(input_ids=ids, labels=labels).loss
        loss, m = seq2seq(ours, {"input_ids": ids, "labels": labels})
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(m["nll"], loss)


def test_classification_and_span_qa_match_hf(tmp_path):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 99, (4, 8), generator=g)
    ref, ours = _hf_and_ours(tmp_path / "c", "bert", T.BertForSequenceClassification, num_labels=3)
    y = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        loss, m = classification(ours, {"input_ids": ids, "labels": y})
        assert torch.allclose(loss, ref(input_ids=ids, labels=y).loss, atol=1e-5)
    assert 0 <= m["acc"] <= 1
    ref, ours = _hf_and_ours(tmp_path / "q", "bert", T.BertForQuestionAnswering)
    s, e = torch.tensor([1, 2, 3, 20]), torch.tensor([2, 2, 5, 30])  # the last one lies outside: ignored
    with torch.no_grad():
        loss, m = span_qa(ours, {"input_ids": ids, "start_positions": s, "end_positions": e})
        assert torch.allclose(loss, ref(input_ids=ids, start_positions=s, end_positions=e).loss, atol=1e-5)
    assert set(m) == {"loss", "start_acc", "end_acc", "span_acc"}


def _full_logits_loss(logits, targets):
    """The reference: logits at every position, -100 targets ignored by F.cross_entropy."""
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("kind", ["causal_lm", "masked_lm"])
def test_logits_only_at_target_positions_same_loss_and_gradients(kind):
    """The objective asks the model for the target positions' logits only (the head sees N rows),
    and loss and gradients equal those of full logits with -100 targets ignored."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, 40, (3, 10), generator=g)
    if kind == "causal_lm":
        model = Model(ModelConfig.preset("gpt-tiny", vocab_size=40, max_len=16))
        mask = torch.ones_like(ids)
        mask[2, 6:] = 0
        batch, head = {"input_ids": ids, "attention_mask": mask}, model.lm_head
        targets = torch.cat([ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX),
                             torch.full((3, 1), IGNORE_INDEX)], dim=1)
        reference = lambda: model(ids, attention_mask=mask)  # noqa: E731
    else:
        model = Model(ModelConfig.preset("bert-tiny", task="mlm", pooler=False, vocab_size=40))
        targets = torch.full_like(ids, IGNORE_INDEX)
        targets[:, 3], targets[1, 7] = ids[:, 3], ids[1, 7]
        batch, head = {"input_ids": ids, "labels": targets}, model.mlm_head
        reference = lambda: model(ids)  # noqa: E731
    rows = []
    hook = head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
    loss, _ = OBJECTIVES[kind](model, batch)
    hook.remove()
    assert rows == [int((targets != IGNORE_INDEX).sum())]
    got = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    expected_loss = _full_logits_loss(reference(), targets)
    want = torch.autograd.grad(expected_loss, list(model.parameters()), allow_unused=True)
    assert torch.allclose(loss, expected_loss, atol=1e-6)
    for a, e in zip(got, want):
        assert (a is None) == (e is None) and (a is None or torch.allclose(a, e, atol=1e-6))
    with pytest.raises(ValueError, match="logits_at applies to the tasks lm, mlm and pretraining"):
        Model(ModelConfig.preset("bert-tiny", task="classify", num_labels=2, vocab_size=40))(
            ids, logits_at=targets != IGNORE_INDEX)


def test_label_smoothing_is_optimised_but_nll_is_reported():
    torch.manual_seed(0)
    model = Model(ModelConfig.preset("gpt-tiny", vocab_size=50, max_len=16))
    x = torch.randint(0, 50, (2, 9))
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}
    with torch.no_grad():
        plain, m0 = causal_lm(model, batch)
        smooth, m1 = get_objective("causal_lm", label_smoothing=0.1)(model, batch)
        logp = model(x[:, :-1]).log_softmax(-1)
    nll = -logp.gather(-1, x[:, 1:, None]).mean()
    expected = 0.9 * nll - 0.1 * logp.mean()  # (1 - ε) · NLL + ε · mean over the vocabulary of -log p
    assert torch.allclose(plain, nll, atol=1e-5) and torch.allclose(smooth, expected, atol=1e-5)
    assert torch.equal(m1["nll"], m0["nll"]) and torch.equal(m1["loss"], smooth) and smooth != plain


def test_registry_and_empty_targets():
    with pytest.raises(ValueError, match="unknown objective 'nope'"):
        get_objective("nope")
    assert get_objective("mlm") is masked_lm  # the recipes' earlier name is an alias
    assert {OBJECTIVES[n] for n in ("seq2seq", "span_corruption", "denoising", "translation")} == {seq2seq}
    assert set(OVERFIT) | {"span_corruption", "denoising", "translation"} == set(OBJECTIVES)  # each is tested
    model = Model(ModelConfig.preset("bert-tiny", task="mlm", pooler=False, vocab_size=30))
    ids = torch.randint(5, 30, (2, 6))
    with pytest.raises(ValueError, match="no target tokens"):
        masked_lm(model, {"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX)})


# ---- each objective overfits one batch ------------------------------------------------------------
def _overfit(model, objective, batch, steps=150, lr=3e-3):
    cfg = TrainConfig(lr=lr, schedule="constant", max_steps=steps, weight_decay=0.0, log_every=steps, progress=False)
    return train(model, objective, itertools.repeat(batch), cfg, eval_batches=[batch])


def _ids(*shape, low=5, high=60, seed=0):
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed))


def _small(preset, **kw):
    torch.manual_seed(0)
    return Model(ModelConfig.preset(preset, vocab_size=60, d_model=32, n_heads=2, d_ff=64, max_len=32, **kw))


OVERFIT = {
    "causal_lm": lambda: (_small("gpt-tiny"),
                          {"input_ids": _ids(4, 16), "targets": _ids(4, 16, seed=1)}, "valid_acc"),
    "masked_lm": lambda: (_small("bert-tiny", task="mlm", pooler=False),
                          {"input_ids": _ids(4, 16), "labels": torch.where(_ids(4, 16, seed=2) < 20, _ids(4, 16, seed=3),
                                                                           IGNORE_INDEX)}, "valid_mlm_acc"),
    "mlm_nsp": lambda: (_small("bert-tiny"),
                        {"input_ids": _ids(4, 16), "labels": torch.where(_ids(4, 16, seed=2) < 20, _ids(4, 16, seed=3),
                                                                         IGNORE_INDEX),
                         "next_sentence_label": torch.tensor([0, 1, 1, 0])}, "valid_nsp_acc"),
    "seq2seq": lambda: (_small("t5-tiny", pad_id=0, decoder_start_id=0),
                        {"input_ids": _ids(4, 12), "attention_mask": torch.ones(4, 12, dtype=torch.long),
                         "labels": _ids(4, 8, seed=4)}, "valid_acc"),
    "classification": lambda: (_small("bert-tiny", task="classify", num_labels=3),
                               {"input_ids": _ids(6, 10), "labels": torch.tensor([0, 1, 2, 2, 1, 0])}, "valid_acc"),
    "span_qa": lambda: (_small("bert-tiny", task="qa", pooler=False),
                        {"input_ids": _ids(4, 16), "start_positions": torch.tensor([1, 4, 7, 2]),
                         "end_positions": torch.tensor([3, 4, 9, 12])}, "valid_span_acc"),
}


@pytest.mark.parametrize("name", list(OVERFIT))
def test_objective_overfits_one_batch(name):
    """Every objective of the registry, looked up by name as recipes and fine-tuning do."""
    model, batch, acc_key = OVERFIT[name]()
    objective = get_objective(name)
    with torch.no_grad():
        first, _ = objective(model.eval(), batch)
    result = _overfit(model, objective, batch, **({"lr": 1e-2, "steps": 200} if name == "seq2seq" else {}))
    assert result["valid_loss"] < 0.05 < first.item(), (first.item(), result)
    assert result[acc_key] == 1.0
    assert all(np.isfinite(v) for k, v in result.items() if k.startswith("valid_"))


# ---- batch builders -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(0)
    words = "the a cat dog sat ran on under mat tree house big small red blue quickly".split()
    docs = [" ".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) + "." for _ in range(12))
            for _ in range(10)]
    return docs


def _token_array(tok, docs):
    eos = tok.eos_id if tok.eos_id is not None else tok.sep_id
    ids = [i for d in docs for i in tok.encode(d, add_special_tokens=False) + [eos]]
    starts, n = [], 0
    for d in docs:
        starts.append(n)
        n += len(tok.encode(d, add_special_tokens=False)) + 1
    return TokenArray(np.array(ids, dtype=np.uint16), np.array(starts))


def test_batch_streams_resume_exactly_and_fit_their_objectives(corpus):
    tok = train_tokenizer_from_iterator(corpus, "wordpiece", 120, family="encoder")
    tokens = _token_array(tok, corpus)
    stream = B.nsp_batches(tokens, 32, 4, tok, seed=3)
    next(stream)
    state = stream.state_dict()
    a = [next(stream) for _ in range(2)]
    again = B.nsp_batches(tokens, 32, 4, tok, seed=99)
    again.load_state_dict(state)
    b = [next(again) for _ in range(2)]
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    batch = a[0]
    assert batch["input_ids"].shape[1] <= 32 and set(batch["next_sentence_label"].tolist()) <= {0, 1}
    assert (batch["input_ids"][:, 0] == tok.cls_id).all()
    chosen = batch["labels"] != IGNORE_INDEX
    assert chosen.any() and not torch.isin(batch["labels"][chosen], torch.tensor(sorted(tok.special_ids))).any()
    model = Model(ModelConfig.preset("bert-tiny", vocab_size=tok.vocab_size, pad_id=tok.pad_id))
    loss, m = mlm_nsp(model, batch)
    assert loss.isfinite() and 0 <= m["nsp_acc"] <= 1

    mlm = next(B.mlm_batches(tokens, 16, 3, tok))
    assert mlm["input_ids"].shape == (3, 16) and (mlm["input_ids"][:, -1] == tok.sep_id).all()


def test_lm_span_and_denoising_batches(corpus):
    tok = train_tokenizer_from_iterator(corpus, "bpe", 300, family="decoder")
    tokens = _token_array(tok, corpus)
    lm = next(B.lm_batches(tokens, 8, 2))
    assert lm["input_ids"].shape == lm["targets"].shape == (2, 8)
    assert torch.equal(lm["input_ids"][:, 1:], lm["targets"][:, :-1])
    with pytest.raises(ValueError, match="block_size=100000"):
        B.lm_batches(tokens, 100000, 2)

    t5 = train_tokenizer_from_iterator(corpus, "unigram", 150, family="t5", n_sentinels=20)
    span = next(B.span_batches(_token_array(t5, corpus), 20, 2, t5))
    assert span["input_ids"].shape[0] == 2 and (span["labels"][:, 0] == t5.sentinel_ids[0]).all()
    model = Model(ModelConfig.preset("t5-tiny", vocab_size=t5.vocab_size, pad_id=t5.pad_id, eos_id=t5.eos_id))
    assert seq2seq(model, span)[0].isfinite()

    bart = train_tokenizer_from_iterator(corpus, "bpe", 300, family="bart")
    den = next(B.denoising_batches(_token_array(bart, corpus), 24, 2, bart))
    assert (den["labels"][:, 0] == bart.bos_id).all() and (den["input_ids"] == bart.mask_id).any()
    model = Model(ModelConfig.preset("bart-tiny", vocab_size=bart.vocab_size, pad_id=bart.pad_id,
                                     bos_id=bart.bos_id, eos_id=bart.eos_id, decoder_start_id=bart.eos_id))
    assert seq2seq(model, den)[0].isfinite()


def test_translation_batches(tmp_path):
    (tmp_path / "a.en").write_text("a cat\nthe dog runs\n\nhello\n")
    (tmp_path / "a.de").write_text("eine katze\nder hund rennt\n\nhallo\n")
    pairs = read_parallel([tmp_path / "a.en", tmp_path / "a.de"])
    assert pairs == [("a cat", "eine katze"), ("the dog runs", "der hund rennt"), ("hello", "hallo")]
    (tmp_path / "b.de").write_text("x\n")
    with pytest.raises(ValueError, match="line-aligned"):
        read_parallel([tmp_path / "a.en", tmp_path / "b.de"])
    tok = train_tokenizer_from_iterator([s for p in pairs for s in p], "bpe", 280, family="encoder-decoder")
    enc = B.encode_pairs(pairs, tok, 16)
    batch = next(B.translation_batches(enc, 4, tok.pad_id))
    assert batch["labels"].shape[0] == 4
    rows = batch["labels"].masked_fill(batch["labels"] == IGNORE_INDEX, tok.pad_id)
    assert all(tok.eos_id in r.tolist() for r in rows)
