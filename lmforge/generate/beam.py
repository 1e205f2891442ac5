"""Beam search with HF transformers' semantics, identical sequences and `sequences_scores`.

length_penalty: a finished hypothesis scores sum(log p) / L**length_penalty, L = its new
tokens including EOS. early_stopping: True stops a prompt once num_beams hypotheses are
finished; False stops when the best running beam at its current length cannot win;
"never" assumes it could grow to max_new_tokens (when length_penalty > 0). Of the logits
filters only the penalties (repetition_penalty, no_repeat_ngram_size) apply.
"""

from __future__ import annotations

import torch

from lmforge.generate.filters import min_new_tokens_filter
from lmforge.generate.sampling import history, is_penalised, penalties
from lmforge.generate.state import DecoderState, Prepared


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B, K, ...) rows idx (B, K') along dim 1 (torch.gather: take_along_dim's broadcasting
    and index wrapping cost several ops a call, and a beam step makes a dozen of these)."""
    if t.dim() > 2:
        idx = idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
    return t.gather(1, idx)


@torch.inference_mode()
def beam_loop(model, p: Prepared) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF transformers' `_beam_search` (v4.50+ vectorised form) on a DecoderState.

    Each step keeps the K = max(2, 1 + #eos) * num_beams best continuations of all beams; the
    best num_beams that did not stop keep running, and those among the top num_beams that
    stopped (EOS, stop string, length) enter the finished set with score
    sum(log p) / (new tokens incl. EOS) ** length_penalty. Returns the finished set per prompt:
    sequences (B, num_beams, T), scores (B, num_beams), lengths (B, num_beams).
    """
    cfg, ids, mask, eos_ids, stop = p.config, p.ids, p.mask, p.eos, p.stop
    B, nb, T = ids.shape[0], cfg.beams, cfg.max_new_tokens
    min_new_tokens, length_penalty, early_stopping = cfg.min_new_tokens, cfg.length_penalty, cfg.early_stopping
    params = cfg.sampling
    dev = ids.device
    state, logits = DecoderState.prefill(model, ids, mask, T, compiled=cfg.compile, chunk=cfg.prefill_chunk)
    grow = torch.arange(B, device=dev).repeat_interleave(nb)  # each prompt's cache, once per beam
    state.reorder(grow)
    logits = logits.index_select(0, grow)
    penalised = is_penalised(params)
    if penalised or stop:
        hist, P = history(model, ids, mask, T)
        hist = hist.index_select(0, grow)
    V = logits.shape[-1]
    K = max(2, 1 + len(eos_ids)) * nb
    top_nb = torch.arange(K, device=dev) < nb  # (K,)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=dev)
    pad = p.pad

    run_seq = torch.full((B, nb, T), pad, dtype=torch.long, device=dev)
    run_scores = torch.zeros(B, nb, device=dev)
    run_scores[:, 1:] = -1e9  # only beam 0 is live at first: the beams start identical
    fin_seq, fin_len = run_seq.clone(), torch.zeros(B, nb, dtype=torch.long, device=dev)
    fin_scores = torch.full((B, nb), -1e9, device=dev)
    fin = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    open_ = torch.ones(B, 1, dtype=torch.bool, device=dev)  # can the finished set still improve?
    offset = (torch.arange(B, device=dev) * nb)[:, None]
    for t in range(T):
        logp = torch.log_softmax(logits, dim=-1)  # (B*nb, V)
        if eos_ids and t < min_new_tokens:
            logp = min_new_tokens_filter(logp, eos_ids, t, min_new_tokens)
        if penalised:
            logp = penalties(logp, hist[:, :P + t], params)
        logp = (logp.view(B, nb, V) + run_scores[:, :, None]).view(B, nb * V)
        top_scores, top_idx = torch.topk(logp, K)  # (B, K)
        src, tok = top_idx // V, top_idx % V
        top_seq = None  # the K candidates' sequences, built only when needed

        def candidates():
            seq = _gather(run_seq, src)
            seq[:, :, t] = tok
            return seq
        hits = torch.isin(tok, eos) if eos_ids else torch.zeros_like(tok, dtype=torch.bool)
        if t + 1 >= T:
            hits = torch.ones_like(hits)
        elif stop:
            top_seq = candidates()
            hits |= stop.hits(top_seq[:, :, :t + 1].reshape(B * K, t + 1)).view(B, K)
        # the best num_beams continuations that did not stop keep running
        run_lp = top_scores + hits.float() * -1.0e9
        keep = torch.topk(run_lp, nb).indices  # (B, nb)
        run_src, run_scores = _gather(src, keep), _gather(run_lp, keep)
        next_seq = _gather(run_seq, run_src)
        next_seq[:, :, t] = _gather(tok, keep)
        # stopped ones among the top num_beams join the finished set if they beat it (most
        # steps none did: then the finished set stays as it is)
        just = hits & top_nb[None]
        if bool(just.any()):
            top_seq = candidates() if top_seq is None else top_seq
            scored = top_scores / ((t + 1) ** length_penalty)
            scored = scored + (fin.all(-1, keepdim=True) & (early_stopping is True)).float() * -1.0e9
            scored = scored + (~open_).float() * -1.0e9
            scored = scored + (~just) * -1.0e9
            m_scores = torch.cat((fin_scores, scored), 1)
            best = torch.topk(m_scores, nb).indices
            fin_seq = _gather(torch.cat((fin_seq, top_seq), 1), best)
            fin_scores = _gather(m_scores, best)
            fin_len = _gather(torch.cat((fin_len, torch.full_like(tok, t + 1)), 1), best)
            fin = _gather(torch.cat((fin, just), 1), best)
        run_seq = next_seq
        # HF's heuristic: can the best running beam still beat the worst finished one?
        n = T if early_stopping == "never" and length_penalty > 0.0 else t + 1
        best_running = run_scores[:, :1] / (n ** length_penalty)
        worst = torch.where(fin, fin_scores.min(dim=1, keepdim=True)[0], -1.0e9)
        open_ = open_ & (best_running > worst).any(-1, keepdim=True)
        done = ~open_.any() | hits.all()
        if early_stopping is True:
            done |= fin.all()
        if bool(done):  # one sync a step
            break
        beam_idx = (run_src + offset).view(-1)
        state.reorder(beam_idx, same_source=True)
        if penalised or stop:
            hist = hist.index_select(0, beam_idx)
            hist[:, P + t] = run_seq[:, :, t].reshape(-1)
        logits = state.step(run_seq[:, :, t].reshape(-1))
    return fin_seq, fin_scores, fin_len
