"""Sequence-to-sequence data: parallel files and JSONL, errors, teacher-forcing batches, metrics."""

import json

import pytest
import torch

from lmforge.evaluate import bleu, chrf
from lmforge.data.noising import IGNORE_INDEX as IGNORE
from lmforge.data.parallel import Pair, read_parallel, resolve_files
from lmforge.tasks.seq2seq import Seq2SeqData, corpus_scores
from lmforge.tokenizer import train_tokenizer_from_iterator

EN = ["a dog runs .", "two men sit on a bench .", "a girl plays ."]
DE = ["ein hund rennt .", "zwei männer sitzen auf einer bank .", "ein mädchen spielt ."]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer_from_iterator(EN + DE, "bpe", 300, family="encoder-decoder", min_frequency=1)


def _files(tmp_path, en=EN, de=DE):
    (tmp_path / "train.en").write_text("\n".join(en) + "\n")
    (tmp_path / "train.de").write_text("\n".join(de) + "\n")
    return tmp_path / "train"


def test_read_files_prefix_comma_and_jsonl(tmp_path):
    prefix = _files(tmp_path)
    pairs = read_parallel(prefix, "en", "de")
    assert pairs[1] == Pair(EN[1], DE[1]) and len(pairs) == 3
    assert read_parallel(f"{prefix}.en,{prefix}.de") == pairs
    assert read_parallel([f"{prefix}.en", f"{prefix}.de"], limit=2) == pairs[:2]
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in zip(EN, DE)))
    assert read_parallel(jl) == pairs
    with pytest.raises(ValueError, match="prefix with src_lang"):
        resolve_files(prefix)


def test_errors_name_file_and_line(tmp_path):
    prefix = _files(tmp_path, DE, DE[:2])
    with pytest.raises(ValueError, match=r"train.en has 3 lines but .*train.de has 2: .*train.de ends at line 2"):
        read_parallel(prefix, "en", "de")
    prefix = _files(tmp_path, [EN[0], " ", EN[2]], DE)
    with pytest.raises(ValueError, match=r"train.en:2: empty line"):
        read_parallel(prefix, "en", "de")
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"source": "a", "target": "b"}) + "\n" + json.dumps({"source": "a", "target": ""}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: empty target"):
        read_parallel(jl)
    jl.write_text(json.dumps({"src": "a", "tgt": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:1: expected an object with string fields 'source' and 'target'"):
        read_parallel(jl)


def test_teacher_forcing_batches(tok):
    pairs = [Pair(s, t) for s, t in zip(EN, DE)]
    ds = Seq2SeqData(pairs, tok, decoder_start_id=tok.bos_id, max_len=8)
    b = ds.batch([0, 1])
    assert set(b) == {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels"}
    dec, lab, dmask = b["decoder_input_ids"], b["labels"], b["decoder_attention_mask"]
    assert dec.shape == lab.shape == dmask.shape
    assert (dec[:, 0] == tok.bos_id).all()
    real = lab != IGNORE
    assert torch.equal(real.long(), dmask)
    for row in range(2):  # labels are the decoder inputs shifted left, ending with eos
        n = int(real[row].sum())
        assert torch.equal(dec[row, 1:n], lab[row, :n - 1]) and lab[row, n - 1] == tok.eos_id
        assert tok.decode(lab[row, :n].tolist()) == DE[row] or n == 8
    assert b["input_ids"].shape[1] <= 8 and (b["input_ids"][b["attention_mask"].bool()] != tok.pad_id).all()
    assert all(x["labels"].shape[0] <= 2 for x in ds.batches(2, shuffle=True, epochs=1))


def test_corpus_scores_use_sacrebleu():
    hyps, refs = ["ein hund rennt .", "zwei männer sitzen ."], ["ein hund rennt .", "zwei männer sitzen auf einer bank ."]
    s = corpus_scores(hyps, refs)
    assert s["bleu"] == pytest.approx(bleu(hyps, refs).score) and s["chrf"] == pytest.approx(chrf(hyps, refs).score)
    assert 0 < s["bleu"] < 100 and corpus_scores(refs, refs)["bleu"] == pytest.approx(100)


def test_one_reader_for_recipes_and_finetuning(tmp_path):
    """Blank on both sides: a separator, skipped; blank on one side: an error naming file and line.
    The pretraining recipe (objective: translation) reads the same way, .jsonl included."""
    from lmforge.train.pretrain import _parallel
    from lmforge.train.recipe import DataSpec
    prefix = _files(tmp_path, [EN[0], "", EN[1]], [DE[0], "  ", DE[1]])
    assert read_parallel(prefix, "en", "de") == [Pair(EN[0], DE[0]), Pair(EN[1], DE[1])]
    assert _parallel(str(prefix), DataSpec(src_lang="en", tgt_lang="de")) == read_parallel(prefix, "en", "de")
    prefix = _files(tmp_path, EN, [DE[0], "", DE[2]])
    with pytest.raises(ValueError, match=r"train.de:2: empty line, but line 2 of .*train.en is not"):
        read_parallel(prefix, "en", "de")
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in zip(EN, DE)))
    assert _parallel(str(jl), DataSpec()) == read_parallel(jl) == [Pair(s, t) for s, t in zip(EN, DE)]
