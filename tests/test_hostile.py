"""Hostile input files: every reader of text data, and the commands that take such files.

Each bad file (not UTF-8, binary, NUL byte, zero bytes, one line of 100 MB) must give a ValueError
that names the file and what is wrong, within a bounded time and memory; a command that fails so
leaves no output behind and an existing output file byte for byte as it was. (Models, configs,
checkpoints and loading security: tests/test_hostile_models.py.)
"""

import hashlib
import re
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.corpus import read_lines, read_texts
from lmforge.data.parallel import read_parallel
from lmforge.tasks.classify import read_classify
from lmforge.tasks.qa import read_squad
from lmforge.tasks.retrieval import read_retrieval
from lmforge.tasks.sts import read_sts
from lmforge.tokenizer import MAX_LINE_BYTES, train_tokenizer


def _tokenizer(path):
    return train_tokenizer([path], kind="bpe", vocab_size=300, progress=False)


def _parallel(path):  # the bad file is the target side of a line-aligned pair
    src = path.with_name("good.src")
    src.write_text("a source line\n" * 3)
    return read_parallel(f"{src},{path}")


# reader name → (function of a path, file suffix, a good first line)
READERS = {
    "read_lines .txt": (read_lines, ".txt", b"a text\n"),
    "read_lines .jsonl": (read_lines, ".jsonl", b'{"text": "a text"}\n'),
    "read_texts lines": (lambda p: list(read_texts(p, split="line")), ".txt", b"a text\n"),
    "read_texts file": (lambda p: list(read_texts(p)), ".md", b"a text\n"),
    "read_texts .jsonl": (lambda p: list(read_texts(p)), ".jsonl", b'{"text": "a text"}\n'),
    "train_tokenizer": (_tokenizer, ".txt", b"a text\n"),
    "read_classify .tsv": (read_classify, ".tsv", b"sentence\tlabel\n"),
    "read_classify .csv": (read_classify, ".csv", b"sentence,label\n"),
    "read_classify .jsonl": (read_classify, ".jsonl", b'{"text": "a", "label": "x"}\n'),
    "read_sts": (read_sts, ".tsv", b"a cat\ta dog\t3.0\n"),
    "read_retrieval .jsonl": (read_retrieval, ".jsonl", b'{"doc": "a document"}\n'),
    "read_parallel .jsonl": (read_parallel, ".jsonl", b'{"source": "a", "target": "b"}\n'),
    "read_parallel src,tgt": (_parallel, ".tgt", b"a target line\n"),
    # whole-file JSON (SQuAD): read whole by design, so no line limit applies
    "read_squad .json": (read_squad, ".json", b'{"data": [\n'),
    "read_retrieval .json": (read_retrieval, ".json", b'{"data": [\n'),
}
WHOLE_FILE = ("read_squad .json", "read_retrieval .json")

