"""Import a llama-architecture GGUF file (llama.cpp) as Hugging Face data.

`read_gguf` returns what the HF importer consumes: a `LlamaConfig`-style dict, a float32
state dict with `LlamaForCausalLM` key names, and a `tokenizers.Tokenizer` rebuilt from the
file's metadata. Parsing and dequantisation are left to the `gguf` package (llama.cpp's own);
this module only renames, reshapes and undoes llama.cpp's Q/K permutation. On request it also
reads the 4-bit blocks (Q4_0, Q4_1, Q4_K) as the int4 groups of `lmforge.models.int4`, as
they are (`int4_groups`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import Q4_K, dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K")
)

# GGUF tensor name -> HF LlamaForCausalLM key; "{i}" is the block index.
GLOBAL_KEYS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
BLOCK_KEYS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
INT4_TYPES = frozenset(GGMLQuantizationType[name] for name in ("Q4_0", "Q4_1", "Q4_K"))
REQUIRED_BLOCK_WEIGHTS = tuple(f"{name}.weight" for name in BLOCK_KEYS)

# Split regexes for `tokenizer.ggml.pre`, as transformers' GGUF converter uses them. Any other
# value (e.g. "smollm", "gpt2") gets the plain GPT-2 ByteLevel regex, which is what transformers
# does too. Note: llama.cpp's own "smollm" pre-tokenizer also splits digits one by one; we follow
# transformers here, so long digit runs may tokenize differently from llama.cpp.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2),
    "tekken": _TEKKEN,
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


@dataclass
class GGUFModel:
    """A GGUF checkpoint in Hugging Face terms.

    `config` has LlamaConfig keys; `state_dict` maps LlamaForCausalLM keys (`model.embed_tokens.weight`,
    `model.layers.{i}.self_attn.q_proj.weight`, ..., `model.norm.weight`, and `lm_head.weight` only
    when untied) to float32 tensors.
    """

    config: dict
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None  # None when `tokenizer.ggml.model` is not "gpt2" (byte-level BPE)
    special_tokens: dict[str, str] = field(default_factory=dict)  # role (bos/eos/pad/unk) -> token
    chat_template: str | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    # HF key -> int4 groups of 32 (q uint8 (out, in), scale, zero (out, in/32) float32) of the
    # weights stored as Q4_0/Q4_1/Q4_K; filled by read_gguf(..., int4=True)
    int4: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def read_gguf(path: str | os.PathLike, int4: bool = False) -> GGUFModel:
    """Read a llama GGUF file: config, dequantised float32 weights (HF keys) and tokenizer;
    int4=True: also the int4 groups of its 4-bit weights (`GGUFModel.int4`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/... on bad or short files
        raise ValueError(f"{path}: not a valid GGUF file, or truncated ({type(e).__name__}: {e})") from e
    meta = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ValueError(f"{path}: unsupported architecture {arch!r}; supported: {supported}")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"{path}: unsupported rope scaling {scaling!r}; supported: none")

    tensors = {t.name: t for t in reader.tensors}
    config = _config(path, meta, arch, tensors)
    state_dict = _state_dict(path, tensors, config)
    tokenizer, special = _tokenizer(meta)
    return GGUFModel(
        config=config,
        state_dict=state_dict,
        int4=_int4(tensors, config) if int4 else {},
        tokenizer=tokenizer,
        special_tokens=special,
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )


def _config(path: str, meta: dict, arch: str, tensors: dict) -> dict:
    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    required = ("embedding_length", "feed_forward_length", "block_count", "attention.head_count")
    if missing := [f"{arch}.{key}" for key in required if get(key) is None]:
        raise ValueError(f"{path}: missing required metadata: {', '.join(missing)}")
    n_head = int(get("attention.head_count"))
    embed = tensors.get("token_embd.weight")
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    vocab = vocab or (int(embed.shape[-1]) if embed is not None else 0)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": int(get("embedding_length")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "hidden_act": "silu",
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
    }
    head_dim = get("attention.key_length", get("rope.dimension_count"))
    if head_dim is not None:
        config["head_dim"] = int(head_dim)
    for role in ("bos", "eos", "pad"):
        token_id = meta.get(f"tokenizer.ggml.{'padding' if role == 'pad' else role}_token_id")
        config[f"{role}_token_id"] = None if token_id is None else int(token_id)
    return config


