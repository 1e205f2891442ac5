"""Task heads over the shared backbone and `Model`, the one module a checkpoint holds.

`forward` returns tensors: LM/MLM logits (B, T, V), or (N, V) for the N positions of
`logits_at`; pretraining (MLM logits, NSP logits (B, 2)); classify logits (B, num_labels); qa
(start, end) logits (B, T) each; embed sentence vectors (B, d).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.nn.cross_entropy import token_loss
from lmforge.nn.layers import activation
from lmforge.nn.linear import Linear, fast_linear


def check_token_ids(ids: torch.Tensor, vocab_size: int, name: str = "input_ids") -> None:
    """Refuse ids outside [0, vocab_size), naming the id, where it is and the vocabulary size: the
    embedding lookup would fail deep in torch (an IndexError on CPU, a device assert on CUDA).
    Costs one min/max (and a sync on an accelerator); skipped inside torch.compile."""
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        at = tuple((ids == bad).nonzero()[0].tolist())
        raise ValueError(f"{name} holds token id {bad} at {at}, outside the model's vocabulary of "
                         f"{vocab_size} tokens (ids 0 to {vocab_size - 1})")


class LMHead(nn.Module):
    """Softmax output over the vocabulary: logits = (s·h) W_E^T (+ b), W_E tied or not."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.scale = cfg.logit_scale
        self.weight = None if cfg.tie_embeddings else nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.lm_head_bias else None

    def forward(self, h: torch.Tensor, tokens: nn.Embedding, targets: torch.Tensor | None = None,
                label_smoothing: float = 0.0):
        """The logits (..., V); with `targets` (...), `token_loss`'s (loss, nll, acc) instead."""
        w = tokens.weight if self.weight is None else self.weight
        return _vocab(h * self.scale if self.scale != 1.0 else h, w, self.bias, targets, label_smoothing)


class MLMHead(nn.Module):
    """BERT's MLM head: dense → act → LayerNorm → tied decoder + bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = Linear(cfg.d_model, cfg.d_model)
        self.act = activation(cfg.activation)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor, tokens: nn.Embedding, targets: torch.Tensor | None = None,
                label_smoothing: float = 0.0):
        """As LMHead's."""
        return _vocab(self.norm(self.act(self.dense(h))), tokens.weight, self.bias, targets, label_smoothing)


def _vocab(x, w, b, targets, label_smoothing):
    return fast_linear(x, w, b) if targets is None else token_loss(x, w, b, targets, label_smoothing)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, T, d) → (B, d): masked mean, first token ([CLS]) or last real token."""
    if how == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    m = attention_mask.to(hidden.dtype)
    if how == "mean":
        return (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)
    # last real token; works for right and left padding
    idx = (m * torch.arange(1, m.shape[1] + 1, device=m.device)).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


class Model(nn.Module):
    """Backbone + the head named by `cfg.task`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Transformer(cfg)
        t = cfg.task
        self.lm_head = LMHead(cfg) if t == "lm" else None
        self.mlm_head = MLMHead(cfg) if t in ("mlm", "pretraining") else None
        self.nsp_head = nn.Linear(cfg.d_model, 2) if t == "pretraining" else None
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels, bias=cfg.family != "decoder") \
            if t == "classify" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.qa_head = nn.Linear(cfg.d_model, 2) if t == "qa" else None
        self.apply(self._init)

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, LMHead) and m.weight is not None:
            nn.init.normal_(m.weight, std=self.cfg.init_std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden(self, input_ids, attention_mask=None, token_type_ids=None, decoder_input_ids=None,
               decoder_attention_mask=None, position_ids=None) -> torch.Tensor:
        """Final hidden states of the top stack: (B, T, d)."""
        bb, fam = self.backbone, self.cfg.family
        check_token_ids(input_ids, self.cfg.vocab_size)
        if decoder_input_ids is not None:
            check_token_ids(decoder_input_ids, self.cfg.vocab_size, "decoder_input_ids")
        if fam == "encoder":
            return bb.encode(input_ids, attention_mask, token_type_ids)
        if fam == "decoder":
            return bb.decode(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if decoder_input_ids is None:
            raise ValueError("an encoder-decoder model needs decoder_input_ids")
        memory = bb.encode(input_ids, attention_mask)
        return bb.decode(decoder_input_ids, memory=memory, memory_mask=attention_mask,
                         attention_mask=decoder_attention_mask)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM logits (..., V) from top hidden states (..., d)."""
        return self.lm_head(hidden, self.backbone.tokens)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, decoder_input_ids=None,
                decoder_attention_mask=None, position_ids=None, logits_at=None, targets=None,
                label_smoothing=0.0):
        """logits_at: a bool (B, T) mask over the positions of the top stack (the decoder's in an
        encoder-decoder): the LM or MLM logits of those positions only, as (N, V) in row-major
        order. An objective passes the positions that have a target: every other position would
        cost a product with the whole vocabulary (BERT's MLM reads ~15% of them).
        targets: the token targets of those positions ((N,), or (B, T) without logits_at; -100 for
        none): instead of the logits, (loss, nll, acc) of their cross-entropy, which under a gradient
        is fused with the vocabulary product (lmforge.nn.cross_entropy) and makes no (N, V) tensor."""
        t = self.cfg.task
        for name, given in (("logits_at", logits_at), ("targets", targets)):
            if given is not None and t not in ("lm", "mlm", "pretraining"):
                raise ValueError(f"{name} applies to the tasks lm, mlm and pretraining; this model's task is {t!r}")
        if t == "embed" and self.cfg.family == "encoder-decoder":
            check_token_ids(input_ids, self.cfg.vocab_size)
            h = self.backbone.encode(input_ids, attention_mask)
        else:
            h = self.hidden(input_ids, attention_mask, token_type_ids, decoder_input_ids,
                            decoder_attention_mask, position_ids)
        at = h if logits_at is None else h[logits_at]
        loss_args = () if targets is None else (targets, label_smoothing)  # a quantised head takes none
        if t == "lm":
            return self.lm_head(at, self.backbone.tokens, *loss_args)
        if t == "mlm":
            return self.mlm_head(at, self.backbone.tokens, *loss_args)
        if t == "pretraining":
            return self.mlm_head(at, self.backbone.tokens, *loss_args), self.nsp_head(self.backbone.pool(h))
        if t == "qa":
            start, end = self.qa_head(h).unbind(-1)
            return start, end
        if t == "embed":
            return pool(h, attention_mask, self.cfg.pooling)
        # classify: BERT's pooled [CLS]; decoders use the last real token (as HF does)
        if self.cfg.family == "encoder":
            x = self.backbone.pool(h) if self.backbone.pooler is not None else h[:, 0]
        else:
            mask = decoder_attention_mask if self.cfg.family == "encoder-decoder" else attention_mask
            x = pool(h, mask, "last")
        return self.classifier(self.drop(x))


def build_model(cfg: ModelConfig) -> Model:
    return Model(cfg)
