"""Text corpora -> flat memory-mapped token arrays, and the batching helpers the training loop uses.

The on-disk layout follows nanoGPT's `train.bin`: one flat array of token ids
(uint16 when the vocabulary fits, else uint32), plus `docs.npy` with the offset
where each document starts and `meta.json` describing both.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from pathlib import Path

import numpy as np
import torch

from lmforge.progress import Progress
from lmforge.tokenizer import MAX_LINE_BYTES, Tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
_HF_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # written by save_to_disk
_FORMAT_VERSION = 1  # part of the cache key: bump when the file layout changes


# ---- reading text ----------------------------------------------------------------------------
def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _HF_DATASET_MARKERS)


def source_files(source: str | Path | Iterable[str | Path]) -> list[Path]:
    """The files (or saved HF dataset folders) a source expands to: folders are searched recursively, sorted."""
    paths = [Path(source)] if isinstance(source, (str, Path)) else [Path(p) for p in source]
    files = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"corpus path {path} does not exist")
        if path.is_file() or _is_hf_dataset(path):
            files.append(path)
            continue
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not found:
            raise ValueError(f"corpus folder {path} has no {'/'.join(TEXT_SUFFIXES)} files")
        files += found
    return files


def text_lines(path: str | Path) -> Iterator[str]:
    """Decoded lines of a text file (line endings kept), streamed. Raises a ValueError naming the
    file, line and byte offset on a NUL byte (binary data), bytes that are not UTF-8, or a line longer
    than MAX_LINE_BYTES: memory stays bounded by that limit, however the file is made."""
    path = Path(path)
    with open(path, "rb") as f:
        offset, lineno = 0, 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise ValueError(f"{path}: line {lineno} (byte offset {offset}) is longer than "
                                 f"{MAX_LINE_BYTES:,} bytes; lines of text are expected (split the file)")
            if (nul := raw.find(b"\0")) >= 0:
                raise ValueError(f"{path} looks binary: NUL byte at line {lineno} (byte offset {offset + nul})")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not valid UTF-8: line {lineno}, byte offset {offset + e.start}; "
                                 "save it as UTF-8") from None
            yield line
            offset += len(raw)


def _text_documents(path: Path, split: str) -> Iterator[str]:
    if split == "file":
        yield "".join(text_lines(path))
    elif split == "line":
        yield from (line.rstrip("\r\n") for line in text_lines(path))
    else:  # "paragraph": blocks separated by blank lines
        block = []
        for line in chain(text_lines(path), [""]):
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block).rstrip("\r\n")
                block = []


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for lineno, line in enumerate(text_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {lineno} is not valid JSON: {e}") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ValueError(f"{path} line {lineno} has no string field {text_field!r}")
        yield record[text_field]


def _dataset_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{path} is a Hugging Face dataset saved with save_to_disk; "
                          "reading it needs the `datasets` package (pip install datasets)") from None
    ds = datasets.load_from_disk(str(path))
    splits = [ds[k] for k in sorted(ds)] if isinstance(ds, datasets.DatasetDict) else [ds]
    for part in splits:
        if text_field not in part.column_names:
            raise ValueError(f"dataset {path} has no column {text_field!r} (columns: {part.column_names})")
        yield from (row[text_field] for row in part)


def read_texts(source: str | Path | Iterable[str | Path], split: str = "file",
               text_field: str = "text") -> Iterator[str]:
    """Yield the non-blank documents of a corpus: .txt/.md files, folders of them, .jsonl, or a saved HF dataset.

    split ("file" | "paragraph" | "line") says what one document is in a plain-text file;
    a .jsonl record (its `text_field`) and a dataset row are always one document each.
    """
    if split not in ("file", "paragraph", "line"):
        raise ValueError(f"split={split!r}; expected 'file', 'paragraph' or 'line'")
    empty, files = True, source_files(source)
    for path in files:
        if _is_hf_dataset(path):
            docs = _dataset_documents(path, text_field)
        elif path.suffix == ".jsonl":
            docs = _jsonl_documents(path, text_field)
        else:
            docs = _text_documents(path, split)
        for doc in docs:
            if doc.strip():
                empty = False
                yield doc
    if empty:
        raise ValueError(f"corpus {', '.join(map(str, files))} is empty: no non-blank documents")


# ---- token files ---------------------------------------------------------------------------
class TokenArray:
    """A flat array of token ids (often a read-only `np.memmap`) and the offsets where documents start."""

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray | None = None, path: Path | None = None):
        self.tokens = tokens
        self.doc_starts = np.zeros(1, dtype=np.int64) if doc_starts is None else np.asarray(doc_starts, dtype=np.int64)
        self.path = path

    @classmethod
    def open(cls, path: str | Path) -> TokenArray:
        """Open a folder written by `build_token_file` without reading the tokens into memory."""
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        tokens = np.memmap(path / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
        return cls(tokens, np.load(path / "docs.npy"), path)

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"TokenArray({len(self)} tokens, {len(self.doc_starts)} documents, dtype={self.tokens.dtype})"

    def _slice(self, start: int, stop: int) -> TokenArray:
        starts = self.doc_starts[(self.doc_starts >= start) & (self.doc_starts < stop)] - start
        if len(starts) == 0 or starts[0] != 0:  # the slice begins inside a document
            starts = np.concatenate([[0], starts])
        return TokenArray(self.tokens[start:stop], starts, self.path)

    def split(self, val_fraction: float = 0.1, by: str = "token") -> tuple[TokenArray, TokenArray]:
        """(train, val): the first and last `val_fraction` of the tokens (as nanoGPT), or of whole documents."""
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1")
        if by == "token":
            cut = int(len(self) * (1 - val_fraction))
        elif by == "document":
            n_val = max(1, round(len(self.doc_starts) * val_fraction))
            cut = int(self.doc_starts[-n_val]) if n_val < len(self.doc_starts) else 0
        else:
            raise ValueError(f"by={by!r}; expected 'token' or 'document'")
        if not 0 < cut < len(self):
            raise ValueError(f"val_fraction={val_fraction} by {by} leaves an empty split of {len(self)} tokens "
                             f"in {len(self.doc_starts)} documents")
        return self._slice(0, cut), self._slice(cut, len(self))

    def documents(self) -> Iterator[np.ndarray]:
        """Each document's tokens, as views into the array."""
        ends = chain(self.doc_starts[1:], [len(self)])
        for start, end in zip(self.doc_starts, ends):
            yield self.tokens[start:end]