# fault → (bytes after the good first line (None: a zero-byte file), what the message must say)
FAULTS = {
    "not UTF-8": (b"caf\xe9 au lait\n", r"not valid UTF-8: (line 2, )?byte offset"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x01", r"NUL byte|control character|not valid UTF-8"),
    "NUL byte": (b"hello\x00world\n", r"NUL byte|control character"),
    "zero bytes": (None, r"empty|no (examples|sentence pairs|queries|non-blank)|has 0\b"),
}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("reader", READERS)
def test_bad_file_is_an_error_naming_file_and_fault(tmp_path, reader, fault):
    read, suffix, first = READERS[reader]
    tail, expected = FAULTS[fault]
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(b"" if tail is None else first + tail)
    with pytest.raises(ValueError) as e:
        read(path)
    message = str(e.value)
    assert path.name in message and re.search(expected, message), message
    if fault in ("not UTF-8", "NUL byte") and reader not in WHOLE_FILE:
        assert re.search(r"line 2\b", message), message


@pytest.fixture(scope="module")
def hundred_mb_line(tmp_path_factory) -> Path:
    """One line of 100 MB (no newline at all), made once for every reader."""
    path = tmp_path_factory.mktemp("long") / "line.txt"
    with open(path, "wb") as f:
        block = b"abcdefghij" * (1 << 20)  # 10 MiB
        for _ in range(10):
            f.write(block)
    return path


@pytest.mark.parametrize("reader", [r for r in READERS if r not in WHOLE_FILE])
def test_a_100_mb_line_is_refused_without_reading_it_whole(tmp_path, hundred_mb_line, reader):
    """Memory stays bounded by MAX_LINE_BYTES (16 MiB): the reader stops there and names the line."""
    read, suffix, _ = READERS[reader]
    path = tmp_path / f"long{suffix}"
    path.symlink_to(hundred_mb_line)
    with pytest.raises(ValueError, match=rf"long{re.escape(suffix)}: line 1 \(byte offset 0\) is longer than "
                                         rf"{MAX_LINE_BYTES:,} bytes"):
        read(path)


# ---- wrong column counts and fields -------------------------------------------------------------
COLUMNS = {  # name → (reader, suffix, content, what the message must say)
    "tsv row short": (read_classify, ".tsv", "sentence\tlabel\ngood\t1\nno label here\n", r":3: 1 fields but the header has 2"),
    "tsv row long": (read_classify, ".tsv", "sentence\tlabel\ngood\t1\nx\t1\textra\n", r":3: 3 fields but the header has 2"),
    "csv row short": (read_classify, ".csv", "sentence,label\ngood,1\nbad\n", r":3: 1 fields but the header has 2"),
    "csv no text column": (read_classify, ".csv", "words,label\ngood,1\n", r":2: no text column"),
    "jsonl no label": (read_classify, ".jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', r":2: missing column"),
    "sts 2 fields": (read_sts, ".tsv", "a\tb\t1.0\na\tb\n", r":2: expected 7 \(STS-B\) or 3 tab-separated fields, got 2"),
    "sts 4 fields": (read_sts, ".tsv", "a\tb\t1.0\tx\n", r":1: expected 7 .* got 4"),
    "sts score text": (read_sts, ".tsv", "a\tb\thigh\n", r":1: could not convert string to float: 'high'"),
    "retrieval no positives": (read_retrieval, ".jsonl", '{"query": "q"}\n', r":1: needs a 'query' string and a non-empty 'positives' list"),
    "retrieval positives text": (read_retrieval, ".jsonl", '{"query": "q", "positives": "a doc"}\n', r":1: needs a 'query' string"),
    "retrieval doc number": (read_retrieval, ".jsonl", '{"doc": 5}\n', r":1: 'doc' must be a non-empty string, got 5"),
    "parallel no target": (read_parallel, ".jsonl", '{"source": "a"}\n', r":1: expected an object with string fields"),
    "squad no paragraphs": (read_squad, ".json", '{"data": [{"title": "t"}]}', r"not SQuAD JSON: missing or malformed field 'paragraphs'"),
    "jsonl not an object": (read_lines, ".jsonl", '{"text": "a"}\n[1, 2]\n', r":2: expected a JSON object with a 'text' string"),
}


@pytest.mark.parametrize("case", COLUMNS)
def test_wrong_columns_name_file_line_and_counts(tmp_path, case):
    read, suffix, content, expected = COLUMNS[case]
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"data{re.escape(suffix)}.*{expected}"):
        read(path)


def test_line_aligned_files_of_different_lengths(tmp_path):
    (tmp_path / "a.src").write_text("one\ntwo\nthree\n")
    (tmp_path / "a.tgt").write_text("un\ndeux\n")
    with pytest.raises(ValueError, match=r"a.src has 3 lines but .*a.tgt has 2: .*a.tgt ends at line 2"):
        read_parallel(f"{tmp_path / 'a.src'},{tmp_path / 'a.tgt'}")


# ---- commands: a clear error, no partial output, saved files untouched -----------------------------
def _digest(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a folder (the folder's listing included)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _commands(model: str, bad: str, tmp: Path) -> dict[str, tuple[list[str], Path]]:
    """command → (argv, the output it would write)."""
    return {
        "embed": (["embed", model, "--input", bad, "--out", str(tmp / "e.npy")], tmp / "e.npy"),
        "index build": (["index", "build", model, "--docs", bad, "--out", str(tmp / "index")], tmp / "index"),
        "tokenizer train": (["tokenizer", "train", bad, "--kind", "bpe", "--vocab-size", "300",
                             "--out", str(tmp / "tok")], tmp / "tok"),
        "eval sts": (["eval", "--task", "sts", "--model", model, "--data", bad, "--out", str(tmp / "m.json")],
                     tmp / "m.json"),
        "eval perplexity": (["eval", "--task", "perplexity", "--model", model, "--data", bad,
                             "--out", str(tmp / "p.json")], tmp / "p.json"),
        "predict": (["predict", "--task", "classify", "--model", model, "--input", bad], None),
        "finetune": (["finetune", "--task", "classify", "--model", model, "--train", bad,
                      "--out", str(tmp / "ft")], tmp / "ft"),
        "pretrain": (["pretrain", f"data.source={bad}", f"out_dir={tmp / 'run'}", "train.max_steps=1",
                      "--no-samples"], tmp / "run"),
    }


COMMANDS = list(_commands("m", "b", Path(".")))


def _bad_file(tmp_path: Path, command: str) -> Path:
    suffix = {"eval sts": ".tsv", "finetune": ".tsv"}.get(command, ".txt")
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(b"first line\tfine line\t3.0\nsecond caf\xe9\tline\t2.0\n")
    return bad


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "over-existing"])
@pytest.mark.parametrize("command", COMMANDS)
def test_command_on_a_bad_file_leaves_outputs_as_they_were(tmp_path, capsys, tiny_text_model, command, existing):
    bad = _bad_file(tmp_path, command)
    argv, out = _commands(str(tiny_text_model), str(bad), tmp_path)[command]
    if existing and out is None:
        pytest.skip("predict writes to stdout only")
    if existing:  # a previous good result in place
        if out.suffix:
            out.write_bytes(b"a previous result\n")
        else:
            (out / "sub").mkdir(parents=True)
            (out / "model.safetensors").write_bytes(b"previous weights")
            (out / "sub" / "tokenizer.json").write_bytes(b"{}")
        before = _digest(out)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert f"{bad.name} is not valid UTF-8: line 2, byte offset 35" in captured.err, captured.err
    assert "Traceback" not in captured.err
    if out is not None:
        if existing:
            assert _digest(out) == before
        else:
            assert not out.exists() or not any(p.is_file() for p in out.rglob("*")), sorted(out.rglob("*"))
        leftovers = [p.name for p in tmp_path.rglob("*.tmp")]
        assert not leftovers


def test_token_cache_keeps_no_half_built_folder(tmp_path, tiny_text_model):
    """The second file of a corpus is bad: the token file being built is removed, the cache stays empty."""
    from lmforge.data.corpus import build_token_file
    from lmforge.tokenizer import Tokenizer
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("a good document\n" * 600)
    (tmp_path / "corpus" / "b.txt").write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(ValueError, match=r"b.txt is not valid UTF-8: line 2, byte offset 9"):
        build_token_file(tmp_path / "corpus", Tokenizer.load(tiny_text_model), tmp_path / "cache",
                         batch_size=8, progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


# ---- a damaged search index -------------------------------------------------------------------------
class _Bomb:
    def __reduce__(self):
        return (print, ("a pickled index ran code",))


def _damage_npy_pickle(d: Path) -> None:
    import numpy as np
    np.save(d / "embeddings.npy", np.array([_Bomb(), _Bomb()], dtype=object), allow_pickle=True)


DAMAGES = {  # how the index is damaged → (file named, what the message says)
    "index.json not JSON": (lambda d: (d / "index.json").write_text("{not json"), "index.json", "JSONDecodeError"),
    "index.json without count": (lambda d: (d / "index.json").write_text("{}"), "index.json", "KeyError: 'count'"),
    "embeddings truncated": (lambda d: (d / "embeddings.npy").write_bytes((d / "embeddings.npy").read_bytes()[:100]),
                             "embeddings.npy", "ValueError"),
    "embeddings pickled": (_damage_npy_pickle, "embeddings.npy", "ValueError"),
    "texts not UTF-8": (lambda d: (d / "texts.jsonl").write_bytes(b'{"text": "caf\xe9"}\n'), "texts.jsonl",
                        "UnicodeDecodeError"),
    "texts without text": (lambda d: (d / "texts.jsonl").write_text('{"doc": "a"}\n{"doc": "b"}\n'), "texts.jsonl",
                           "KeyError: 'text'"),
    "one text missing": (lambda d: (d / "texts.jsonl").write_text('{"text": "a"}\n'), "",
                         r"index is inconsistent \(2 vectors, 1 texts, index.json says 2\)"),
}


@pytest.mark.parametrize("case", DAMAGES)
def test_a_damaged_index_is_named_and_runs_no_code(tmp_path, capsys, case):
    import numpy as np
    from lmforge.embed import SemanticIndex
    damage, name, expected = DAMAGES[case]
    d = tmp_path / "index"
    SemanticIndex(np.eye(2, dtype=np.float32), ["a", "b"], {"count": 2, "dim": 2, "model": "m"}).save(d)
    damage(d)
    where = f"index/{name}" if name else "index: "
    with pytest.raises(ValueError, match=rf"{where}.*{expected}"):
        SemanticIndex.load(d)
    assert main(["search", str(d), "a query"]) == 2
    err = capsys.readouterr()
    assert re.search(rf"lmforge search: error: .*{where}", err.err) and "ran code" not in err.out + err.err
