"""llama.cpp contender (llama-cpp-python) on the GGUF file itself. Imports only llama_cpp."""

import llama_cpp

from bench.workers.serve import serve, threads

_models: dict = {}


def _model(path: str):
    if path not in _models:
        _models[path] = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=threads(),
                                        n_threads_batch=threads(), verbose=False)
    return _models[path]


def decode(path: str, prompt: list[int], new_tokens: int):
    """Greedy batch-1 decoding of exactly new_tokens (the raw token stream ignores EOS), prompt
    processing included, as in the other contenders."""
    llm = _model(path)

    def run():
        llm.reset()  # no reuse of the previous repeat's KV cache
        n = 0
        for _ in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
            n += 1
            if n == new_tokens:
                break
        return float(n)
    return run, {"version": llama_cpp.__version__}


def prompt(path: str, prompt: list[int]):
    """Prompt processing: the prompt's forward pass into an empty cache."""
    llm = _model(path)

    def run():
        llm.reset()
        llm.eval(prompt)
        return float(len(prompt))
    return run, {"version": llama_cpp.__version__}


if __name__ == "__main__":
    serve({"decode": decode, "prompt": prompt})
