"""Cross-entropy over a vocabulary, fused with the product that makes its logits.

    token_loss   (loss, nll, acc) of logits = x W^T + b against targets: the fused
                 `LinearCrossEntropy` when a gradient is wanted, F.cross_entropy otherwise

The plain way makes the logits (N, V) and keeps them, then log-softmax, its backward and
the one-hot gradient each make another (N, V) tensor: four fresh 67 MB buffers a step for
a GPT-2-like batch (2,040 rows, vocabulary 8,192), page faults included. `LinearCrossEntropy`
instead takes the rows in chunks of `CHUNK_ROWS` and computes, for each, the logits, the
loss and the gradient of the logits in place, then the gradients of x, W and b, all while
the chunk is in cache; nothing of size (N, V) exists. It does the same three products
(forward, dx, dW) as autograd would, so it is exact to round-off, and it runs them in the
autocast dtype under bf16 autocast, as F.linear would; there the logit gradients of several
chunks are kept (`GROUP_BYTES`, 16 MB) so that dW takes one long product per group, not a
short one and a float32 sum per chunk. One exp per logit serves both the log-sum-exp and
the softmax, and accuracy compares the target's logit with the row's `amax` (max with
indices costs ten times as much on CPU). The backward only scales the gradients it kept. Off with LMFORGE_FUSED_CE=0 (for A/B measurements).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from lmforge.data.noising import IGNORE_INDEX
from lmforge.nn.linear import _cpu_fp32, _dnn, fast_linear, onednn_trains

FUSED = os.environ.get("LMFORGE_FUSED_CE", "1") != "0"
CHUNK_ROWS = 256  # rows of logits at a time: 8 MB in float32 at a vocabulary of 8,192
GROUP_BYTES = 16 << 20  # below float32, logit gradients kept for one dW product: 1,024 rows at V = 8,192


def token_loss(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, targets: torch.Tensor,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of logits = x W^T + b over the targets != -100.

    x (..., d), w (V, d), b (V,) or None, targets (...) of ints. Returns (loss, nll, acc): `loss`
    is what is optimised (label-smoothed when asked), `nll` the plain cross-entropy and `acc` the
    share of targets whose logit is the largest (a tie for it counts), both detached. The logits
    and the loss are float32, also under bf16 autocast. The unfused path (no gradient, or under torch.compile, which fuses
    its own) makes the logits with `fast_linear`."""
    x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad))
    if FUSED and wants_grad and not torch.compiler.is_compiling() and w.dtype == torch.float32:
        loss, nll, correct, n = LinearCrossEntropy.apply(x, w, b, targets, float(label_smoothing))
        return loss, nll, correct / n
    logits = fast_linear(x, w, b).float()  # (N, V)
    nll = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    loss = nll if not label_smoothing else F.cross_entropy(
        logits, targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
    with torch.no_grad():
        keep = targets != IGNORE_INDEX
        top = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1) >= logits.amax(-1)
        acc = top[keep].float().mean()
    return loss, nll.detach(), acc


class LinearCrossEntropy(torch.autograd.Function):
    """forward(x (N, d), w (V, d), b (V,) | None, targets (N,), label_smoothing) ->
    (loss, nll, correct, n): the gradients of x, w and b are computed here, chunk by chunk."""

    @staticmethod
    def forward(ctx, x, w, b, targets, smoothing):
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            xs, ws = x.to(dt), w.to(dt)
            bs = None if b is None else b.to(dt)  # added in the product's dtype, as F.linear does
            keep = targets != IGNORE_INDEX
            n = keep.sum()
            inv_n = 1.0 / n.clamp(min=1).to(torch.float32)
            gx = torch.empty(x.shape, dtype=dt, device=x.device)
            gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            gb = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if b is not None else None
            nll = x.new_zeros((), dtype=torch.float32)
            smooth = x.new_zeros((), dtype=torch.float32)
            correct = x.new_zeros((), dtype=torch.long)
            V = w.shape[0]
            # below float32, dW takes one product per group of chunks, their logit gradients kept
            # in the autocast dtype (at most GROUP_BYTES, whole chunks): fewer, longer products
            # and fewer float32 sums of (V, d) than one of each per chunk (in float32, where the
            # product sums in place, grouping measured no faster)
            per_chunk = CHUNK_ROWS * V * xs.element_size()
            group = None if dt == torch.float32 else torch.empty(
                min(max(GROUP_BYTES // per_chunk, 1) * CHUNK_ROWS, x.shape[0]), V, dtype=dt, device=x.device)
            start = 0  # first row of the group
            # float32 on CPU: oneDNN's forward and dx products where they measure faster (fast_linear)
            dnn = group is None and _cpu_fp32(xs, ws) and onednn_trains(x.shape[1], V, CHUNK_ROWS)
            for s in range(0, x.shape[0], CHUNK_ROWS):
                xc, tc, kc = xs[s:s + CHUNK_ROWS], targets[s:s + CHUNK_ROWS], keep[s:s + CHUNK_ROWS]
                z = _dnn(xc, ws, bs) if dnn else xc @ ws.t() if b is None else torch.addmm(bs, xc, ws.t())
                z = z.float()  # (c, V) logits
                t = tc.clamp(min=0)[:, None]  # ignored rows read class 0, then count for nothing
                zt = z.gather(1, t).squeeze(1)
                zmean = z.mean(-1) if smoothing else None
                top = z.amax(-1)  # (a tenth of the time of max with indices)
                correct += ((zt >= top) & kc).sum()  # the target's logit is the largest (ties count)
                e = z.sub_(top[:, None]).exp_()  # one exp: softmax and log-sum-exp both come from it
                total = e.sum(-1)
                lse = top + total.log()
                nll += ((lse - zt) * kc).sum()
                if smoothing:
                    smooth += ((lse - zmean) * kc).sum()
                # d loss / d z = (softmax(z) - (1 - s) onehot - s / V) / n on kept rows, 0 elsewhere
                scale = kc.to(e.dtype) * inv_n
                g = e.mul_((scale / total)[:, None])
                g.scatter_add_(1, t, (scale * (smoothing - 1.0))[:, None])
                if smoothing:
                    g.sub_((scale * (smoothing / V))[:, None])
                if b is not None:
                    gb += g.sum(0)
                if group is None:
                    if dnn:
                        gx[s:s + CHUNK_ROWS] = _dnn(g, ws.t(), None)
                    else:
                        torch.mm(g, ws, out=gx[s:s + CHUNK_ROWS])
                    gw.addmm_(g.t(), xc)
                    continue
                g = group[s - start:s - start + len(g)].copy_(g)
                torch.mm(g, ws, out=gx[s:s + CHUNK_ROWS])
                end = s + len(g)
                if end - start == len(group) or end == x.shape[0]:  # the product in bf16, summed in float32
                    gw += (group[:end - start].t() @ xs[start:end]).float()
                    start = end
            nll = nll * inv_n
            loss = nll.clone() if not smoothing else (1 - smoothing) * nll + smoothing * smooth * inv_n
        ctx.save_for_backward(gx, gw, gb)
        ctx.dtypes = (x.dtype, w.dtype, None if b is None else b.dtype)
        ctx.mark_non_differentiable(nll, correct, n)
        return loss, nll, correct, n

    @staticmethod
    def backward(ctx, grad, *_):
        gx, gw, gb = ctx.saved_tensors
        tx, tw, tb = ctx.dtypes
        return ((gx * grad).to(tx), (gw * grad).to(tw), None if gb is None else (gb * grad).to(tb), None, None)
