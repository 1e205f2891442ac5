"""Shared fixtures: tiny random Hugging Face models saved to temporary directories."""

import os
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"  # small excerpts shipped with the tests (see fixtures/README.md)


def full_data(*parts: str) -> Path:
    """A file of the full data sets, under the folder named by $LMFORGE_DATA (CI: ../shared/data).
    Without it the calling test is skipped, with the reason printed (tests using it are marked `data`)."""
    root = os.environ.get("LMFORGE_DATA")
    if not root:
        pytest.skip(f"needs the full data set ({'/'.join(parts)}): set LMFORGE_DATA to the data folder "
                    "(e.g. ../shared/data)")
    path = Path(root, *parts)
    if not path.exists():
        pytest.skip(f"full data set: {path} not found (LMFORGE_DATA={root})")
    return path


def tiny_hf(arch: str, **extra):
    """A seeded tiny HF model of the given kind: (model class, config)."""
    import transformers as T
    base = dict(vocab_size=99)
    specs = {
        "bert": (T.BertModel, T.BertConfig, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=37, max_position_embeddings=64)),
        "gpt2": (T.GPT2LMHeadModel, T.GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)),
        "llama": (T.LlamaForCausalLM, T.LlamaConfig, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                          num_key_value_heads=2, intermediate_size=37,
                                                          max_position_embeddings=64, bos_token_id=1,
                                                          eos_token_id=2, pad_token_id=0)),
        "t5": (T.T5ForConditionalGeneration, T.T5Config, dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)),
        "t5v1_1": (T.T5ForConditionalGeneration, T.T5Config, dict(d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                                                   num_decoder_layers=3, num_heads=4,
                                                                   feed_forward_proj="gated-gelu",
                                                                   tie_word_embeddings=False)),
        "bart": (T.BartForConditionalGeneration, T.BartConfig, dict(d_model=32, encoder_layers=2, decoder_layers=2,
                                                                    encoder_attention_heads=4, decoder_attention_heads=4,
                                                                    encoder_ffn_dim=37, decoder_ffn_dim=37,
                                                                    max_position_embeddings=64)),
        "marian": (T.MarianMTModel, T.MarianConfig, dict(d_model=32, encoder_layers=2, decoder_layers=2,
                                                         encoder_attention_heads=4, decoder_attention_heads=4,
                                                         encoder_ffn_dim=37, decoder_ffn_dim=37, pad_token_id=98,
                                                         decoder_start_token_id=98, eos_token_id=2,
                                                         max_position_embeddings=64, scale_embedding=True)),
    }
    model_cls, cfg_cls, kw = specs[arch]
    model_cls = extra.pop("model_cls", model_cls)
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**{**base, **kw, **extra})).eval()
    with torch.no_grad():  # random (not zero) biases and norms, so every tensor is exercised
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture
def padded_batch():
    """Two rows of different lengths (row 1 is right-padded)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    dec = torch.randint(3, 99, (2, 6), generator=g)
    dmask = torch.ones(2, 6, dtype=torch.long)
    dmask[0, 4:] = 0
    return ids, mask, dec, dmask


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and a shared CPU does not oversubscribe."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory):
    """A small random decoder LM with a trained BPE tokenizer, saved as an lmforge directory;
    its context is 128 tokens (like the main job's model)."""
    import lmforge
    from lmforge.config import ModelConfig
    from lmforge.models.heads import Model
    from lmforge.tokenizer import train_tokenizer_from_iterator
    tok = train_tokenizer_from_iterator([f"the quick brown fox jumps over the lazy dog {i} times" for i in range(200)],
                                        kind="bpe", vocab_size=300)
    torch.manual_seed(0)
    model = Model(ModelConfig(family="decoder", vocab_size=tok.vocab_size, d_model=32, n_heads=4, n_decoder_layers=2,
                              d_ff=64, max_len=128, eos_id=tok.eos_id, bos_id=tok.bos_id))
    out = tmp_path_factory.mktemp("tiny_text_model")
    lmforge.save(model, out, tokenizer=tok)
    return out


@pytest.fixture(params=["torch", "native"])
def quant_kernel(request, monkeypatch):
    """Runs a test once with torch's int4/int8 kernels and once with lmforge's own
    (`lmforge.models.qkernel`, skipped where it was not built): the choice `native_rows` would
    otherwise measure."""
    from lmforge.models import int4, qkernel
    if request.param == "native" and not qkernel.available():
        pytest.skip("lmforge.models._qkernel was not built here (no C compiler at install)")
    monkeypatch.setattr(int4, "_native_rows", 16 if request.param == "native" else 0)
    return request.param