def _hf_key(name: str) -> str | None:
    base, _, suffix = name.rpartition(".")
    parts = base.split(".")
    if len(parts) == 1 and parts[0] in GLOBAL_KEYS:
        return f"{GLOBAL_KEYS[parts[0]]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_KEYS:
        return f"model.layers.{parts[1]}.{BLOCK_KEYS[parts[2]]}.{suffix}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py reorders each head's rows from rotate-half (HF) to interleaved pairs
    # (llama.cpp): reshape(n_head, 2, d/2) -> swap. Inverse: (out, in) -> (n_head, d/2, 2, in) -> swap.
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _state_dict(path: str, tensors: dict, config: dict) -> dict[str, torch.Tensor]:
    required = ["token_embd.weight", "output_norm.weight"]
    required += [f"blk.{i}.{w}" for i in range(config["num_hidden_layers"]) for w in REQUIRED_BLOCK_WEIGHTS]
    if missing := [name for name in required if name not in tensors]:
        raise ValueError(f"{path}: missing required tensors: {', '.join(missing)}")
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{path}: llama3-style rope scaling (rope_freqs.weight) is not supported")
    if unknown := [name for name in tensors if _hf_key(name) is None]:
        raise ValueError(f"{path}: unexpected tensors (not a plain llama model?): {', '.join(unknown)}")
    for name, t in tensors.items():
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ValueError(
                f"{path}: tensor {name!r} has unsupported type {t.tensor_type.name}; "
                f"supported: {', '.join(sorted(q.name for q in SUPPORTED_TYPES))}"
            )
    state_dict = {}
    for name, t in tensors.items():
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"{path}: cannot dequantise tensor {name!r} of type {t.tensor_type.name}") from e
        # GGUF lists dims fastest-first (ne0 = columns); torch wants (rows, columns).
        w = np.array(w, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        state_dict[_hf_key(name)] = torch.from_numpy(np.ascontiguousarray(_rows_in_hf_order(name, w, config)))
    return state_dict


def _rows_in_hf_order(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    if ".attn_q." in name:
        return _unpermute(w, config["num_attention_heads"])
    if ".attn_k." in name:
        return _unpermute(w, config["num_key_value_heads"])
    return w


def int4_groups(data: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The raw blocks (rows, bytes per row) of a Q4_0, Q4_1 or Q4_K tensor → codes q (rows, in)
    uint8 in 0..15 and per group of 32 a scale s and a zero z (rows, in/32) float32, with
    w = (q - 8) s + z exactly as llama.cpp dequantises (up to float32 rounding of z):

        Q4_0  w = d (q - 8)                     s = d,     z = 0
        Q4_1  w = d q + m                       s = d,     z = m + 8 d
        Q4_K  w = d sc_j q - dmin m_j  (256 = 8 groups j of 32, 6-bit sc_j, m_j)
                                                s = d sc_j,  z = 8 d sc_j - dmin m_j
    """
    rows = data.shape[0]
    blocks = data.reshape(-1, GGML_QUANT_SIZES[qtype][1])  # (n, bytes per block)

    def half(a, b):
        return np.ascontiguousarray(blocks[:, a:b]).view(np.float16).astype(np.float32)  # (n, 1)
    if qtype == GGMLQuantizationType.Q4_0:
        scale, qs = half(0, 2), blocks[:, 2:]
        zero = np.zeros_like(scale)
    elif qtype == GGMLQuantizationType.Q4_1:
        scale, qs = half(0, 2), blocks[:, 4:]
        zero = half(2, 4) + 8 * scale
    elif qtype == GGMLQuantizationType.Q4_K:
        sc, mn = Q4_K.get_scale_min(blocks[:, 4:4 + Q4_K.K_SCALE_SIZE])  # (n, 8) each
        scale = half(0, 2) * sc.astype(np.float32)
        zero = 8 * scale - half(2, 4) * mn.astype(np.float32)
        qs = blocks[:, 4 + Q4_K.K_SCALE_SIZE:].reshape(-1, 32)  # 4 chunks of 32 bytes: groups 2i, 2i+1
    else:
        raise ValueError(f"int4_groups: {qtype.name} is not a 4-bit type ({', '.join(t.name for t in INT4_TYPES)})")
    # 32 bytes hold a group pair (Q4_K) and 16 bytes one group (Q4_0/1): low nibbles first, then high
    half_group = qs.shape[1]
    q = np.stack([qs & 0x0F, qs >> 4], axis=1).reshape(-1, 2 * half_group)
    return q.reshape(rows, -1), scale.reshape(rows, -1), zero.reshape(rows, -1)


def _int4(tensors: dict, config: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    out = {}
    for name, t in tensors.items():
        if t.tensor_type in INT4_TYPES:
            out[_hf_key(name)] = tuple(torch.from_numpy(np.ascontiguousarray(_rows_in_hf_order(name, a, config)))
                                       for a in int4_groups(t.data, t.tensor_type))
    return out


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte alphabet: printable bytes map to themselves, the rest to code points from 256 up.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _tokenizer(meta: dict) -> tuple[Tokenizer | None, dict[str, str]]:
    tokens = meta.get("tokenizer.ggml.tokens") or []
    special = {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            special[role] = tokens[token_id]
    if meta.get("tokenizer.ggml.model") != "gpt2":
        return None, special

    # Tokens outside the byte alphabet are mislabels by llama.cpp; respell them as transformers does.
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for index, token in enumerate(tokens):
        spelled = token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[spelled] = index  # a later duplicate wins, as in transformers
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()

    token_types = meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, kind in zip(tokens, token_types)
            if kind == CONTROL and set(t) <= alphabet
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, token_types)
            if kind == USER_DEFINED and t in vocab
        ]
    )

    # llama.cpp's add_bos/add_eos flags become a template around every encoded sequence.
    ends = {r: special[r] for r in ("bos", "eos") if meta.get(f"tokenizer.ggml.add_{r}_token") and r in special}
    if ends:
        bos, eos = [ends["bos"]] if "bos" in ends else [], [ends["eos"]] if "eos" in ends else []
        tok.post_processor = processors.TemplateProcessing(
            single=[*bos, "$A", *eos],
            pair=[*bos, "$A", *eos, *bos, "$B:1", *eos],
            special_tokens=[(t, int(meta[f"tokenizer.ggml.{r}_token_id"])) for r, t in ends.items()],
        )
    return tok, special
