"""Parallel text (translation, summarisation): the one reader of source/target pairs, used by
pretraining recipes (`objective: translation`) and by `lmforge finetune --task seq2seq`.

A data spec names either
- one `.jsonl` file of {"source": ..., "target": ...} objects, or
- two line-aligned files (line i of the target translates line i of the source), given as a
  pair of paths, as "SRC,TGT", or as a prefix plus two language suffixes (`train` + en, de →
  train.en, train.de).

Blank lines: a line that is blank in both files is skipped (some corpora separate documents
that way); a line blank on one side only is an error naming the file and line, because it
usually means the files are out of step. Line-count mismatches and empty JSONL fields are
errors naming the file and line too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from lmforge.data.corpus import jsonl_rows, text_lines


class Pair(NamedTuple):
    """One example: a source text and its target. Unpacks as `(source, target)`."""

    source: str
    target: str


def resolve_files(spec: str | Path | Sequence[str | Path], src_lang: str | None = None,
                  tgt_lang: str | None = None) -> tuple[Path] | tuple[Path, Path]:
    """The file(s) a data spec names: a .jsonl file; two files (a sequence or "SRC,TGT"); or a
    prefix plus src_lang/tgt_lang suffixes."""
    if isinstance(spec, (list, tuple)):
        if len(spec) != 2:
            raise ValueError(f"expected two files (source, target), got {len(spec)}")
        return Path(spec[0]), Path(spec[1])
    spec = str(spec)
    if "," in spec:
        src, tgt = spec.split(",", 1)
        return Path(src), Path(tgt)
    if spec.endswith(".jsonl"):
        return (Path(spec),)
    if src_lang and tgt_lang:
        return Path(f"{spec}.{src_lang}"), Path(f"{spec}.{tgt_lang}")
    raise ValueError(f"{spec!r}: give a .jsonl file, two files as 'SRC,TGT', or a prefix with src_lang and tgt_lang")


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"parallel text file {path} not found")
    return [line.rstrip("\r\n") for line in text_lines(path)]


def _read_lines(src_path: Path, tgt_path: Path) -> list[Pair]:
    src, tgt = _lines(src_path), _lines(tgt_path)
    if len(src) != len(tgt):
        short, n = (src_path, len(src)) if len(src) < len(tgt) else (tgt_path, len(tgt))
        raise ValueError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: "
                         f"{short} ends at line {n}, the other continues at line {n + 1} (they must be line-aligned)")
    pairs = []
    for n, (s, t) in enumerate(zip(src, tgt), 1):
        if not s.strip() and not t.strip():
            continue  # a blank line on both sides separates, it is no example
        for path, text, other in ((src_path, s, tgt_path), (tgt_path, t, src_path)):
            if not text.strip():
                raise ValueError(f"{path}:{n}: empty line, but line {n} of {other} is not")
        pairs.append(Pair(s, t))
    return pairs


def _read_jsonl(path: Path) -> list[Pair]:
    pairs = []
    for n, row in jsonl_rows(path, skip_empty=True):
        if not all(isinstance(row.get(k), str) for k in ("source", "target")):
            raise ValueError(f"{path}:{n}: expected an object with string fields 'source' and 'target'")
        for k in ("source", "target"):
            if not row[k].strip():
                raise ValueError(f"{path}:{n}: empty {k}")
        pairs.append(Pair(row["source"], row["target"]))
    return pairs


def read_parallel(spec: str | Path | Sequence[str | Path], src_lang: str | None = None,
                  tgt_lang: str | None = None, limit: int | None = None) -> list[Pair]:
    """Source/target pairs from a spec (see `resolve_files`), the first `limit` when given.
    Malformed input is an error naming the file and line (see the module docstring)."""
    files = resolve_files(spec, src_lang, tgt_lang)
    pairs = _read_jsonl(files[0]) if len(files) == 1 else _read_lines(*files)
    if not pairs:
        raise ValueError(f"{', '.join(map(str, files))}: no sentence pairs")
    return pairs[:limit] if limit else pairs
