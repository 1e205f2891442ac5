"""lmforge's CUDA paths, on the GPU: logits equal to HF transformers' (Llama-, GPT-2- and T5-like,
right- and left-padded batches), greedy and beam search token for token equal to HF `generate`
(and greedy on CUDA equal to greedy on CPU), cached equal to uncached decoding, seeded sampling,
a few training steps (float32 and bfloat16 autocast), sentence embeddings equal to the CPU's,
and what int8/int4 quantisation does to a model on CUDA.

Runs only where CUDA is: without it every test is skipped, with the reason printed. Tiny seeded
models in float32 with TF32 off, built the way the CPU tests build them
(tests/interop/test_hf_parity.py, tests/generate/test_generate.py, tests/train/test_train.py).
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.data.batches import lm_batches
from lmforge.embed import embed
from lmforge.generate import generate
from lmforge.interop.hf import load_hf
from lmforge.models.heads import Model
from lmforge.models.quantize import is_quantized, quantize
from lmforge.objectives import causal_lm
from lmforge.tokenizer import train_tokenizer_from_iterator
from lmforge.train.loop import TrainConfig, train
from tests.conftest import tiny_hf
from tests.generate.test_generate import pairs  # noqa: F401  (a fixture: the CPU tests' models)
from tests.generate.test_generate import NEW, beam_search_matches_hf, eos_from_output, hf_new_tokens, prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = torch.device("cuda")
TOL = 1e-4  # max |Δlogits| in float32, as on CPU
ARCHS = ["llama", "gpt2", "t5"]  # GQA + RoPE, learned positions, relative bias + cross-attention


@pytest.fixture(autouse=True)
def no_tf32():
    """Full float32 products: TF32 (10-bit mantissa) would move logits by ~1e-3."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


# ---- 1. logits ------------------------------------------------------------------------------------
def _left_padded(ids, mask, pad):
    """The same rows with their real tokens moved to the right end (padding on the left)."""
    left, lmask = torch.full_like(ids, pad), torch.zeros_like(mask)
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        left[i, ids.shape[1] - n:], lmask[i, ids.shape[1] - n:] = ids[i, :n], 1
    return left, lmask


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_hf_on_cuda(tmp_path, padded_batch, arch):
    ref = tiny_hf(arch)
    ref.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval().to(DEVICE)
    ref = ref.to(DEVICE)
    ids, mask, dec, dmask = _on(DEVICE, *padded_batch)
    kw = dict(input_ids=ids, attention_mask=mask)
    if ref.config.is_encoder_decoder:
        kw.update(decoder_input_ids=dec, decoder_attention_mask=dmask)
    with torch.no_grad():
        want, got = ref(**kw).logits, ours(**kw)
    assert got.device.type == DEVICE.type and got.shape == want.shape
    if ref.config.is_encoder_decoder:
        assert (want - got).abs().max().item() <= TOL
        return
    real = mask.bool()  # right-padded decoder batch: compare the real positions
    assert (want[real] - got[real]).abs().max().item() <= TOL

    # left-padded, positions counted from each row's first real token (as generation does)
    left, lmask = _left_padded(ids, mask, ref.config.pad_token_id)
    pos = (lmask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want_l = ref(input_ids=left, attention_mask=lmask, position_ids=pos).logits
        got_l = ours(left, attention_mask=lmask, position_ids=pos)
    real_l = lmask.bool()
    assert (want_l[real_l] - got_l[real_l]).abs().max().item() <= TOL
    assert (got_l[real_l] - got[real]).abs().max().item() <= TOL  # padding side does not matter


# ---- 2. generation --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def on_cuda(pairs):
    """arch -> (HF model on CUDA, our model on CUDA, our model on CPU): copies of the CPU tests'
    pair (tests/generate/test_generate.py's `pairs`, the same random weights), built on first use."""
    cache = {}

    def get(arch):
        if arch not in cache:
            ref, ours = pairs(arch)
            cache[arch] = copy.deepcopy(ref).to(DEVICE), copy.deepcopy(ours).to(DEVICE), ours
        return cache[arch]
    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf_and_cpu_on_cuda(on_cuda, arch):
    ref, ours, ours_cpu = on_cuda(arch)
    ids, mask = _on(DEVICE, *prompts(ours, batch=2))  # row 1 padded (left for decoders, right for T5)
    early = eos_from_output(ours, ids, mask, 1)  # an EOS id the rows reach
    for eos, min_new in (([ours.cfg.eos_id], 0), (early, 0), (early, 5)):
        out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=min_new,
                           do_sample=False, num_beams=1, eos_token_id=eos)
        got = generate(ours, ids, mask, max_new_tokens=NEW, eos_ids=eos, min_new_tokens=min_new)
        assert got.sequences.device.type == DEVICE.type
        assert got.tolist() == hf_new_tokens(ref, out, ids, eos)
        on_cpu = generate(ours_cpu, ids.cpu(), mask.cpu(), max_new_tokens=NEW, eos_ids=eos, min_new_tokens=min_new)
        assert on_cpu.tolist() == got.tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_beam_search_matches_hf_on_cuda(on_cuda, arch):
    ref, ours, _ = on_cuda(arch)
    beam_search_matches_hf(ref, ours, *_on(DEVICE, *prompts(ours)))


