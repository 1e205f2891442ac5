import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from lmforge.data.corpus import (TokenArray, build_token_file, pack_documents, pad_batch, random_windows, read_texts,
                                 sequential_windows)
from lmforge.tokenizer import Tokenizer, train_tokenizer_from_iterator
from tests.conftest import FIXTURES

SHAKESPEARE = FIXTURES / "tinyshakespeare-200k.txt"


@pytest.fixture(scope="module")
def text():
    with open(SHAKESPEARE, encoding="utf-8") as f:
        return f.read()[:40_000]


@pytest.fixture(scope="module")
def tok(text):
    return train_tokenizer_from_iterator(text.split("\n\n"), "bpe", 400)


@pytest.fixture
def folder(tmp_path, text):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    paragraphs = text.split("\n\n")
    (root / "a.txt").write_text("\n\n".join(paragraphs[:40]), encoding="utf-8")
    (root / "sub" / "b.md").write_text("# notes\n\nsome *markdown* text\n", encoding="utf-8")
    with open(root / "sub" / "c.jsonl", "w", encoding="utf-8") as f:
        for p in paragraphs[40:100]:
            f.write(json.dumps({"text": p, "id": 1}) + "\n")
    (root / "ignored.csv").write_text("x,y\n")
    return root


def test_read_texts_splits(tmp_path, folder):
    f = tmp_path / "doc.txt"
    f.write_text("para one\nline two\n\n\npara two\n\n  \n")
    assert list(read_texts(f)) == ["para one\nline two\n\n\npara two\n\n  \n"]
    assert list(read_texts(f, split="paragraph")) == ["para one\nline two", "para two"]
    assert list(read_texts(f, split="line")) == ["para one", "line two", "para two"]
    docs = list(read_texts(folder))
    assert len(docs) == 1 + 1 + 60  # a.txt whole, b.md whole, 60 jsonl records; .csv ignored
    assert docs[1].startswith("# notes")  # sorted: a.txt, sub/b.md, sub/c.jsonl
    j = tmp_path / "d.jsonl"
    j.write_text('{"body": "x"}\n\n{"body": "y"}\n')
    assert list(read_texts(j, text_field="body")) == ["x", "y"]


def test_read_texts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        list(read_texts(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        list(read_texts(tmp_path / "empty.txt"))
    (tmp_path / "bin.txt").write_bytes(b"ok\nab\x00cd")
    with pytest.raises(ValueError, match=r"bin.txt.*line 2.*offset 5"):
        list(read_texts(tmp_path / "bin.txt"))
    (tmp_path / "latin.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt.*UTF-8.*line 2.*offset 6"):
        list(read_texts(tmp_path / "latin.txt", split="line"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2.*'text'"):
        list(read_texts(tmp_path / "bad.jsonl"))
    (tmp_path / "nofiles").mkdir()
    with pytest.raises(ValueError, match="nofiles"):
        list(read_texts(tmp_path / "nofiles"))
    ds = tmp_path / "hfds"
    ds.mkdir()
    (ds / "dataset_info.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="datasets"):
            list(read_texts(ds))


def test_build_token_file_and_cache(tmp_path, folder, tok, monkeypatch):
    cache = tmp_path / "cache"
    arr = build_token_file(folder, tok, cache, progress=False)
    docs = list(read_texts(folder))
    assert arr.tokens.dtype == np.uint16 and isinstance(arr.tokens, np.memmap)
    assert len(arr.doc_starts) == len(docs)
    first = list(arr.documents())[0]
    assert first[-1] == tok.eos_id and tok.decode(first[:-1].tolist()) == docs[0]
    assert len(arr) == sum(len(tok.encode(d)) + 1 for d in docs)
    with pytest.raises(ValueError):
        arr.tokens[0] = 1  # read-only

    def boom(*a, **k):
        raise AssertionError("re-tokenised despite the cache")
    monkeypatch.setattr(tok, "encode_batch", boom)
    again = build_token_file(folder, tok, cache, progress=False)
    assert again.path == arr.path and np.array_equal(again.tokens, arr.tokens)
    assert [p.name for p in cache.iterdir()] == [arr.path.name]  # no temp folders left behind
    monkeypatch.undo()

    (folder / "a.txt").write_text("changed text", encoding="utf-8")  # new size and mtime -> new key
    changed = build_token_file(folder, tok, cache, progress=False)
    assert changed.path != arr.path and len(changed) < len(arr)


def test_uint32_for_large_vocab(tmp_path, tok):
    hf = HFTokenizer.from_str(tok.hf.to_str())
    hf.add_tokens([f"tok{i}" for i in range(70_000)])
    big = Tokenizer.from_hf(hf, tok.special_tokens)
    f = tmp_path / "x.txt"
    f.write_text("tok69999 hello tok1")
    arr = build_token_file(f, big, tmp_path / "cache", progress=False)
    assert arr.tokens.dtype == np.uint32 and int(arr.tokens.max()) >= 2**16


def test_split(tmp_path, folder, tok):
    arr = build_token_file(folder, tok, tmp_path, progress=False)
    train, val = arr.split(0.1)
    assert len(train) == int(len(arr) * 0.9) and len(train) + len(val) == len(arr)
    assert np.array_equal(np.concatenate([train.tokens, val.tokens]), arr.tokens)
    assert val.doc_starts[0] == 0
    train_d, val_d = arr.split(0.5, by="document")
    assert len(train_d.doc_starts) + len(val_d.doc_starts) == len(arr.doc_starts)
    assert val_d.tokens[-1] == tok.eos_id and train_d.tokens[-1] == tok.eos_id  # cut on a document boundary
    with pytest.raises(ValueError, match="val_fraction"):
        arr.split(1.5)


def test_random_and_sequential_windows():
    data = np.arange(1000, dtype=np.uint16)
    x, y = random_windows(data, 16, 4, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    x2, _ = random_windows(data, 16, 4, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    xn, _ = random_windows(TokenArray(data), 16, 4, np.random.default_rng(0))
    xn2, _ = random_windows(data, 16, 4, np.random.default_rng(0))
    assert torch.equal(xn, xn2)
    with pytest.raises(ValueError, match="block_size"):
        random_windows(data[:10], 16, 4, torch.Generator())

    batches = list(sequential_windows(data[:101], 10, 4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    xs = torch.cat([b[0] for b in batches])
    assert torch.equal(xs.flatten(), torch.arange(100))


def test_pack_documents():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert pack_documents(docs, 4, eos_id=0) == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert pack_documents(docs, 4, eos_id=None) == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert pack_documents([[1]], 4, eos_id=0) == []


def test_pad_batch():
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=9, side="left")
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], 0, side="middle")
    with pytest.raises(ValueError, match="pad_id"):
        pad_batch([[1]], None)


def test_jsonl_rows_name_file_and_line(tmp_path):
    from lmforge.data.corpus import jsonl_rows
    p = tmp_path / "rows.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(jsonl_rows(p)) == [(1, {"a": 1}), (3, {"a": 2})]
    with pytest.raises(ValueError, match=r"rows.jsonl:2: empty line"):
        list(jsonl_rows(p, skip_empty=False))
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: expected a JSON object, got list"):
        list(jsonl_rows(p))
    p.write_text('{"a": \n')
    with pytest.raises(ValueError, match=r"rows.jsonl:1: not valid JSON"):
        list(jsonl_rows(p))