def _cache_key(files: list[Path], tokenizer: Tokenizer, options: dict) -> str:
    h = hashlib.sha256(tokenizer.hf.to_str().encode())
    for f in files:
        for p in sorted(f.rglob("*")) if f.is_dir() else [f]:
            st = p.stat()
            h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    h.update(json.dumps(options, sort_keys=True).encode())
    return h.hexdigest()


def build_token_file(source: str | Path | Iterable[str | Path], tokenizer: Tokenizer, cache_dir: str | Path, *,
                     split: str = "file", text_field: str = "text", append_eos: bool = True,
                     batch_size: int = 256, progress: bool = True) -> TokenArray:
    """Tokenise a corpus into `cache_dir/<sha256>/{tokens.bin, docs.npy, meta.json}` and open it.

    The key hashes the tokenizer, the source files' paths, sizes and mtimes, and the options, so a
    second call with nothing changed returns the cached arrays without tokenising again.
    Each document is followed by eos (sep for BERT-style tokenizers) when `append_eos`.
    """
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.sep_id
    if append_eos and eos is None:
        raise ValueError("append_eos=True but the tokenizer has no eos (or sep) token")
    files = source_files(source)
    # ids < vocab_size, so uint16 holds any vocabulary of up to 2**16 tokens (GPT-2's 50257 included)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    options = {"split": split, "text_field": text_field, "eos": eos if append_eos else None, "v": _FORMAT_VERSION}
    key = _cache_key(files, tokenizer, options)
    final = Path(cache_dir) / key[:32]
    if (final / "meta.json").is_file():
        return TokenArray.open(final)

    tmp = Path(cache_dir) / f".{key[:32]}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    doc_starts, n_tokens = [], 0
    texts = read_texts(files, split=split, text_field=text_field)
    total = sum(p.stat().st_size for f in files for p in (f.rglob("*") if f.is_dir() else [f]) if p.is_file())
    # counts bytes of text read, which is less than the files' size (JSONL syntax, blank lines):
    # `finish` brings the bar to 100% at the end; off a terminal it prints one line, at the end
    bar = Progress(total, "tokenising", "B", disable=not progress)
    try:
        with open(tmp / "tokens.bin", "wb") as out:
            while batch := list(islice(texts, batch_size)):
                for ids in tokenizer.encode_batch(batch, add_special_tokens=False):
                    ids = ids + [eos] if append_eos else ids
                    doc_starts.append(n_tokens)
                    n_tokens += len(ids)
                    np.asarray(ids, dtype=dtype).tofile(out)
                bar.update(min(sum(len(t.encode("utf-8")) for t in batch), total - bar.n))
        bar.finish()
    except BaseException:  # a bad file met halfway (or Ctrl-C): no half-built folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    if n_tokens == 0:
        shutil.rmtree(tmp)
        raise ValueError(f"corpus {source} produced no tokens")
    np.save(tmp / "docs.npy", np.asarray(doc_starts, dtype=np.int64))
    meta = {"dtype": np.dtype(dtype).name, "n_tokens": n_tokens, "n_docs": len(doc_starts),
            "vocab_size": tokenizer.vocab_size, "sources": [str(f) for f in files], "options": options, "key": key}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, final)  # atomic: readers see the whole folder or nothing
    except OSError:  # another process finished the same build first
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenArray.open(final)


