"""Group `train`: training tokens/s, lmforge vs HF transformers, fp32 and bf16 autocast.

The HF setup worker saves each random seeded model; both contenders load the same weights
and run AdamW (lr 1e-4, weight decay 0.01) on the same fixed batch, one repeat being a few
steps; lmforge's is the one its training loop makes (no decay on biases, norms and
embeddings; fused kernel). MFU: FLOPs of one step (torch's FLOP counter on HF's step: matmuls and attention,
forward and backward) × steps/s ÷ the measured matmul ceiling of that dtype.

    GPT-2-like  6 layers × 384, 6 heads, vocab 8192, batch 8 × 256        causal LM
    BERT-like   6 layers × 384, 6 heads, vocab 8192, batch 16 × 128       MLM, 15% targets
    T5-like     4+4 layers × 256, 4 heads, vocab 8192, batch 16 × 128 → 32
"""

from __future__ import annotations

import os
import random

from bench.timing import Lineup, Settings, compare, save_checkpoints

V = 8192


def models(smoke: bool) -> dict:
    """name → (label, family, HF config, batch size, source length, target length)."""
    if smoke:  # the machinery only: tiny shapes
        return {"gpt2": ("GPT-2-like 2x64 (smoke)", "gpt2", dict(vocab_size=512, n_embd=64, n_layer=2, n_head=2,
                                                                 n_positions=32), 2, 32, 0)}
    no_drop = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return {
        "gpt2": ("GPT-2-like 6x384", "gpt2", dict(vocab_size=V, n_embd=384, n_layer=6, n_head=6, n_positions=256,
                                                  **no_drop), 8, 256, 0),
        "bert": ("BERT-like 6x384 MLM", "bert", dict(
            vocab_size=V, hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
            max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), 16, 128, 0),
        "t5": ("T5-like 4+4x256", "t5", dict(
            vocab_size=V, d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_decoder_layers=4, num_heads=4,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1), 16, 128, 32),
    }


def batch(family: str, vocab: int, b: int, s: int, t: int, seed: int) -> tuple[dict, int]:
    """One seeded batch as lists (both workers build the same tensors); tokens it counts."""
    rng = random.Random(seed)
    ids = [[rng.randrange(5, vocab) for _ in range(s)] for _ in range(b)]
    if family == "gpt2":
        return {"input_ids": ids, "labels": ids}, b * s
    ones = [[1] * s for _ in range(b)]
    if family == "bert":
        labels = [[x if rng.random() < 0.15 else -100 for x in row] for row in ids]
        return {"input_ids": ids, "attention_mask": ones, "labels": labels}, b * s
    labels = [[rng.randrange(2, vocab) for _ in range(t)] for _ in range(b)]
    return {"input_ids": ids, "attention_mask": ones, "labels": labels}, b * (s + t)


def run(settings: Settings, ceilings: dict) -> list[dict]:
    steps = 1 if settings.quick or settings.smoke else 3
    specs = models(settings.smoke)
    ckpts = save_checkpoints(settings, {name: (family, config) for name, (_, family, config, *_) in specs.items()},
                             "train")
    out = []
    for i, (name, (label, family, config, b, s, t)) in enumerate(specs.items()):
        lineup = Lineup(settings)
        lm, hf = f"lmforge {label}", f"HF {label}"
        lineup.start(lm, "lmforge_worker", "torch")
        lineup.start(hf, "hf", "transformers")
        measured = []
        try:
            data, tokens = batch(family, config["vocab_size"], b, s, t, seed=i)
            for dtype in ("fp32", "bf16"):
                if dtype == "bf16" and not bf16_fast(ceilings):
                    measured.append(_skipped(label, b, s, ceilings))
                    continue
                args = dict(dir=ckpts[name], family=family, batch=data, dtype=dtype, steps=steps, tokens=tokens)
                cs = [lineup.prepare(lm, "lmforge", dtype, "train", **args),
                      lineup.prepare(hf, "HF", dtype, "train", **args)]
                cs = [c for c in cs if c is not None]
                flops = next((c.info["flops_per_step"] for c in cs if "flops_per_step" in c.info), None)
                ceiling = ceilings.get(f"{dtype}_gflops")
                for c in cs:
                    c.limit_pct = _mfu(flops, tokens, ceiling)
                measured.append(compare(
                    settings, "train", label, f"{dtype}{' autocast' if dtype == 'bf16' else ''}, batch {b}x{s}",
                    "tok/s", ["lmforge"], cs, limit=f"MFU (% of {dtype} matmul ceiling)",
                    missing=lineup.missing_of(["lmforge", "HF"]), steps_per_repeat=steps,
                    flops_per_step=flops, first_loss={c.label: c.info.get("first_loss") for c in cs}))
        finally:
            lineup.close(measured)
        out += measured
    return out


def bf16_fast(ceilings: dict) -> bool:
    """Has this CPU bf16 matmul kernels worth timing? Without AVX-512 (BF16) torch runs a scalar
    fallback, ~100x below fp32: a bf16 training step would take minutes and measure nothing."""
    fp32, bf16 = ceilings.get("fp32_gflops"), ceilings.get("bf16_gflops")
    return bool(fp32 and bf16 and bf16 >= 0.25 * fp32)


def _skipped(label: str, b: int, s: int, ceilings: dict) -> dict:
    why = (f"skipped: bf16 matmul {ceilings.get('bf16_gflops', 0):.1f} GFLOP/s vs fp32 "
           f"{ceilings.get('fp32_gflops', 0):.1f} here (no fast bf16 kernels)")
    return {"group": "train", "model": label, "case": f"bf16 autocast, batch {b}x{s}", "unit": "tok/s",
            "subjects": ["lmforge"], "contenders": {}, "ratios": {}, "missing": {"lmforge": why, "HF": why}}


def _mfu(flops_per_step, tokens_per_step, ceiling_gflops):
    if not flops_per_step or not ceiling_gflops:
        return None
    return lambda rate: 100 * rate / tokens_per_step * flops_per_step / (ceiling_gflops * 1e9)
