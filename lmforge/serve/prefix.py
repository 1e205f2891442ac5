"""The engine's prefix cache: keys and values of recent prompts, reused by the prompts that
start the same way.

A chat server's prompts share their beginning: the chat template's system message, a long
instruction, the earlier turns of a conversation. After a prompt is prefilled, its keys and
values (every layer, every position) are kept here under its token ids. A new prompt takes
the longest common beginning it shares with a kept one (at most all its tokens but the
last, whose logits it needs), copies those positions into its slot, and prefills only the
rest (`lmforge.serve.batch`). A position's keys and values depend only on the tokens up to
it, so what is reused is what the prefill would compute; it is not bit for bit the same,
as with batching (products of other shapes round in the last bits).

The cache holds at most `max_bytes` of keys and values and `max_entries` prompts; the least
recently used go first. It is only for decoders whose keys do not depend on the batch's
offsets (not T5-style relative bias), and the engine empties it when the model's weights
change.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch


def common_prefix(a: list[int], b: tuple[int, ...]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Keys/values (n_layers, 2, KV, P, hd) of recent prompts, by their token ids (LRU)."""

    def __init__(self, max_bytes: int, max_entries: int = 256):
        if max_bytes < 0 or max_entries < 1:
            raise ValueError(f"PrefixCache needs max_bytes >= 0 and max_entries >= 1, got {max_bytes}, {max_entries}")
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self.entries: collections.OrderedDict[tuple[int, ...], torch.Tensor] = collections.OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def match(self, ids: list[int]) -> tuple[int, torch.Tensor | None]:
        """(m, kv): the longest beginning of `ids` a kept prompt shares, at most len(ids) - 1
        tokens, and that prompt's keys/values (their first m positions are ids[:m]'s); (0, None)
        when none shares a token."""
        best, kv, key = 0, None, None
        for k, v in self.entries.items():
            if k[0] != ids[0]:
                continue
            m = common_prefix(ids, k)
            if m > best:
                best, kv, key = m, v, k
        if key is None:
            return 0, None
        self.entries.move_to_end(key)
        return min(best, len(ids) - 1), kv

    def add(self, ids: list[int], take: Callable[[], torch.Tensor]) -> None:
        """Keep take() (n_layers, 2, KV, len(ids), hd), a copy of a prompt's keys/values, called
        only when the prompt is new: a prompt that a kept one starts with adds nothing, and a
        kept one that this prompt extends goes."""
        key = tuple(ids)
        if not key or not self.max_bytes:
            return
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        n = len(key)
        for k in list(self.entries):
            if len(k) >= n and k[:n] == key:  # a kept prompt already starts with this one
                self.entries.move_to_end(k)
                return
            if len(k) < n and key[:len(k)] == k:  # this one extends a kept prompt: it replaces it
                old = self.entries.pop(k)
                self.bytes -= old.numel() * old.element_size()
        kv = take()
        size = kv.numel() * kv.element_size()
        if size > self.max_bytes:
            return
        self.entries[key] = kv
        self.bytes += size
        while self.bytes > self.max_bytes or len(self.entries) > self.max_entries:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
