"""Every family and head matches Hugging Face transformers (max |Δlogits| ≤ 1e-4 in float32),
and our export loads back into transformers with the same outputs."""

import pytest
import torch
import transformers as T

from lmforge.interop.hf import load_hf, save_hf
from tests.conftest import tiny_hf

TOL = 1e-4


def _outputs(model, kind, ids, mask, dec, dmask):
    kw = dict(input_ids=ids, attention_mask=mask)
    if model.config.is_encoder_decoder:
        kw.update(decoder_input_ids=dec, decoder_attention_mask=dmask)
    with torch.no_grad():
        out = model(**kw)
    return {"bert": lambda o: [o.last_hidden_state, o.pooler_output],
            "mlm": lambda o: [o.logits], "pretraining": lambda o: [o.prediction_logits, o.seq_relationship_logits],
            "classify": lambda o: [o.logits], "qa": lambda o: [o.start_logits, o.end_logits],
            "lm": lambda o: [o.logits]}[kind](out), kw


def _ours(model, kind, kw):
    with torch.no_grad():
        out = model(**kw)
    if kind == "bert":  # BertModel exposes hidden states and the pooled output
        h = model.hidden(**kw)
        return [h, model.backbone.pool(h)]
    return list(out) if isinstance(out, tuple) else [out]


def _mask_pad(t, mask):
    """Compare only real positions of a right-padded decoder-only batch."""
    return t * mask.view(*mask.shape, *([1] * (t.ndim - 2))) if t.ndim >= 2 and t.shape[:2] == mask.shape else t


CASES = [  # (family, HF model class or None for the default, kind of outputs)
    ("bert", None, "bert"),
    ("bert", T.BertForMaskedLM, "mlm"),
    ("bert", T.BertForPreTraining, "pretraining"),
    ("bert", T.BertForSequenceClassification, "classify"),
    ("bert", T.BertForQuestionAnswering, "qa"),
    ("gpt2", None, "lm"),
    ("gpt2", T.GPT2ForSequenceClassification, "classify"),
    ("llama", None, "lm"),
    ("llama", T.LlamaForSequenceClassification, "classify"),
    ("t5", None, "lm"),
    ("t5v1_1", None, "lm"),
    ("bart", None, "lm"),
    ("marian", None, "lm"),
]


@pytest.mark.parametrize("arch,cls,kind", CASES, ids=[f"{a}-{k}" for a, _, k in CASES])
def test_import_matches_hf_and_export_round_trips(tmp_path, padded_batch, arch, cls, kind):
    extra = {"model_cls": cls} if cls else {}
    if kind == "classify":
        extra["num_labels"] = 3
    ref = tiny_hf(arch, **extra)
    ref.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    ids, mask, dec, dmask = padded_batch
    decoder_only = not ref.config.is_encoder_decoder and arch != "bert"
    if decoder_only and kind == "classify":
        ids = ids.clone()
        ids[1, 6:] = ref.config.pad_token_id  # HF finds the last real token through pad ids
    expected, kw = _outputs(ref, kind, ids, mask, dec, dmask)
    got = _ours(ours, kind, kw)
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert e.shape == g.shape
        if decoder_only:
            e, g = _mask_pad(e, mask), _mask_pad(g, mask)
        assert (e - g).abs().max().item() <= TOL

    save_hf(ours, tmp_path / "export")
    back = type(ref).from_pretrained(tmp_path / "export").eval()
    again, _ = _outputs(back, kind, ids, mask, dec, dmask)
    for e, a in zip(expected, again):
        assert (e - a).abs().max().item() <= TOL


def test_padding_does_not_change_real_positions(tmp_path):
    """A row padded on the right gives the same logits as the same row alone."""
    ref = tiny_hf("llama")
    ref.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    ids = torch.randint(3, 99, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    with torch.no_grad():
        alone = ours(ids)
        batch = ours(padded, attention_mask=mask)
    assert torch.allclose(alone, batch[:, :5], atol=1e-5)


def test_new_task_head_keeps_backbone(tmp_path, padded_batch):
    ref = tiny_hf("bert")
    ref.save_pretrained(tmp_path)
    clf = load_hf(tmp_path, task="classify", num_labels=4, labels=["a", "b", "c", "d"])
    emb = load_hf(tmp_path)
    ids, mask, *_ = padded_batch
    assert clf(ids, attention_mask=mask).shape == (2, 4)
    assert torch.equal(clf.backbone.pooler.weight, emb.backbone.pooler.weight)
    assert torch.equal(clf.backbone.tokens.weight, emb.backbone.tokens.weight)


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("arch", ["bert", "t5", "bart"])
def test_unpadded_encoder_matches_hf_at_real_tokens(tmp_path, padded_batch, monkeypatch, arch, rows):
    """encode(unpad=True) (the layers on the real tokens only, attention on the padded layout, or
    with `rows` on the packed rows themselves where the C kernel is built) gives HF's encoder
    states at every real token and zeros at the padding: post-norm with learned positions (BERT,
    BART) and pre-norm with relative bias (T5, whose bias keeps the padded layout)."""
    import lmforge.nn.attend as at
    monkeypatch.setattr(at, "rows_pay", lambda *a: rows)
    used = []
    kernel = at._rows_kernel
    monkeypatch.setattr(at, "_rows_kernel", lambda *a: used.append(1) or kernel(*a))
    ref = tiny_hf(arch)
    ref.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    ids, mask, *_ = padded_batch
    mask = mask.clone()
    mask[0, 3:] = 0  # rows of 3 and 6 real tokens in 9 columns
    with torch.no_grad():
        enc = ref if arch == "bert" else ref.get_encoder()
        want = enc(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours.backbone.encode(ids, mask, unpad=True)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= TOL
    assert got[~real].abs().max().item() == 0
    assert bool(used) == (rows and arch != "t5" and at.qkernel.available())
