"""Hugging Face transformers contender (and the setup worker that saves the random seeded
checkpoints every other contender loads). Imports torch and transformers."""

import contextlib
import os

import torch
import transformers as T

from bench.workers.serve import serve, threads

CLASSES = {"gpt2": (T.GPT2Config, T.GPT2LMHeadModel), "bert": (T.BertConfig, T.BertForMaskedLM),
           "t5": (T.T5Config, T.T5ForConditionalGeneration)}
_models: dict = {}


def autocast(dtype: str):
    """bf16: torch's CPU autocast, as both training contenders use it; fp32: nothing."""
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def word_tokenizer(vocab: int):
    """Token i is the word "t{i}": CTranslate2 reads the vocabulary from the checkpoint's tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t2", pad_token="t0", bos_token="t0",
                                     eos_token="t1")


def save(family: str, config: dict, dir: str, with_tokenizer: bool = False):
    """Save a random seeded HF model (the weights every contender starts from)."""
    torch.manual_seed(0)
    cfg_cls, cls = CLASSES[family]
    model = cls(cfg_cls(**config))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = None  # decoding runs exactly max_new_tokens
    model.save_pretrained(dir)
    if with_tokenizer:
        word_tokenizer(config["vocab_size"]).save_pretrained(dir)
    return (lambda: 0.0), {"parameters": sum(p.numel() for p in model.parameters())}


def _load(dir: str, family: str | None = None, gguf_file: str | None = None):
    key = (dir, gguf_file)
    if key not in _models:
        if gguf_file:
            _models[key] = T.AutoModelForCausalLM.from_pretrained(dir, gguf_file=gguf_file, dtype=torch.float32)
        else:
            _models[key] = CLASSES[family][1].from_pretrained(dir)
    return _models[key]


def train(dir: str, family: str, batch: dict, dtype: str, steps: int, tokens: int):
    """AdamW (lr 1e-4, weight decay 0.01) steps on one fixed batch; the loss from `labels=`.
    Also counts the FLOPs of one step (forward + backward, torch's FLOP counter) for MFU."""
    from torch.utils.flop_counter import FlopCounterMode
    model = CLASSES[family][1].from_pretrained(dir).train()
    b = {k: torch.tensor(v) for k, v in batch.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def step():
        with autocast(dtype):
            loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    with FlopCounterMode(display=False) as fc:
        first_loss = step()

    def run():
        for _ in range(steps):
            step()
        return float(tokens * steps)
    return run, {"flops_per_step": fc.get_total_flops(), "first_loss": first_loss}


def decode(dir: str, family: str, prompts: list[list[int]], new_tokens: int, num_beams: int = 1,
           top_k: int | None = None):
    model = _load(dir, family).eval()
    ids = torch.tensor(prompts)
    start = 1 if family == "t5" else ids.shape[1]  # T5's output begins with the start token

    def run():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=0, do_sample=top_k is not None, top_k=top_k, num_beams=num_beams,
                                 top_p=None, temperature=None, early_stopping=False, length_penalty=1.0,
                                 eos_token_id=None, pad_token_id=0)
        return float(out.shape[0] * (out.shape[1] - start))
    return run, {}


def chat(dir: str, gguf_file: str, prompt: list[int], new_tokens: int):
    """Batch-1 greedy decoding of exactly new_tokens from the dequantised GGUF weights
    (new_tokens=1: prompt processing, the prefill that computes one position's logits)."""
    model = _load(dir, gguf_file=gguf_file).eval()
    ids = torch.tensor([prompt])

    def run():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return float(out.shape[1] - ids.shape[1] if new_tokens > 1 else ids.shape[1])
    return run, {}


if __name__ == "__main__":
    torch.set_num_threads(threads())
    T.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    serve({"save": save, "train": train, "decode": decode, "chat": chat})
