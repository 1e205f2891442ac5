"""Tokens/s of lmforge `generate` vs HF transformers `generate` (and CTranslate2) on the same weights.

    python bench/bench_generate.py [--threads N] [--repeats 3] [--quick] [--no-ct2]

Two random models saved as HF checkpoints and imported with `load_hf`: GPT-2-like
(6 layers x 384 dims x 6 heads, vocab 8k) and T5-like (4+4 layers x 256, vocab 8k).
Cases: greedy batch 1, greedy batch 8, beam 4 (batch 1), top-k 50 sampling (batch 1);
prompt 32 tokens, exactly 128 new tokens (the configs have no EOS). Timings are the best
of --repeats, lmforge and HF interleaved. CTranslate2 converts the same checkpoint and
runs in a separate process (its OpenMP threads slow down next to torch's).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

VOCAB, PROMPT = 8192, 32
CASES = [("greedy b1", 1, dict()), ("greedy b8", 8, dict()), ("beam 4", 1, dict(num_beams=4)),
         ("top-k 50", 1, dict(top_k=50))]


def hf_models(root: str) -> dict[str, str]:
    """Save the two random HF checkpoints under root; return {name: directory}."""
    import transformers as T
    specs = {
        "gpt2-6x384": T.GPT2LMHeadModel(T.GPT2Config(
            vocab_size=VOCAB, n_embd=384, n_layer=6, n_head=6, n_positions=512,
            bos_token_id=0, eos_token_id=None, pad_token_id=0)),
        "t5-4+4x256": T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=VOCAB, d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_heads=4,
            eos_token_id=None, pad_token_id=0, decoder_start_token_id=0)),
    }
    out = {}
    for name, model in specs.items():
        torch.manual_seed(0)
        model.init_weights()
        model.generation_config.eos_token_id = None
        out[name] = os.path.join(root, name)
        model.save_pretrained(out[name])
        word_tokenizer().save_pretrained(out[name])
    return out


def word_tokenizer():
    """Token i is the word "t{i}": CTranslate2 reads the vocabulary from the checkpoint's tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t2", pad_token="t0", bos_token="t0",
                                   eos_token="t1")


def prompts(batch: int) -> torch.Tensor:
    return torch.randint(5, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))


def run_hf(model, ids, n, kw):
    sample = "top_k" in kw
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=0,
                   do_sample=sample, top_k=kw.get("top_k"), num_beams=kw.get("num_beams", 1), top_p=None,
                   temperature=None, early_stopping=False, length_penalty=1.0, eos_token_id=None, pad_token_id=0)


def run_ours(model, ids, n, kw):
    from lmforge.generate import generate
    if "top_k" in kw:
        return generate(model, ids, max_new_tokens=n, strategy="sample", top_k=kw["top_k"], eos_ids=[], seed=0)
    if "num_beams" in kw:
        return generate(model, ids, max_new_tokens=n, strategy="beam", num_beams=kw["num_beams"], eos_ids=[])
    return generate(model, ids, max_new_tokens=n, eos_ids=[])


def best_time(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def ct2_worker(model_dir: str, out_dir: str, threads: int, new: int, repeats: int) -> None:
    """Runs in its own process: convert model_dir with CTranslate2 and time every case."""
    import ctranslate2
    ctranslate2.converters.TransformersConverter(model_dir).convert(out_dir, force=True)
    t5 = "t5" in os.path.basename(model_dir)
    cls = ctranslate2.Translator if t5 else ctranslate2.Generator
    model = cls(out_dir, device="cpu", intra_threads=threads, inter_threads=1)
    res = {}
    for name, batch, kw in CASES:
        toks = [[f"t{t}" for t in row] for row in prompts(batch).tolist()]
        common = dict(beam_size=kw.get("num_beams", 1), sampling_topk=kw.get("top_k", 1), length_penalty=1.0)
        if t5:
            call = lambda: model.translate_batch(toks, max_decoding_length=new, min_decoding_length=new,  # noqa: E731
                                                 **common)
        else:
            call = lambda: model.generate_batch(toks, max_length=new, min_length=new,  # noqa: E731
                                                include_prompt_in_result=False, **common)
        call()  # warm-up
        res[name] = min(best_time(call) for _ in range(repeats))
    print(json.dumps(res))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 new tokens, 1 repeat")
    ap.add_argument("--no-ct2", action="store_true")
    ap.add_argument("--ct2-worker", nargs=2, metavar=("MODEL_DIR", "OUT_DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.quick:
        a.new, a.repeats = 8, 1
    torch.set_num_threads(a.threads)
    if a.ct2_worker:
        return ct2_worker(*a.ct2_worker, a.threads, a.new, a.repeats)

    import transformers as T

    from lmforge.interop.hf import load_hf
    T.logging.set_verbosity_error()
    print(f"threads={a.threads} prompt={PROMPT} new_tokens={a.new} repeats={a.repeats} "
          f"torch={torch.__version__} transformers={T.__version__}")
    with tempfile.TemporaryDirectory() as root:
        for name, d in hf_models(root).items():
            ref = (T.T5ForConditionalGeneration if "t5" in name else T.GPT2LMHeadModel).from_pretrained(d).eval()
            ours = load_hf(d).eval()
            ct2 = None if a.no_ct2 else ct2_times(d, os.path.join(root, name + "-ct2"), a)
            print(f"\n{name}")
            print(f"  {'case':10s} {'lmforge tok/s':>14s} {'HF tok/s':>10s} {'lmforge/HF':>11s}"
                  + (f" {'CT2 tok/s':>10s} {'lmforge/CT2':>12s}" if ct2 else ""))
            for case, batch, kw in CASES:
                ids = prompts(batch)
                with torch.inference_mode():
                    run_ours(ours, ids, 2, kw)  # warm-up
                    run_hf(ref, ids, 2, kw)
                    t_ours = t_hf = float("inf")
                    for _ in range(a.repeats):
                        t_hf = min(t_hf, best_time(run_hf, ref, ids, a.new, kw))
                        t_ours = min(t_ours, best_time(run_ours, ours, ids, a.new, kw))
                n = batch * a.new
                line = f"  {case:10s} {n / t_ours:14.1f} {n / t_hf:10.1f} {t_hf / t_ours:10.2f}x"
                if ct2 and case in ct2:
                    line += f" {n / ct2[case]:10.1f} {ct2[case] / t_ours:11.2f}x"
                if "top_k" not in kw:  # deterministic cases: the same tokens as HF?
                    with torch.inference_mode():
                        theirs = run_hf(ref, ids, a.new, kw)[:, 1 if "t5" in name else PROMPT:]
                        same = theirs.tolist() == run_ours(ours, ids, a.new, kw).tolist()
                    line += "   same tokens as HF" if same else "   TOKENS DIFFER FROM HF"
                print(line, flush=True)


def ct2_times(model_dir: str, out_dir: str, a) -> dict | None:
    """CTranslate2 timings from a subprocess, or None (with a note) when it is unavailable."""
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        print("CTranslate2 not installed (pip install ctranslate2): skipped")
        return None
    cmd = [sys.executable, __file__, "--ct2-worker", model_dir, out_dir, "--threads", str(a.threads),
           "--new", str(a.new), "--repeats", str(a.repeats)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"CTranslate2 failed on {os.path.basename(model_dir)}: {p.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
