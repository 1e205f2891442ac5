"""The HTTP server on loopback: generation (every GenerationConfig option), chat, embeddings."""

import json

import pytest

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def client(tiny_text_model):
    from fastapi.testclient import TestClient

    from lmforge.serve import create_app
    return TestClient(create_app(str(tiny_text_model)))


def test_server_generate_and_embeddings(client, tiny_text_model):
    assert client.get("/health").json()["status"] == "ok"
    r = client.post("/v1/generate", json={"prompt": "The", "max_new_tokens": 5})
    assert r.status_code == 200 and isinstance(r.json()["text"], str)
    s = client.post("/v1/generate", json={"prompt": "The", "max_new_tokens": 5, "stream": True})
    pieces = [json.loads(line[6:])["text"] for line in s.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(pieces) == r.json()["text"]
    p = client.post("/v1/generate", json={"prompt": "The", "max_new_tokens": 5, "prompt_lookup": 3})
    assert p.json()["text"] == r.json()["text"]
    assert client.post("/v1/generate", json={"prompt": "The", "top_p": 2.0}).status_code == 400
    c = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert c.status_code == 200 and c.json()["choices"][0]["message"]["role"] == "assistant"
    e = client.post("/v1/embeddings", json={"input": ["a", "b"]})
    assert len(e.json()["data"]) == 2


def test_every_generation_option_is_a_request_field(client):
    from lmforge.generate.config import FIELDS
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("GenerateRequest", "ChatRequest"):
        assert set(FIELDS) <= set(schema[name]["properties"]), name


def test_server_options_match_the_python_api(client, tiny_text_model):
    import lmforge
    model, tok = lmforge.load(tiny_text_model)
    opts = dict(max_new_tokens=12, no_repeat_ngram_size=2, repetition_penalty=1.3)
    want = lmforge.api.generate_text(model, tok, "the quick", **opts)
    assert client.post("/v1/generate", json={"prompt": "the quick", **opts}).json()["text"] == want
    assert want != lmforge.api.generate_text(model, tok, "the quick", max_new_tokens=12)  # the options mattered
    r = client.post("/v1/generate", json={"prompt": "the quick", "no_repeat_ngram_size": -1})
    assert r.status_code == 400 and "no_repeat_ngram_size" in r.json()["detail"]


def test_server_truncates_long_prompts_when_asked(client):
    long = "the quick brown fox " * 60  # far more than the 128-token context
    r = client.post("/v1/generate", json={"prompt": long, "max_new_tokens": 8})
    assert r.status_code == 400 and "truncate" in r.json()["detail"]
    r = client.post("/v1/generate", json={"prompt": long, "max_new_tokens": 8, "truncate": True})
    assert r.status_code == 200 and isinstance(r.json()["text"], str)