# ---- batching ------------------------------------------------------------------------------
def _as_numpy(tokens) -> np.ndarray:
    if isinstance(tokens, TokenArray):
        return tokens.tokens
    return tokens.numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)


def _windows(data: np.ndarray, starts, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in starts]).astype(np.int64))  # (B, T+1)
    return w[:, :-1], w[:, 1:]  # inputs and next-token targets, each (B, T)


def random_windows(tokens, block_size: int, batch_size: int,
                   generator: torch.Generator | np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's get_batch: `batch_size` random windows -> (x, y), int64 (B, T), y = x shifted by one."""
    data = _as_numpy(tokens)
    if len(data) <= block_size:
        raise ValueError(f"block_size={block_size} needs more than {block_size} tokens; the array has {len(data)}")
    if isinstance(generator, np.random.Generator):
        starts = generator.integers(0, len(data) - block_size, size=batch_size)
    elif isinstance(generator, torch.Generator):
        starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    else:
        raise TypeError(f"generator must be a torch.Generator or numpy Generator, not {type(generator).__name__}")
    return _windows(data, starts, block_size)


def sequential_windows(tokens, block_size: int, batch_size: int,
                       stride: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Windows every `stride` (default `block_size`) tokens from the start, in batches, for evaluation.
    A tail shorter than `block_size + 1` tokens is dropped; the last batch may be smaller."""
    data = _as_numpy(tokens)
    if len(data) <= block_size:
        raise ValueError(f"block_size={block_size} needs more than {block_size} tokens; the array has {len(data)}")
    starts = range(0, len(data) - block_size, stride or block_size)
    for b in range(0, len(starts), batch_size):
        yield _windows(data, starts[b:b + batch_size], block_size)


def pack_documents(doc_token_lists: Iterable[list[int]], block_size: int, eos_id: int | None) -> list[list[int]]:
    """Concatenate documents (each followed by `eos_id` unless None) and cut into blocks of exactly
    `block_size` tokens for causal LM training; the incomplete last block is dropped."""
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be positive")
    sep = [] if eos_id is None else [eos_id]
    stream = chain.from_iterable(chain(doc, sep) for doc in doc_token_lists)
    blocks = []
    while len(block := [int(t) for t in islice(stream, block_size)]) == block_size:
        blocks.append(block)
    return blocks


def pad_batch(sequences: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id sequences to the longest -> (ids, attention_mask), both int64 (B, L); mask is 1 on real tokens."""
    if side not in ("right", "left"):
        raise ValueError(f"side={side!r}; expected 'right' or 'left'")
    if pad_id is None:
        raise ValueError("pad_id is None: the tokenizer has no pad token")
    if len(sequences) == 0:
        raise ValueError("sequences is empty")
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        cols = slice(0, n) if side == "right" else slice(length - n, length)
        ids[row, cols] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def read_lines(path: str | Path, skip_empty: bool = False) -> list[str]:
    """One text per line (.txt) or per JSON object with a "text" field (.jsonl). An empty line (or
    empty "text") is an error naming file and line unless skip_empty; an empty file is always an
    error, and so are binary data, bytes that are not UTF-8 and overlong lines (`text_lines`)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found")
    texts = []
    for n, raw in enumerate(text_lines(p), 1):
        line = raw.rstrip("\r\n")
        if p.suffix == ".jsonl" and line.strip():
            try:
                line = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                line = None
            if not isinstance(line, str):
                raise ValueError(f"{p}:{n}: expected a JSON object with a 'text' string")
        if not line.strip():
            if skip_empty:
                continue
            raise ValueError(f"{p}:{n}: empty {'line' if not raw.strip() else repr('text')}")
        texts.append(line)
    if not texts:
        raise ValueError(f"{p} is empty")
    return texts


def jsonl_rows(path: str | Path, skip_empty: bool = True) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each line of a .jsonl file; a line that is not a JSON object
    (or an empty line, unless skip_empty) is an error naming file and line, as are the faults
    `text_lines` refuses."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    for n, line in enumerate(text_lines(path), 1):
        if not line.strip():
            if skip_empty:
                continue
            raise ValueError(f"{path}:{n}: empty line")
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not valid JSON: {e}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        yield n, row
