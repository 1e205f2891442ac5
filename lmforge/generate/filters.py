"""Composable logits processors for generation, numerically equal to HF transformers' ones.

Every filter maps logits (B, V) to new logits (B, V) and never writes into its input;
removed tokens get -inf. A filter that is switched off (t == 1, k == 0, p == 1, ...)
returns its input object unchanged. `SamplingParams.process` chains them in the order
HF `generate` uses (`GenerationMixin._get_logits_processor`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


def apply_temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    """Divide logits by temperature t > 0 (HF TemperatureLogitsWarper)."""
    if not t > 0:
        raise ValueError(f"temperature must be > 0, got {t}")
    return logits if t == 1.0 else logits / t


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep tokens whose logit is >= the k-th largest, so ties at the cut all survive.

    HF TopKLogitsWarper; k is clamped to the vocabulary size and k == 0 switches it off.
    """
    if k < 0:
        raise ValueError(f"top_k must be >= 0, got {k}")
    if k == 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020), exactly as HF TopPLogitsWarper.

    Sort ascending, drop tokens whose cumulative probability is <= 1 - p, and always
    keep the most likely token. p == 1 switches it off, as in HF `generate`.
    """
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p == 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)  # (B, V)
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cum_probs <= (1 - p)
    sorted_remove[..., -1:] = False  # min_tokens_to_keep = 1
    remove = sorted_remove.scatter(-1, sorted_idx, sorted_remove)
    return logits.masked_fill(remove, NEG_INF)


def min_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop tokens with probability < p * max probability (Nguyen et al. 2024; HF MinPLogitsWarper)."""
    if not 0 <= p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {p}")
    if p == 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    remove = probs < p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)  # keep at least 1
    return logits.masked_fill(remove, NEG_INF)


def repetition_penalty(logits: torch.Tensor, input_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise every token already in input_ids (B, T) (Keskar et al. 2019, CTRL).

    Negative logits are multiplied by the penalty, the others divided by it, as in
    HF RepetitionPenaltyLogitsProcessor. Ids >= V are ignored.
    """
    if not penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
    if penalty == 1.0 or input_ids.numel() == 0:
        return logits
    B, V = logits.shape
    seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)  # spare column for ids >= V
    seen.scatter_(1, input_ids.clamp(max=V), True)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen[:, :V], penalised, logits)


def no_repeat_ngram_mask(input_ids: torch.Tensor, n: int) -> list[list[int]]:
    """Per row of input_ids (B, T), the tokens that would complete an n-gram already present.

    HF NoRepeatNGramLogitsProcessor semantics; n == 0 bans nothing.
    """
    if n < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0, got {n}")
    B, T = input_ids.shape
    if n == 0 or T < n:
        return [[] for _ in range(B)]
    prefix = input_ids[:, T - n + 1 :]  # (B, n-1): the current suffix
    windows = input_ids.unfold(1, n, 1)  # (B, T-n+1, n)
    # A window whose first n-1 tokens equal the suffix bans its last token.
    matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)  # (B, T-n+1)
    return [sorted(set(windows[b, matches[b], -1].tolist())) for b in range(B)]


def no_repeat_ngram_filter(logits: torch.Tensor, input_ids: torch.Tensor, n: int) -> torch.Tensor:
    """Set to -inf every token that would repeat an n-gram of input_ids (B, T)."""
    banned = no_repeat_ngram_mask(input_ids, n)
    if not any(banned):
        return logits
    V = logits.size(-1)
    mask = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    for b, ids in enumerate(banned):
        mask[b, [i for i in ids if i < V]] = True
    return logits.masked_fill(mask, NEG_INF)


def min_new_tokens_filter(
    logits: torch.Tensor, eos_ids: int | Sequence[int], cur_new: int, min_new: int
) -> torch.Tensor:
    """Forbid the EOS token(s) while fewer than min_new tokens have been generated.

    HF MinNewTokensLengthLogitsProcessor; cur_new counts tokens generated so far.
    """
    if cur_new >= min_new:
        return logits
    ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    out = logits.clone()
    out[..., ids] = NEG_INF
    return out


def sample_next(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from softmax(logits) (B, V) -> (B,), as HF `generate` samples."""
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


@dataclass
class SamplingParams:
    """Sampling settings. temperature == 0 means greedy: `process` then skips the scaling."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def __post_init__(self):
        self.validate(sampling=False)

    def validate(self, sampling: bool = True) -> SamplingParams:
        """Raise ValueError naming the first invalid field; temperature 0 is allowed only if not sampling."""
        t = self.temperature
        if not (isinstance(t, (int, float)) and math.isfinite(t) and (t > 0 or (t == 0 and not sampling))):
            need = "> 0 when sampling" if sampling else ">= 0"
            raise ValueError(f"temperature must be {need}, got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        n = self.no_repeat_ngram_size
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"no_repeat_ngram_size must be an int >= 0, got {n!r}")
        return self

    def process(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Apply penalties, then temperature, top-k, top-p and min-p, in HF `generate`'s order.

        logits (B, V) are the next-token scores; input_ids (B, T) is everything so far.
        """
        logits = repetition_penalty(logits, input_ids, self.repetition_penalty)
        logits = no_repeat_ngram_filter(logits, input_ids, self.no_repeat_ngram_size)
        if self.temperature > 0:  # 0 = greedy; the warpers below never drop the argmax
            logits = apply_temperature(logits, self.temperature)
        logits = top_k_filter(logits, self.top_k)
        logits = top_p_filter(logits, self.top_p)
        return min_p_filter(logits, self.min_p)
