"""CTranslate2 contender. Imports ctranslate2 and the standard library only (never torch:
two OpenMP runtimes in one process slow CTranslate2 down ~1.8×)."""

import ctranslate2

from bench.workers.serve import serve, threads

_models: dict = {}


def _model(path: str, seq2seq: bool, compute_type: str):
    key = (path, compute_type)
    if key not in _models:
        cls = ctranslate2.Translator if seq2seq else ctranslate2.Generator
        _models[key] = cls(path, device="cpu", compute_type=compute_type, intra_threads=threads(), inter_threads=1)
    return _models[key]


def decode(path: str, seq2seq: bool, prompts: list[list[int]], new_tokens: int, num_beams: int = 1, top_k: int = 1,
           compute_type: str = "float32"):
    """Generate exactly new_tokens per prompt (min = max length). Tokens are the words "t<i>"
    of the checkpoint's word-level vocabulary."""
    model = _model(path, seq2seq, compute_type)
    toks = [[f"t{t}" for t in row] for row in prompts]
    common = dict(beam_size=num_beams, sampling_topk=top_k, length_penalty=1.0)

    def run():
        if seq2seq:
            res = model.translate_batch(toks, max_decoding_length=new_tokens, min_decoding_length=new_tokens,
                                        **common)
            return float(sum(len(r.hypotheses[0]) for r in res))
        res = model.generate_batch(toks, max_length=new_tokens, min_length=new_tokens,
                                   include_prompt_in_result=False, **common)
        return float(sum(len(r.sequences_ids[0]) for r in res))
    return run, {"version": ctranslate2.__version__}


if __name__ == "__main__":
    serve({"decode": decode})
