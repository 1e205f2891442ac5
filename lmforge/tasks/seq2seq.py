"""Sequence-to-sequence tasks (translation, summarisation): parallel text → batches → beam search → BLEU/chrF/ROUGE.

Data is read by `lmforge.data.parallel.read_parallel`: two line-aligned files, or JSONL with
`source` and `target` fields.

Teacher forcing (Vaswani et al. 2017, §5): the decoder reads
`decoder_input_ids = [start] + y` and learns `labels = y + [eos]`; padded label
positions are -100. Sources are encoded with the tokenizer's template (e.g. `x </s>`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lmforge.config import ModelConfig
from lmforge.data.corpus import pad_batch
from lmforge.data.noising import IGNORE_INDEX
from lmforge.data.parallel import Pair, read_parallel
from lmforge.evaluate import bleu, chrf, rouge
from lmforge.interop.load import load_with_tokenizer
from lmforge.models.heads import Model
from lmforge.objectives import get_objective
from lmforge.tasks.classify import length_batches
from lmforge.tasks.options import Options, Prepared, Task, input_texts
from lmforge.tokenizer import Tokenizer, train_tokenizer_from_iterator

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
        labels, _ = pad_batch([self.tgt[i] for i in idx], IGNORE_INDEX)
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


# ---- the task for lmforge.tasks.finetune -------------------------------------------------------------
def fresh_model(preset: str, pairs: Sequence[Pair], opts: Options) -> tuple[Model, Tokenizer]:
    """A new encoder-decoder from a preset with a joint byte-level BPE trained on both sides."""
    texts = [p.source for p in pairs] + [p.target for p in pairs]
    tok = train_tokenizer_from_iterator(texts, "bpe", opts.vocab_size, family="encoder-decoder")
    cfg = ModelConfig.preset(preset, **{"vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "bos_id": tok.bos_id,
                                        "eos_id": tok.eos_id, "decoder_start_id": tok.bos_id, **opts.model})
    if cfg.family != "encoder-decoder" or cfg.task != "lm":
        raise ValueError(f"preset {preset!r} is not an encoder-decoder LM")
    torch.manual_seed(opts.seed)
    return Model(cfg), tok


def _build(model_dir, train_file, valid_file, opts: Options) -> Prepared:
    train = read_parallel(train_file, opts.src_lang, opts.tgt_lang, limit=opts.limit)
    model_dir = str(model_dir)
    if model_dir.startswith("preset:"):
        model, tok = fresh_model(model_dir[len("preset:"):], train, opts)
    else:
        model, tok = load_with_tokenizer(model_dir)
        if model.cfg.family != "encoder-decoder" or model.cfg.task != "lm":
            raise ValueError(f"{model_dir}: seq2seq needs an encoder-decoder LM, got "
                             f"family={model.cfg.family!r} task={model.cfg.task!r}")
    start = start_id(model.cfg, tok)
    ds = Seq2SeqData(train, tok, start, opts.max_len)
    valid = read_parallel(valid_file, opts.src_lang, opts.tgt_lang, limit=opts.valid_limit) if valid_file else None
    vds = Seq2SeqData(valid, tok, start, opts.max_len) if valid else None
    return Prepared(model, tok, get_objective("seq2seq", label_smoothing=opts.label_smoothing), len(ds),
                    lambda bs, seed: ds.batches(bs, shuffle=True, seed=seed, epochs=None),
                    list(vds.batches(opts.eval_batch_size)) if vds else [],
                    lambda m: eval_seq2seq(m, tok, valid, opts.num_beams, opts.eval_batch_size,
                                           opts.max_new_tokens, opts.max_len) if valid else {})


def _evaluate(model, tok: Tokenizer, data_file, opts: Options) -> dict[str, float]:
    pairs = read_parallel(data_file, opts.src_lang, opts.tgt_lang, limit=opts.limit)
    return eval_seq2seq(model, tok, pairs, opts.num_beams, opts.eval_batch_size, opts.max_new_tokens, opts.max_len)


def _predict(model, tok: Tokenizer, inputs, context: str | None, opts: Options) -> list[dict]:
    texts = input_texts(inputs)
    outs = translate(model, tok, texts, opts.num_beams, opts.max_new_tokens, opts.eval_batch_size, opts.max_len)
    return [{"source": s, "translation": t} for s, t in zip(texts, outs)]


TASK = Task(build=_build, evaluate=_evaluate, predict=_predict)
