"""Training objectives as plain functions `(model, batch) -> (loss, metrics)`.

The training loop calls one of these without knowing which. A batch is a dict of
tensors; the keys the model takes (`input_ids`, `attention_mask`, `token_type_ids`,
`decoder_input_ids`, `decoder_attention_mask`, `position_ids`) go to `model(...)`, the
rest are targets. Targets use -100 for "not a target", as `F.cross_entropy` ignores.
`loss` is what is optimised (label-smoothed when asked); `metrics` are detached 0-d
tensors: always `loss`, plus `nll` (plain cross-entropy, for perplexity) and accuracies.
The token objectives (causal LM, MLM, seq2seq) ask the model for the logits of the positions
that have a target only (`logits_at`): BERT's MLM reads ~15% of them.

Options such as label smoothing are keyword arguments; bind them with
`functools.partial` or `get_objective(name, label_smoothing=0.1)`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmforge.data.noising import IGNORE_INDEX

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "decoder_input_ids",
                "decoder_attention_mask", "position_ids")

Objective = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS and v is not None}


def _token_loss(model, inputs: dict, targets: torch.Tensor, label_smoothing: float) -> tuple:
    """The model's output for the positions whose target (B, T) is not -100, with the token part
    (LM or MLM logits) replaced by its (loss, nll, acc) (`targets` of lmforge.models.heads.Model).
    The model computes no other position's logits (`logits_at`): each would cost a product with
    the whole vocabulary. Loss and logits are float32, also under bf16 autocast."""
    keep = targets != IGNORE_INDEX
    if not bool(keep.any()):
        raise ValueError("the batch has no target tokens (every label is -100)")
    if bool(keep.all()):  # every position: no gather
        return model(**inputs, targets=targets, label_smoothing=label_smoothing)
    return model(**inputs, logits_at=keep, targets=targets[keep], label_smoothing=label_smoothing)


def causal_lm(model, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Next-token prediction for decoder LMs.

    batch: `input_ids` (B, T), optional `attention_mask` (B, T), optional `targets` (B, T) where
    targets[:, t] is the token after input_ids[:, t] (nanoGPT's (x, y)). Without `targets`, the
    inputs are shifted: position t predicts input_ids[:, t + 1], padding (mask 0) excluded.
    """
    if "targets" in batch:
        targets = batch["targets"]
    else:  # position t predicts input t + 1; the last position predicts nothing
        ids = batch["input_ids"]
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
        if batch.get("attention_mask") is not None:
            targets = targets.masked_fill(batch["attention_mask"].roll(-1, dims=1) == 0, IGNORE_INDEX)
    loss, nll, acc = _token_loss(model, _inputs(batch), targets, label_smoothing)
    return loss, {"loss": loss.detach(), "nll": nll, "acc": acc}


def _mlm_part(out):
    """(loss, nll, acc) of the MLM head; a pretraining model gives (that, NSP logits)."""
    return out[0] if isinstance(out[0], tuple) else out


