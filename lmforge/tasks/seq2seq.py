"""Sequence-to-sequence tasks (translation, summarisation): parallel text → batches → beam search → BLEU/chrF/ROUGE.

Data is two line-aligned files (line i of the target translates line i of the
source), or JSONL with `source` and `target` fields. A pair of files can be named
as "SRC,TGT" or as a prefix with the two language suffixes (`train` + en, de →
train.en, train.de).

Teacher forcing (Vaswani et al. 2017, §5): the decoder reads
`decoder_input_ids = [start] + y` and learns `labels = y + [eos]`; padded label
positions are -100. Sources are encoded with the tokenizer's template (e.g. `x </s>`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.data.corpus import jsonl_rows, pad_batch
from lmforge.evaluate import bleu, chrf, rouge
from lmforge.tasks.classify import length_batches
from lmforge.tokenizer import Tokenizer

IGNORE = -100  # label value of padded target positions


@dataclass
class Pair:
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
        raise FileNotFoundError(f"{path} not found")
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\r\n") for line in f]
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{path}:{n}: empty line")
    return lines


def read_parallel(spec: str | Path | Sequence[str | Path], src_lang: str | None = None,
                  tgt_lang: str | None = None, limit: int | None = None) -> list[Pair]:
    """Source/target pairs from a spec (see `resolve_files`); empty lines and line-count
    mismatches are errors naming the file and line."""
    files = resolve_files(spec, src_lang, tgt_lang)
    if len(files) == 1:
        pairs = _read_jsonl(files[0])
    else:
        src, tgt = _lines(files[0]), _lines(files[1])
        if len(src) != len(tgt):
            short, n = (files[0], len(src)) if len(src) < len(tgt) else (files[1], len(tgt))
            raise ValueError(f"{files[0]} has {len(src)} lines but {files[1]} has {len(tgt)}: "
                             f"{short} ends at line {n}, the other continues at line {n + 1}")
        pairs = [Pair(s, t) for s, t in zip(src, tgt)]
    if not pairs:
        raise ValueError(f"{', '.join(map(str, files))}: no sentence pairs")
    return pairs[:limit] if limit else pairs


def _read_jsonl(path: Path) -> list[Pair]:
    pairs = []
    for n, row in jsonl_rows(path, skip_empty=False):
        if not all(isinstance(row.get(k), str) for k in ("source", "target")):
            raise ValueError(f"{path}:{n}: expected an object with string fields 'source' and 'target'")
        for k in ("source", "target"):
            if not row[k].strip():
                raise ValueError(f"{path}:{n}: empty {k}")
        pairs.append(Pair(row["source"], row["target"]))
    return pairs


# ---- batches ---------------------------------------------------------------------------------
def start_id(model_cfg, tok: Tokenizer) -> int:
    """The decoder's first input: the config's decoder_start_id, else bos, else pad."""
    for i in (model_cfg.decoder_start_id, tok.bos_id, tok.pad_id):
        if i is not None:
            return i
    raise ValueError("no decoder start token: set decoder_start_id in the model config")


class Seq2SeqData:
    """Tokenized pairs, ready to batch; sources and targets are cut to max_len tokens."""

    def __init__(self, pairs: Sequence[Pair], tok: Tokenizer, decoder_start_id: int, max_len: int = 128):
        if tok.pad_id is None or tok.eos_id is None:
            raise ValueError("the tokenizer needs pad and eos tokens for sequence-to-sequence training")
        self.pad_id, self.start_id, self.eos_id = tok.pad_id, decoder_start_id, tok.eos_id
        self.src = [_cut(ids, max_len, self.eos_id) for ids in tok.encode_batch([p.source for p in pairs])]
        # targets without the template's specials: labels are always y + [eos], whatever the template
        tgt = tok.encode_batch([p.target for p in pairs], add_special_tokens=False)
        self.tgt = [ids[:max_len - 1] + [self.eos_id] for ids in tgt]

    def __len__(self) -> int:
        return len(self.src)

    def batch(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """{input_ids, attention_mask (B, S), decoder_input_ids, decoder_attention_mask, labels (B, T)}."""
        ids, mask = pad_batch([self.src[i] for i in idx], self.pad_id)
        dec, dmask = pad_batch([[self.start_id] + self.tgt[i][:-1] for i in idx], self.pad_id)
        labels, _ = pad_batch([self.tgt[i] for i in idx], IGNORE)
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec,
                "decoder_attention_mask": dmask, "labels": labels}

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                epochs: int | None = 1) -> Iterator[dict[str, torch.Tensor]]:
        """Length-grouped batches; epochs=None repeats forever, reshuffling each pass."""
        lengths = [max(len(s), len(t)) for s, t in zip(self.src, self.tgt)]
        epoch = 0
        while epochs is None or epoch < epochs:
            for idx in length_batches(lengths, batch_size, shuffle, seed + epoch):
                yield self.batch(idx)
            epoch += 1


def _cut(ids: list[int], max_len: int, eos_id: int) -> list[int]:
    """At most max_len ids, keeping the final eos when the template added one."""
    if len(ids) <= max_len:
        return ids
    return ids[:max_len - 1] + [eos_id] if ids[-1] == eos_id else ids[:max_len]


# ---- generation and evaluation -----------------------------------------------------------------
def _strip(ids: list[int], eos_id: int | None, start: int) -> list[int]:
    """Generated ids without a leading start token and from the first eos on."""
    if ids and ids[0] == start:
        ids = ids[1:]
    if eos_id is not None and eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return ids


@torch.no_grad()
def translate(model, tok: Tokenizer, texts: Sequence[str], num_beams: int = 4, max_new_tokens: int | None = None,
              batch_size: int = 32, max_len: int | None = None) -> list[str]:
    """Generate a target for each source text with beam search (num_beams=1: greedy).
    max_new_tokens None → 1.5 × the longest source of the batch + 10 (capped at the model's max_len)."""
    from lmforge.generate.search import generate
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not a string")
    cfg = model.cfg
    if cfg.family != "encoder-decoder" or cfg.task != "lm":
        raise ValueError(f"translate needs an encoder-decoder LM, got family={cfg.family!r} task={cfg.task!r}")
    model.eval()
    start, limit = start_id(cfg, tok), max_len or cfg.max_len
    src = [_cut(ids, limit, tok.eos_id) for ids in tok.encode_batch(list(texts))]
    out: list[str] = [""] * len(src)
    for idx in length_batches([len(s) for s in src], batch_size):
        ids, mask = pad_batch([src[i] for i in idx], tok.pad_id)
        n = max_new_tokens or min(int(1.5 * ids.shape[1]) + 10, cfg.max_len - 1)
        gen = generate(model, ids, mask, max_new_tokens=n, strategy="beam" if num_beams > 1 else "greedy",
                       num_beams=num_beams)
        for i, row in zip(idx, gen.tolist()):
            out[i] = tok.decode(_strip(row, tok.eos_id, start)).strip()
    return out


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """sacreBLEU and chrF (0-100), plus ROUGE-1/2/L (0-1) when `rouge_score` is installed."""
    scores = {"bleu": bleu(hypotheses, references).score, "chrf": chrf(hypotheses, references).score}
    try:
        scores.update(rouge(hypotheses, references))
    except ImportError:
        pass
    return scores


def eval_seq2seq(model, tok: Tokenizer, pairs: Sequence[Pair], num_beams: int = 4, batch_size: int = 32,
                 max_new_tokens: int | None = None, max_len: int | None = None) -> dict[str, float]:
    """Generate for every source and score against the targets: {bleu, chrf[, rouge1, rouge2, rougeL]}."""
    hyps = translate(model, tok, [p.source for p in pairs], num_beams, max_new_tokens, batch_size, max_len)
    return {**corpus_scores(hyps, [p.target for p in pairs]), "pairs": len(pairs)}
