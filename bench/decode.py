"""Group `decode`: new tokens/s of generation, lmforge vs HF `generate` and CTranslate2, on
the same random seeded weights (HF checkpoints saved by the setup worker; CTranslate2
converts them in a process of its own). fp32: lmforge vs HF and CT2; int8: lmforge's int8
weights vs CT2 `int8_float32`. Prompts of 32 tokens, exactly 128 new tokens (no EOS).

    GPT-2-like  6 layers × 384, 6 heads, vocab 8192
    T5-like     4+4 layers × 256, 4 heads, vocab 8192

Limit: bytes of weights one decoding step reads × steps/s ÷ the measured read bandwidth.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

from bench.timing import Lineup, Settings, compare, installed, save_checkpoints

V, PROMPT = 8192, 32
CASES = [("greedy b1", 1, {}), ("greedy b8", 8, {}), ("beam 4", 1, {"num_beams": 4}), ("top-k 50", 1, {"top_k": 50})]


def models(smoke: bool) -> dict:
    """name → (label, family, HF config)."""
    if smoke:
        return {"gpt2": ("GPT-2-like 2x64 (smoke)", "gpt2", dict(vocab_size=512, n_embd=64, n_layer=2, n_head=2,
                                                                 n_positions=256, bos_token_id=0, eos_token_id=None,
                                                                 pad_token_id=0))}
    return {
        "gpt2": ("GPT-2-like 6x384", "gpt2", dict(vocab_size=V, n_embd=384, n_layer=6, n_head=6, n_positions=512,
                                                  bos_token_id=0, eos_token_id=None, pad_token_id=0)),
        "t5": ("T5-like 4+4x256", "t5", dict(vocab_size=V, d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_heads=4,
                                             eos_token_id=None, pad_token_id=0, decoder_start_token_id=0)),
    }


def prompts(batch: int, vocab: int) -> list[list[int]]:
    rng = random.Random(batch)
    return [[rng.randrange(5, vocab) for _ in range(PROMPT)] for _ in range(batch)]


def convert_ct2(hf_dir: str, out_dir: str, settings: Settings) -> str | None:
    """The CTranslate2 model directory, or None with the reason printed."""
    p = subprocess.run([sys.executable, "-m", "bench.workers.ct2_convert", hf_dir, out_dir], capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS=str(settings.threads)),
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if p.returncode != 0:
        print(f"  CTranslate2 conversion failed: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return out_dir


def run(settings: Settings, ceilings: dict) -> list[dict]:
    new = 16 if settings.smoke else 128
    bandwidth = ceilings.get("read_gbs")
    specs = models(settings.smoke)
    ckpts = save_checkpoints(settings, {name: (family, config) for name, (_, family, config) in specs.items()},
                             "decode", with_tokenizer=True)
    out = []
    for name, (label, family, config) in specs.items():
        lineup = Lineup(settings)
        ckpt = ckpts[name]
        workers = {"lmforge": ("lmforge_worker", "torch"), "HF": ("hf", "transformers"), "CT2": ("ct2", "ctranslate2"),
                   "lmforge int8": ("lmforge_worker", "torch"), "CT2 int8": ("ct2", "ctranslate2"),
                   "lmforge compiled": ("lmforge_worker", "torch"), "lmforge int8 compiled": ("lmforge_worker", "torch")}
        ct2_dir = None
        if installed("ctranslate2"):
            ct2_dir = convert_ct2(ckpt, os.path.join(settings.tmp, f"decode-{name}-ct2"), settings)
        for who, (module, needs) in workers.items():
            if who.startswith("CT2") and ct2_dir is None:
                lineup.missing[who] = "ctranslate2 is not installed or its conversion failed"
                continue
            lineup.start(who, module, needs)
        measured = []
        try:
            for case, b, kw in CASES:
                common = dict(prompts=prompts(b, config["vocab_size"]), new_tokens=new, **kw)
                t5 = family == "t5"
                # the compiled step: every case but top-k in full runs, greedy b1 in --quick (compiling takes seconds)
                comp = case == "greedy b1" or (not settings.quick and case != "top-k 50")
                fp32 = [lineup.prepare("lmforge", "lmforge", case, "decode", dir=ckpt, **common),
                        comp and lineup.prepare("lmforge compiled", "lmforge compiled", case, "decode", dir=ckpt,
                                                compile=True, **common),
                        lineup.prepare("HF", "HF", case, "decode", dir=ckpt, family=family, **common),
                        lineup.prepare("CT2", "CT2", case, "decode", path=ct2_dir, seq2seq=t5, **common)]
                int8 = [lineup.prepare("lmforge int8", "lmforge int8", case, "decode", dir=ckpt, int8=True, **common),
                        comp and lineup.prepare("lmforge int8 compiled", "lmforge int8 compiled", case, "decode",
                                                dir=ckpt, int8=True, compile=True, **common),
                        lineup.prepare("CT2 int8", "CT2 int8", case, "decode", path=ct2_dir, seq2seq=t5,
                                       compute_type="int8_float32", **common)]
                for dtype, cs, subjects in (("fp32", fp32, ["lmforge", "lmforge compiled"]),
                                            ("int8", int8, ["lmforge int8", "lmforge int8 compiled"])):
                    cs = [c for c in cs if c]
                    subjects = [s for s in subjects if any(c.label == s for c in cs)]
                    weight_bytes = next((c.info["weight_bytes_per_step"] for c in cs
                                         if "weight_bytes_per_step" in c.info), None)
                    for c in cs:
                        c.limit_pct = _read_share(weight_bytes, b, bandwidth)
                    labels = [*subjects, "HF", "CT2"] if dtype == "fp32" else [*subjects, "CT2 int8"]
                    measured.append(compare(
                        settings, "decode", label, f"{case} {dtype}", "tok/s", subjects, cs,
                        limit="weights read per step x steps/s (% of read bandwidth)",
                        missing=lineup.missing_of(labels), prompt_tokens=PROMPT, new_tokens=new,
                        weight_bytes_per_step=weight_bytes))
        finally:
            lineup.close(measured)
        out += measured
    return out


def _read_share(weight_bytes, rows, bandwidth_gbs):
    """tokens/s → % of bandwidth: each step reads the weights once for all `rows` rows."""
    if not weight_bytes or not bandwidth_gbs:
        return None
    return lambda rate: 100 * weight_bytes * rate / rows / (bandwidth_gbs * 1e9)
