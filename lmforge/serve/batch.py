"""The running batch of the serving engine: continuous (iteration-level) batching.

Every running sequence owns a slot of one `SlotCache`, at its own length. At each step the
engine first `admit`s waiting requests (their prompts are prefilled into free slots, together
when their lengths are close, from where the prefix cache's match ends, giving their first
next-token logits), then `advance` chooses the next
token of every running sequence with that request's own options, sends the events, frees
the slots of the sequences that ended (the last slots move into the holes, so the running
ones stay 0..n-1) and runs one decoding step for all the others together: each row's token
at that row's own position, each row's keys masked beyond its own length. While one sequence
runs, on a model `lmforge.generate.native` takes (int4 Llama-family on lmforge's kernel), that
step is its one native call instead.

Token choice per row reuses generation's filters: one argmax for every row (greedy rows take
it), then per row the ones that need more (penalties, sampling with the request's own
generator), so a greedy answer has the tokens of `generate` alone and a seeded sample draws
what `generate(strategy="sample", seed=s)` draws, whatever else runs in the batch (batched
products change the logits in the last bits only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.generate.compiled import weights_version
from lmforge.generate.filters import SamplingParams, min_new_tokens_filter, sample_next
from lmforge.generate.native import NativeStep, native_fits
from lmforge.generate.sampling import is_penalised, penalties
from lmforge.generate.state import Prepared
from lmforge.generate.stream import Detokenizer
from lmforge.nn.attention import SlotCache
from lmforge.nn.linear import Linear, RowBlocks
from lmforge.nn.packed import PackedLinears, packing_enabled, packing_pays
from lmforge.serve.prefix import PrefixCache
from lmforge.serve.request import Event


@dataclass
class Seq:
    """One running sequence: its request, where it stands and how it chooses tokens."""

    req: object  # the engine's Request (events go out through req._push)
    prompt: torch.Tensor  # (1, P)
    max_new: int
    min_new: int
    params: SamplingParams
    sample: bool
    penalised: bool
    generator: torch.Generator | None
    detok: Detokenizer
    hist: torch.Tensor | None  # (1, P + max_new) prompt and new tokens, for the penalties
    pos: int  # positions written in the slot (the next token goes there)
    t: int = 0  # new tokens chosen

    @property
    def history(self) -> torch.Tensor:
        """What the filters see: prompt + new tokens when penalised, else nothing (1, 0)."""
        if self.hist is None:
            return self.prompt[:, :0]
        return self.hist[:, :self.prompt.shape[1] + self.t]


class Batch:
    """The sequences decoded together (at most `max_batch`) and their cache slots."""

    def __init__(self, model, tokenizer, eos: list[int], max_batch: int, stats, prefix: PrefixCache | None = None):
        cfg, bb = model.cfg, model.backbone
        self.model, self.tokenizer, self.eos, self.stats = model, tokenizer, eos, stats
        # T5-style relative bias is sliced at one offset for the whole batch: one row at a time,
        # and its cached keys are not reused
        self.max_batch = 1 if cfg.position == "relative" else max_batch
        self.prefix = prefix if cfg.position != "relative" else None
        # oneDNN weights packed once (lmforge.nn.packed) where that is measured to pay here
        w = bb.tokens.weight
        self.pack = (w.device.type == "cpu" and w.dtype == torch.float32 and packing_enabled()
                     and any(type(m) is Linear for m in model.modules())
                     and packing_pays(cfg.d_model, cfg.d_ff, min(self.max_batch, 16)))
        self._packed: PackedLinears | None = None
        self._version: tuple | None = None  # weights_version when the packed weights and prefix cache were made
        self._native: NativeStep | None = None  # one sequence's step, on slot 0 of the cache's buffer
        self._native_ok = False  # whether the model takes it (checked once per busy period)
        if self.pack:  # now, not at the first request
            self._repack()
        self.cache = SlotCache.for_model(cfg, bb.tokens.weight.dtype, bb.tokens.weight.device)
        self.seqs: list[Seq] = []
        self.logits: torch.Tensor | None = None  # (n, V) next-token logits of each running row

    def _repack(self) -> None:
        self._version = weights_version(self.model)
        self._packed = self._native = None
        if self.pack:
            self._packed = PackedLinears(self.max_batch)
            with torch.inference_mode():
                self._packed.pack_all(self.model)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def free(self) -> int:
        return self.max_batch - len(self.seqs)

    # ---- admission
    def admit(self, reqs: list) -> None:
        """Prefill the prompts of reqs, (Request, Prepared) pairs, into the next free slots; their
        first tokens come at `advance`. A prompt whose beginning the prefix cache holds starts
        from there; prompts that reuse m to 2m + 16 tokens start together, from m. Prompts of
        similar lengths run as one right-padded block (causal attention: no real token sees
        the padding after it)."""
        if not self.seqs:  # a new busy period: weights may have changed since the last one
            self.cache.rel_bias = None
            if weights_version(self.model) != self._version:
                if self.prefix is not None:
                    self.prefix.clear()
                self._repack()
            self.cache.blocks = self._packed if self._packed is not None else RowBlocks()
            self._native_ok = native_fits(self.model)
        found = sorted(((req, p, *(self.prefix.match(p.ids[0].tolist()) if self.prefix is not None else (0, None)))
                        for req, p in reqs), key=lambda r: r[2])
        groups: list[list] = []  # rows that reuse m >= start, at most 2 * start + 16 tokens, start together
        for row in found:
            if not groups or row[2] > 2 * groups[-1][0][2] + 16:
                groups.append([])
            groups[-1].append(row)
        for rows in groups:
            start = rows[0][2]
            group: list = []
            for row in sorted(rows, key=lambda r: r[1].ids.shape[1]):
                T = row[1].ids.shape[1] - start  # the longest yet (sorted): padding stays under half the block
                if group and (len(group) + 1) * T > 2 * (T + sum(g[1].ids.shape[1] - start for g in group)):
                    self._prefill(group, start)
                    group = []
                group.append(row)
            if group:
                self._prefill(group, start)

    def _prefill(self, group: list, start: int) -> None:
        """Prefill (Request, Prepared, m, kv) rows from position `start`: positions before it
        are copied from each row's prefix-cache match."""
        cache, first, n = self.cache, len(self.seqs), len(group)
        full = [p.ids.shape[1] for _, p, _, _ in group]
        lengths = [P - start for P in full]
        T, dev = max(lengths), group[0][1].ids.device
        cache.reserve(max(first + n, self.max_batch), max(start + T, *(P + p.config.max_new_tokens for P, (_, p, _, _) in zip(full, group))))
        ids = torch.full((n, T), group[0][1].pad, dtype=torch.long, device=dev)
        for i, (_, p, _, kv) in enumerate(group):
            ids[i, :lengths[i]] = p.ids[0, start:]
            if start:
                cache.put(first + i, kv, start)
        cache.prefill(first, n, start)
        hidden = self.model.backbone.decode(ids, cache=cache)  # (n, T, d)
        last = hidden[torch.arange(n, device=dev), torch.tensor(lengths, device=dev) - 1]  # (n, d)
        logits = self.model.logits(last[:, None])[:, 0].float()  # (n, V)
        self.stats["cached_prompt_tokens"] += start * n
        for i, ((req, p, _, _), P) in enumerate(zip(group, full)):
            req.cached_tokens = start
            if self.prefix is not None:
                self.prefix.add(p.ids[0].tolist(), lambda slot=first + i, P=P: cache.take(slot, P))
            config, params = p.config, p.config.sampling
            penalised = is_penalised(params)
            hist = None
            if penalised:
                hist = torch.zeros(1, P + config.max_new_tokens, dtype=torch.long, device=dev)
                hist[:, :P] = p.ids
            self.seqs.append(Seq(req, p.ids, config.max_new_tokens, config.min_new_tokens, params,
                                 config.strategy == "sample", penalised, p.generator,
                                 Detokenizer(self.tokenizer, config.stop), hist, pos=P))
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])

    # ---- one step
    def advance(self, cancel_all: bool = False) -> None:
        """Choose and send every running row's next token, free the rows that ended, and run
        one decoding step for the others."""
        dead = {i for i, s in enumerate(self.seqs) if cancel_all or s.req.cancelled}
        for i in dead:
            self.seqs[i].req._push(Event(finish_reason="cancelled"))
        if dead:
            self._drop(dead, None)
        if not self.seqs:
            return
        tokens, logprobs = self._choose()
        ended = set()
        for i, (s, tok) in enumerate(zip(self.seqs, tokens)):
            event = Event(token=tok)
            if logprobs[i] is not None:
                event.logprob, event.top_logprobs = logprobs[i]
            s.t += 1
            if s.hist is not None:
                s.hist[0, s.prompt.shape[1] + s.t - 1] = tok
            if tok in self.eos:
                event.text, event.finish_reason = s.detok.flush(), "stop"
            else:
                event.text = s.detok.push(tok)
                if s.detok.stopped:
                    event.finish_reason = "stop"
                elif s.t == s.max_new:
                    event.text += s.detok.flush()
                    event.finish_reason = "length"
            s.req._push(event)
            if event.finish_reason is not None:
                ended.add(i)
        self.stats["completion_tokens"] += len(tokens)
        if ended:
            tokens = self._drop(ended, tokens)
        if self.seqs:
            self._step(tokens)

    def _choose(self) -> tuple[list[int], list]:
        """Each row's next token, and its (log p, top log-probs) when its request asks."""
        logits, seqs = self.logits, self.seqs
        raw = logits
        for i, s in enumerate(seqs):
            if self.eos and s.t < s.min_new:
                if logits is raw:
                    logits = logits.clone()
                logits[i:i + 1] = min_new_tokens_filter(logits[i:i + 1], self.eos, s.t, s.min_new)
        tokens = logits.argmax(-1).tolist()  # every greedy row at once
        for i, s in enumerate(seqs):
            if s.sample:
                row = s.params.process(logits[i:i + 1], s.history)
                tokens[i] = int(sample_next(row, s.generator)[0])
            elif s.penalised:
                tokens[i] = int(penalties(logits[i:i + 1], s.history, s.params).argmax(-1)[0])
        logprobs = [None] * len(seqs)
        asked = [i for i, s in enumerate(seqs) if s.req.logprobs is not None]
        if asked:
            logp = raw[asked].log_softmax(-1)  # (a, V), from the model's own logits
            chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in asked], device=logp.device))[:, 0].tolist()
            k = max(seqs[i].req.logprobs for i in asked)
            top = logp.topk(k) if k else None
            for j, i in enumerate(asked):
                kk = seqs[i].req.logprobs
                pairs = list(zip(top.indices[j, :kk].tolist(), top.values[j, :kk].tolist())) if kk else None
                logprobs[i] = (chosen[j], pairs)
        return tokens, logprobs

    def _drop(self, dead: set[int], tokens: list[int] | None) -> list[int] | None:
        """Free the rows in `dead`: the last live rows move into the holes. Returns the live
        rows' tokens in the new order."""
        n, m = len(self.seqs), len(self.seqs) - len(dead)
        movers = iter(i for i in range(m, n) if i not in dead)
        order = []
        for j in range(m):
            if j in dead:
                src = next(movers)
                self.cache.move(src, j, self.seqs[src].pos)
                order.append(src)
            else:
                order.append(j)
        self.seqs = [self.seqs[i] for i in order]
        self.logits = self.logits[order] if m else None
        return None if tokens is None else [tokens[i] for i in order]

    def _step(self, tokens: list[int]) -> None:
        """Feed each row its token at its own position; keep the next-token logits."""
        seqs, cache = self.seqs, self.cache
        if len(seqs) == 1 and self._native_ok:
            if self._native is None or not self._native.serves(cache.buf):  # made anew when the cache grows
                self._native = NativeStep(self.model, cache.buf)
            self.logits = self._native(tokens[0], seqs[0].pos)
        else:
            self.logits = self._batched_step(tokens)
        for s in seqs:
            s.pos += 1
        self.stats["steps"] += 1
        self.stats["batch_tokens"] += len(seqs)

    def _batched_step(self, tokens: list[int]) -> torch.Tensor:
        """The running rows' tokens through the model together: their next-token logits (n, V)."""
        seqs, cache = self.seqs, self.cache
        dev = cache.buf.device
        pos = [s.pos for s in seqs]
        top = max(pos)
        positions = torch.tensor(pos, device=dev)
        cache.step(positions, top)
        mask = None  # rows at one length see every key; else each row masks the keys past its own
        if min(pos) != top:
            mask = torch.arange(top + 1, device=dev) <= positions[:, None]  # (n, top + 1)
        hidden = self.model.backbone.decode(torch.tensor(tokens, device=dev).view(-1, 1), attention_mask=mask,
                                            position_ids=positions.view(-1, 1), cache=cache)
        return self.model.logits(hidden)[:, 0].float()

    def fail(self, reason: str) -> None:
        """End every running request with `reason` (the engine hit an error) and empty the batch."""
        for s in self.seqs:
            if not s.req.done:
                s.req._push(Event(finish_reason=reason))
        self.seqs, self.logits = [], None