def _full_logits(model, src, new):
    """Next-token logits (1, V) by recomputing the whole sequence (no KV cache)."""
    with torch.no_grad():
        if model.cfg.family == "decoder":
            return model(torch.cat([src, new], 1))[:, -1]
        start = torch.tensor([[model.cfg.decoder_start_id]], device=src.device)
        return model(src, decoder_input_ids=torch.cat([start, new], 1))[:, -1]


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decoding_equals_uncached_on_cuda(on_cuda, arch):
    _, ours, _ = on_cuda(arch)
    src = prompts(ours, batch=1)[0].to(DEVICE)
    new = torch.zeros(1, 0, dtype=torch.long, device=DEVICE)
    for _ in range(NEW):
        new = torch.cat([new, _full_logits(ours, src, new).argmax(-1, keepdim=True)], 1)
    assert generate(ours, src, max_new_tokens=NEW, eos_ids=[]).tolist() == new.tolist()


# ---- 3. sampling ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_seeded_sampling_on_cuda(on_cuda, arch):
    _, ours, _ = on_cuda(arch)
    ids, mask = _on(DEVICE, *prompts(ours))
    run = lambda seed: generate(ours, ids, mask, max_new_tokens=NEW, strategy="sample", temperature=0.8,  # noqa: E731
                                top_k=20, top_p=0.9, seed=seed, eos_ids=[])
    a, b = run(7), run(7)
    assert a.sequences.device.type == DEVICE.type and a.sequences.shape == (3, NEW)
    assert torch.equal(a.sequences, b.sequences)  # the seed decides
    assert 0 <= int(a.sequences.min()) and int(a.sequences.max()) < ours.cfg.vocab_size
    n = generate(ours, ids, mask, max_new_tokens=3, strategy="sample", num_return_sequences=2, seed=0)
    assert n.sequences.device.type == DEVICE.type and n.sequences.shape[0] == 6


# ---- 4. training ----------------------------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return Model(ModelConfig.preset("gpt-tiny", vocab_size=64, d_model=32, n_heads=2, d_ff=64, max_len=32,
                                    dropout=0.0))


def _cycle(n=2000):
    return (np.arange(n) % 64).astype(np.uint16)  # next token = this one + 1 (mod 64): learnable


def test_training_on_cuda_lowers_the_loss_and_keeps_weights_there():
    model = _model()
    cfg = TrainConfig(lr=1e-2, schedule="constant", max_steps=40, log_every=1, progress=False, device=DEVICE.type)
    out = train(model, causal_lm, lm_batches(_cycle(), 16, 4), cfg)
    assert out["steps"] == 40
    assert out["train_loss"] < 0.5 * out["first_train_loss"]  # on CPU: 4.14 -> 0.89
    assert all(p.device.type == DEVICE.type for p in model.parameters())


def test_bfloat16_autocast_step_on_cuda_is_finite():
    model = _model()
    cfg = TrainConfig(lr=3e-3, max_steps=2, log_every=1, progress=False, device=DEVICE.type, dtype="bfloat16")
    out = train(model, causal_lm, lm_batches(_cycle(), 16, 4), cfg)
    assert out["steps"] == 2 and math.isfinite(out["first_train_loss"]) and math.isfinite(out["train_loss"])
    assert all(p.device.type == DEVICE.type and p.dtype == torch.float32 for p in model.parameters())


# ---- 5. embeddings --------------------------------------------------------------------------------
def test_embeddings_on_cuda_equal_cpu():
    tok = train_tokenizer_from_iterator([f"a cat sat on the mat {i} times" for i in range(50)], "wordpiece", 120,
                                        family="encoder", progress=False)
    torch.manual_seed(0)
    model = Model(ModelConfig.preset("bert-tiny", vocab_size=tok.vocab_size, task="embed")).eval()
    texts = ["a cat sat", "the mat", "a cat sat on the mat 7 times", "on the mat 12", "times"]
    on_cpu = embed(model, tok, texts, batch_size=2)
    on_gpu = embed(model.to(DEVICE), tok, texts, batch_size=2)
    assert on_gpu.shape == on_cpu.shape == (5, model.cfg.d_model)
    assert F.cosine_similarity(on_gpu, on_cpu, dim=-1).min().item() >= 0.99999


# ---- 6. quantisation ------------------------------------------------------------------------------
def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _tiny_lm_on_device():
    torch.manual_seed(0)
    model = Model(ModelConfig.preset("gpt-tiny", vocab_size=128, dropout=0.0)).eval().to(DEVICE)
    return model, torch.randint(3, 128, (2, 12), device=DEVICE)


def test_int8_on_cuda_works_or_is_refused_naming_the_device(quant_kernel):
    """int8 is documented for CPU "(or CUDA)": either the quantised model computes on CUDA close to
    the float one, as on CPU, or quantize() itself refuses with an error that names the device.
    Run with torch's kernels and with lmforge's own (`quant_kernel`), which pack the LM head."""
    model, ids = _tiny_lm_on_device()
    with torch.no_grad():
        ref = model(ids)
    try:
        quantize(model, "int8")
    except (ValueError, RuntimeError) as e:
        assert "cuda" in str(e).lower()
        return
    assert is_quantized(model) == "int8"
    with torch.no_grad():
        got = model(ids)
    assert got.device.type == DEVICE.type and _rel(got, ref) < 0.05
    out = generate(model, ids[:1], max_new_tokens=5, eos_ids=[])
    assert out.sequences.device.type == DEVICE.type and out.sequences.shape == (1, 5)


def test_int4_on_cuda_is_refused_naming_the_device():
    """int4 goes through torch's int4 CPU kernel: quantize() refuses a CUDA model up front."""
    model, _ = _tiny_lm_on_device()
    with pytest.raises(ValueError, match="int4.*CPU only.*cuda"):
        quantize(model, "int4")
    assert is_quantized(model) is None  # nothing was replaced