def masked_lm(model, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Masked-token prediction (BERT): CE over positions where `labels` (B, T) != -100."""
    loss, nll, acc = _mlm_part(_token_loss(model, _inputs(batch), batch["labels"], label_smoothing))
    return loss, {"loss": loss.detach(), "nll": nll, "mlm_acc": acc}


def mlm_nsp(model, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """BERT pretraining (Devlin et al. 2019, sec. 3.1): MLM loss + next-sentence-prediction CE.

    batch: `labels` (B, T) as for `masked_lm`, `next_sentence_label` (B,) with 0 = IsNext, 1 = NotNext.
    `nll` is the MLM part alone, so its exp is the MLM perplexity.
    """
    (mlm_loss, nll, mlm_acc), nsp_logits = _token_loss(model, _inputs(batch), batch["labels"], label_smoothing)
    nsp_target = batch["next_sentence_label"]
    nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_target)
    loss = mlm_loss + nsp_loss
    nsp_acc = (nsp_logits.detach().argmax(-1) == nsp_target).float().mean()
    return loss, {"loss": loss.detach(), "nll": nll, "mlm_acc": mlm_acc,
                  "nsp_loss": nsp_loss.detach(), "nsp_acc": nsp_acc}


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Teacher-forcing decoder inputs: [start] + labels[:-1], with -100 replaced by pad (as HF's
    `shift_tokens_right`). labels (B, T) -> (B, T)."""
    dec = torch.full_like(labels, start_id)
    dec[:, 1:] = labels[:, :-1]
    return dec.masked_fill(dec == IGNORE_INDEX, pad_id)


def seq2seq(model, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Encoder-decoder teacher forcing (T5 span corruption, BART denoising, translation).

    batch: `input_ids`, `attention_mask` (B, S), `labels` (B, T) padded with -100, and optionally
    `decoder_input_ids` / `decoder_attention_mask`; without them the decoder reads the labels
    shifted right behind the config's `decoder_start_id`. The paper trains with label smoothing 0.1.
    """
    if batch.get("decoder_input_ids") is None:
        cfg = model.cfg
        if cfg.decoder_start_id is None:
            raise ValueError("seq2seq: the model config has no decoder_start_id and the batch no decoder_input_ids")
        pad = cfg.pad_id if cfg.pad_id is not None else cfg.decoder_start_id
        batch = {**batch, "decoder_input_ids": shift_right(batch["labels"], cfg.decoder_start_id, pad)}
    loss, nll, acc = _token_loss(model, _inputs(batch), batch["labels"], label_smoothing)
    return loss, {"loss": loss.detach(), "nll": nll, "acc": acc}


def classification(model, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Sequence classification: CE of the (B, num_labels) logits against `labels` (B,)."""
    logits = model(**_inputs(batch)).float()  # (B, C)
    labels = batch["labels"]
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    acc = (logits.detach().argmax(-1) == labels).float().mean()
    return loss, {"loss": loss.detach(), "acc": acc}


def span_qa(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Extractive QA (BERT on SQuAD): mean of the start and end CE over `start_positions`,
    `end_positions` (B,). Positions outside the sequence are ignored, as in HF."""
    start, end = model(**_inputs(batch))  # (B, T) each
    T = start.shape[1]
    s_pos, e_pos = batch["start_positions"].clamp(0, T), batch["end_positions"].clamp(0, T)
    loss = (F.cross_entropy(start.float(), s_pos, ignore_index=T)
            + F.cross_entropy(end.float(), e_pos, ignore_index=T)) / 2
    with torch.no_grad():
        s_ok, e_ok = start.argmax(-1) == s_pos, end.argmax(-1) == e_pos
    return loss, {"loss": loss.detach(), "start_acc": s_ok.float().mean(), "end_acc": e_ok.float().mean(),
                  "span_acc": (s_ok & e_ok).float().mean()}


# The one registry: pretraining recipes (`objective: NAME`), fine-tuning and tests look objectives
# up here. The three encoder-decoder pretraining objectives share the seq2seq loss; what differs
# is how their batches are noised (lmforge.data.batches).
OBJECTIVES: dict[str, Objective] = {
    "causal_lm": causal_lm,
    "masked_lm": masked_lm,
    "mlm_nsp": mlm_nsp,
    "seq2seq": seq2seq,
    "span_corruption": seq2seq,  # T5 (Raffel et al. 2020)
    "denoising": seq2seq,  # BART (Lewis et al. 2020)
    "translation": seq2seq,
    "classification": classification,
    "span_qa": span_qa,
}
ALIASES = {"mlm": "masked_lm"}  # earlier recipe spelling, still accepted


def objective_name(name: str) -> str:
    """The registry name for `name` (an alias such as "mlm" → "masked_lm"); unknown names are an
    error listing the known ones."""
    name = ALIASES.get(name, name)
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; available: {', '.join(OBJECTIVES)} "
                         f"(aliases: {', '.join(f'{a}={n}' for a, n in ALIASES.items())})")
    return name


def get_objective(name: str, **options) -> Objective:
    """The objective registered under `name` (or an alias), with keyword options (e.g.
    label_smoothing) bound."""
    fn = OBJECTIVES[objective_name(name)]
    return functools.partial(fn, **options) if options else fn
