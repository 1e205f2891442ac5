"""HTTP server: generation, chat (OpenAI-style, with server-sent-event streaming) and embeddings.

    lmforge serve MODEL [--host 127.0.0.1] [--port 8000]

Endpoints: GET /health; POST /v1/generate; POST /v1/chat/completions; POST /v1/embeddings.
It reuses the same generation functions as the CLI and the Python API. Requests are
served one at a time (a lock around the model): CPU inference is compute bound.
"""


import json
import threading
import time
import uuid

from lmforge import api


def create_app(model_dir: str, int8: bool = False):
    """A FastAPI app serving the model at `model_dir` (int8: quantised weights, see api.load)."""
    try:
        from fastapi import FastAPI, HTTPException
        from fastapi.responses import StreamingResponse
        from pydantic import BaseModel, Field
    except ImportError as e:
        raise ImportError("the server needs FastAPI and uvicorn: pip install 'lmforge[serve]'") from e

    model, tok = api.load(model_dir, int8=int8)
    if tok is None:
        raise ValueError(f"{model_dir}: the server needs a tokenizer next to the model")
    lock = threading.Lock()
    app = FastAPI(title="lmforge", version="0.1.0")

    class GenerateRequest(BaseModel):
        prompt: str
        max_new_tokens: int = 64
        strategy: str = "greedy"
        num_beams: int = 4
        temperature: float = 1.0
        top_k: int = 0
        top_p: float = 1.0
        min_p: float = 0.0
        repetition_penalty: float = 1.0
        seed: int | None = None
        stop: list[str] = Field(default_factory=list)
        stream: bool = False
        prompt_lookup: int = 0

    class ChatRequest(BaseModel):
        messages: list[dict]
        max_tokens: int = 256
        temperature: float = 0.0
        top_p: float = 1.0
        top_k: int = 0
        seed: int | None = None
        stream: bool = False
        stop: list[str] = Field(default_factory=list)

    class EmbeddingsRequest(BaseModel):
        input: list[str] | str
        normalize: bool = True

    def options(r) -> dict:
        return dict(max_new_tokens=r.max_new_tokens, strategy=r.strategy, num_beams=r.num_beams,
                    temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p,
                    repetition_penalty=r.repetition_penalty, seed=r.seed, stop=r.stop, prompt_lookup=r.prompt_lookup)

    def run(prompt, stream, **kw):
        return api.generate_text(model, tok, prompt, stream=stream, **kw)

    def chat_options(r) -> dict:
        sampling = r.temperature > 0
        return dict(max_new_tokens=r.max_tokens, strategy="sample" if sampling else "greedy",
                    temperature=r.temperature if sampling else 1.0, top_p=r.top_p, top_k=r.top_k,
                    seed=r.seed, stop=r.stop)

    def sse(chunks):
        for c in chunks:
            yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    def locked(gen):
        with lock:
            yield from gen

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_dir, "family": model.cfg.family, "task": model.cfg.task}

    @app.post("/v1/generate")
    def generate(r: GenerateRequest):
        try:
            if r.stream:
                it = run(r.prompt, True, **options(r))
                return StreamingResponse(sse({"text": d} for d in locked(it)), media_type="text/event-stream")
            with lock:
                text = run(r.prompt, False, **options(r))
            return {"text": text}
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None

    @app.post("/v1/chat/completions")
    def chat(r: ChatRequest):
        try:
            prompt = api.chat_prompt(tok, r.messages)
            rid, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())
            if r.stream:
                it = run(prompt, True, **chat_options(r))
                chunks = ({"id": rid, "object": "chat.completion.chunk", "created": created,
                           "choices": [{"index": 0, "delta": {"content": d}}]} for d in locked(it))
                return StreamingResponse(sse(chunks), media_type="text/event-stream")
            with lock:
                text = run(prompt, False, **chat_options(r))
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_dir,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}]}
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None

    @app.post("/v1/embeddings")
    def embeddings(r: EmbeddingsRequest):
        from lmforge.embed import embed
        texts = [r.input] if isinstance(r.input, str) else r.input
        try:
            with lock:
                vecs = embed(model, tok, texts, normalize=r.normalize)
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        return {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": v}
                                           for i, v in enumerate(vecs.tolist())]}

    return app


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, int8: bool = False) -> None:
    import uvicorn
    uvicorn.run(create_app(model_dir, int8=int8), host=host, port=port, log_level="info")
