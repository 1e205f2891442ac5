"""Linear weights kept in oneDNN's packed layout, for the serving engine's decoding steps.

At a step of the engine (`lmforge.serve.batch`) every linear map multiplies a few rows, one
per running sequence. Given a plain weight, oneDNN lays it out in its blocked format at
every call, which at 16 rows costs about as much as the product itself. `PackedLinears`
lays each weight out once (q/k/v stacked into one, like `RowBlocks`) and keeps it: a copy of
the weights, as much memory again as the linear layers take. It takes the place of
`RowBlocks` (as fast at one row here).

Whether that pays depends on the CPU and its oneDNN build, so `packing_pays` measures it on
the model's own shapes before the engine uses it. Values differ from the unpacked product's
in the last bits only (another summation order).

One `PackedLinears` serves while the weights do not change: the engine makes a new one when
they do (`lmforge.generate.compiled.weights_version`). LMFORGE_PACKED=0 turns packing off.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from lmforge.nn.linear import Linear, _cpu_fp32
from lmforge.nn.measure import best_time, probe


def _packed_product(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _pack(w: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, rows)


def packing_enabled() -> bool:
    """oneDNN's packing ops are there, and LMFORGE_PACKED is not 0."""
    ops = torch.ops.mkldnn
    return os.environ.get("LMFORGE_PACKED", "1") != "0" and torch.backends.mkldnn.is_available() \
        and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")


def packing_pays(d_in: int, d_out: int, rows: int, repeats: int = 5) -> bool:
    """Whether a packed (d_out, d_in) float32 weight multiplies `rows` rows faster than the plain
    one here: the best of `repeats` runs of each, over a few weights too large for the cache."""
    if not packing_enabled():
        return False
    ws = [probe(d_out, d_in) for _ in range(4)]
    packed = [_pack(w, rows) for w in ws]
    x = probe(rows, d_in)
    with torch.inference_mode():
        plain = best_time(lambda: [_packed_product(x, w, None) for w in ws], repeats)
        pre = best_time(lambda: [_packed_product(x, p, None) for p in packed], repeats)
    return pre < 0.9 * plain


class PackedLinears:
    """`blocks` for the engine's passes: x [W_1; W_2; ...]^T + [b_1; ...] with the weights packed
    once (see the module docstring); the same interface as `RowBlocks`, in its place."""

    def __init__(self, rows: int):
        self.rows = rows  # the number of rows oneDNN lays the weights out for (any number works)
        self._packed: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __len__(self) -> int:
        return len(self._packed)

    def pack_all(self, model: nn.Module) -> None:
        """Pack every weight a pass will ask for now (q/k/v stacked as `QKV.project` asks), so
        that the first request does not wait for it."""
        from lmforge.nn.attention import QKV
        stacked = set()
        for m in model.modules():
            if isinstance(m, QKV) and all(type(x) is Linear for x in (m.q, m.k, m.v)):
                self._entry((m.q, m.k, m.v))
                stacked.update(map(id, (m.q, m.k, m.v)))
        for m in model.modules():
            if type(m) is Linear and id(m) not in stacked:
                self._entry((m,))

    def _entry(self, modules: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = tuple(map(id, modules))
        entry = self._packed.get(key)
        if entry is None:
            w = torch.cat([m.weight.detach() for m in modules]) if len(modules) > 1 else modules[0].weight.detach()
            b = None if modules[0].bias is None else torch.cat([m.bias.detach() for m in modules])
            entry = self._packed[key] = (_pack(w.contiguous(), self.rows), b)
        return entry

    def __call__(self, x: torch.Tensor, *modules: nn.Module) -> torch.Tensor | None:
        """The product of plain `Linear` modules, or None when this is not for packed weights
        (another module such as LoRA's or int8's, another dtype or device, gradients)."""
        if torch.is_grad_enabled() or any(type(m) is not Linear for m in modules) \
                or not _cpu_fp32(x, modules[0].weight):
            return None
        return _packed_product(x, *self._entry(modules))
