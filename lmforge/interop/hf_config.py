"""Hugging Face config.json ⇄ ModelConfig, per architecture family."""

from __future__ import annotations

from lmforge.config import ModelConfig

_ACT_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
           "relu": "relu", "silu": "silu", "swish": "silu"}
_ACT_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}

# HF architecture class → (family key, lmforge task)
ARCHITECTURES = {
    "BertModel": ("bert", "embed"), "BertForMaskedLM": ("bert", "mlm"),
    "BertForPreTraining": ("bert", "pretraining"), "BertForSequenceClassification": ("bert", "classify"),
    "BertForQuestionAnswering": ("bert", "qa"),
    "GPT2Model": ("gpt2", "embed"), "GPT2LMHeadModel": ("gpt2", "lm"),
    "GPT2ForSequenceClassification": ("gpt2", "classify"),
    "LlamaModel": ("llama", "embed"), "LlamaForCausalLM": ("llama", "lm"),
    "LlamaForSequenceClassification": ("llama", "classify"),
    "T5ForConditionalGeneration": ("t5", "lm"), "T5Model": ("t5", "lm"), "T5EncoderModel": ("t5", "embed"),
    "BartForConditionalGeneration": ("bart", "lm"), "BartModel": ("bart", "lm"),
    "MarianMTModel": ("marian", "lm"), "MarianModel": ("marian", "lm"),
}
_MODEL_TYPES = {"bert": "bert", "gpt2": "gpt2", "llama": "llama", "t5": "t5", "bart": "bart", "marian": "marian"}
EXPORT_ARCH = {
    ("bert", "embed"): "BertModel", ("bert", "mlm"): "BertForMaskedLM",
    ("bert", "pretraining"): "BertForPreTraining", ("bert", "classify"): "BertForSequenceClassification",
    ("bert", "qa"): "BertForQuestionAnswering",
    ("gpt2", "lm"): "GPT2LMHeadModel", ("gpt2", "embed"): "GPT2Model",
    ("gpt2", "classify"): "GPT2ForSequenceClassification",
    ("llama", "lm"): "LlamaForCausalLM", ("llama", "embed"): "LlamaModel",
    ("llama", "classify"): "LlamaForSequenceClassification",
    ("t5", "lm"): "T5ForConditionalGeneration", ("t5", "embed"): "T5EncoderModel",
    ("bart", "lm"): "BartForConditionalGeneration", ("marian", "lm"): "MarianMTModel",
}


def _act(name: str, where: str) -> str:
    if name not in _ACT_IN:
        raise ValueError(f"{where}: unsupported activation {name!r}; supported: {sorted(_ACT_IN)}")
    return _ACT_IN[name]


def _labels(hf: dict) -> tuple[int, list[str] | None]:
    id2label = hf.get("id2label")
    if id2label:
        names = [id2label[k] for k in sorted(id2label, key=int)]
        return len(names), names
    return hf.get("num_labels", 2), None


def family_and_task(hf: dict, where: str = "config.json") -> tuple[str, str]:
    archs = hf.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    mt = hf.get("model_type")
    if mt in _MODEL_TYPES:
        return mt, {"bert": "embed"}.get(mt, "lm")
    raise ValueError(f"{where}: unsupported architecture {archs or mt!r}; supported: "
                     f"{', '.join(sorted(ARCHITECTURES))}")


def from_hf_config(hf: dict, task: str | None = None, where: str = "config.json") -> ModelConfig:
    """Translate a HF config dict into a ModelConfig (task from `architectures` unless given)."""
    fam, arch_task = family_and_task(hf, where)
    task = task or arch_task
    n_labels, labels = _labels(hf)
    common = dict(task=task, hf_arch=fam, num_labels=n_labels, labels=labels, pad_id=hf.get("pad_token_id"),
                  bos_id=hf.get("bos_token_id"), eos_id=_first(hf.get("eos_token_id")))
    try:
        if fam == "bert":
            if hf.get("position_embedding_type", "absolute") != "absolute":
                raise ValueError(f"{where}: position_embedding_type={hf['position_embedding_type']!r} is not supported")
            return ModelConfig(
                family="encoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                n_heads=hf["num_attention_heads"], n_encoder_layers=hf["num_hidden_layers"], n_decoder_layers=0,
                d_ff=hf["intermediate_size"], max_len=hf["max_position_embeddings"], position="learned",
                norm="layernorm", norm_placement="post", norm_eps=hf.get("layer_norm_eps", 1e-12), embed_norm=True,
                activation=_act(hf.get("hidden_act", "gelu"), where), type_vocab_size=hf.get("type_vocab_size", 2),
                pooler=task in ("embed", "pretraining", "classify"), dropout=hf.get("hidden_dropout_prob", 0.1),
                attn_dropout=hf.get("attention_probs_dropout_prob", 0.1), **common)
        if fam == "gpt2":
            if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
                raise ValueError(f"{where}: GPT-2 attention variants (scale_attn_by_inverse_layer_idx, "
                                 "reorder_and_upcast_attn) are not supported")
            d = hf["n_embd"]
            return ModelConfig(
                family="decoder", vocab_size=hf["vocab_size"], d_model=d, n_heads=hf["n_head"],
                n_decoder_layers=hf["n_layer"], d_ff=hf.get("n_inner") or 4 * d, max_len=hf["n_positions"],
                position="learned", norm="layernorm", norm_placement="pre",
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=_act(hf.get("activation_function", "gelu_new"), where),
                tie_embeddings=hf.get("tie_word_embeddings", True), dropout=hf.get("resid_pdrop", 0.1),
                attn_dropout=hf.get("attn_pdrop", 0.1), **common)
        if fam == "llama":
            rope = hf.get("rope_parameters") or {}
            scaling = hf.get("rope_scaling") or {}
            kind = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
            if kind not in ("default", None):
                raise ValueError(f"{where}: rope scaling {kind!r} is not supported")
            if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias") or hf.get("attention_bias"):
                raise ValueError(f"{where}: only Llama with silu MLP and no biases is supported")
            return ModelConfig(
                family="decoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
                head_dim=hf.get("head_dim"), n_decoder_layers=hf["num_hidden_layers"],
                d_ff=hf["intermediate_size"], max_len=hf.get("max_position_embeddings", 2048), position="rope",
                rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)), norm="rmsnorm",
                norm_placement="pre", norm_eps=hf.get("rms_norm_eps", 1e-6), activation="swiglu", bias=False,
                tie_embeddings=hf.get("tie_word_embeddings", False), dropout=0.0,
                attn_dropout=hf.get("attention_dropout", 0.0), **common)
        if fam == "t5":
            ff = hf.get("feed_forward_proj", "relu")
            act = {"relu": "relu", "gated-gelu": "geglu", "gelu": "gelu", "gated-silu": "swiglu"}.get(ff)
            if act is None:
                raise ValueError(f"{where}: feed_forward_proj={ff!r} is not supported")
            # transformers v5 always ties T5's head and says whether to rescale in
            # `scale_decoder_outputs`; v4 configs say both with `tie_word_embeddings`
            tied = hf.get("tie_word_embeddings", True)
            scaled = hf.get("scale_decoder_outputs", tied)
            d = hf["d_model"]
            return ModelConfig(
                family="encoder-decoder", vocab_size=hf["vocab_size"], d_model=d, n_heads=hf["num_heads"],
                head_dim=hf["d_kv"], n_encoder_layers=hf["num_layers"],
                n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"], d_ff=hf["d_ff"],
                max_len=hf.get("n_positions", 512), position="relative",
                rel_buckets=hf.get("relative_attention_num_buckets", 32),
                rel_max_distance=hf.get("relative_attention_max_distance", 128), norm="rmsnorm",
                norm_placement="pre", norm_eps=hf.get("layer_norm_epsilon", 1e-6), activation=act, bias=False,
                attn_scale=1.0, tie_embeddings=tied, logit_scale=d ** -0.5 if scaled else 1.0,
                dropout=hf.get("dropout_rate", 0.1), decoder_start_id=hf.get("decoder_start_token_id", 0),
                **{**common, "eos_id": _first(hf.get("eos_token_id", 1)), "pad_id": hf.get("pad_token_id", 0)})
        # bart / marian
        if hf["encoder_attention_heads"] != hf["decoder_attention_heads"] or \
                hf["encoder_ffn_dim"] != hf["decoder_ffn_dim"]:
            raise ValueError(f"{where}: encoder and decoder must share heads and ffn dims")
        if fam == "marian" and (hf.get("decoder_vocab_size") or hf["vocab_size"]) != hf["vocab_size"]:
            raise ValueError(f"{where}: Marian with separate decoder vocabulary is not supported")
        pre = bool(hf.get("normalize_before", False))
        return ModelConfig(
            family="encoder-decoder", vocab_size=hf["vocab_size"], d_model=hf["d_model"],
            n_heads=hf["encoder_attention_heads"], n_encoder_layers=hf["encoder_layers"],
            n_decoder_layers=hf["decoder_layers"], d_ff=hf["encoder_ffn_dim"],
            max_len=hf["max_position_embeddings"], position="learned" if fam == "bart" else "sinusoidal",
            pos_offset=2 if fam == "bart" else 0, norm="layernorm", norm_placement="pre" if pre else "post",
            norm_eps=1e-5, embed_norm=fam == "bart", activation=_act(hf.get("activation_function", "gelu"), where),
            embed_scale=bool(hf.get("scale_embedding", False)), tie_embeddings=True, lm_head_bias=True,
            dropout=hf.get("dropout", 0.1), attn_dropout=hf.get("attention_dropout", 0.0),
            decoder_start_id=hf.get("decoder_start_token_id"), **common)
    except KeyError as e:
        raise ValueError(f"{where}: missing field {e.args[0]!r} for a {fam} config") from None


def _first(x):
    return x[0] if isinstance(x, list) else x


def to_hf_config(cfg: ModelConfig) -> dict:
    """A config.json that HF transformers' `from_pretrained` reads back into the same model."""
    fam = cfg.hf_arch
    if fam is None or (fam, cfg.task) not in EXPORT_ARCH:
        raise ValueError(f"cannot export hf_arch={fam!r} task={cfg.task!r} to Hugging Face format; "
                         f"supported: {sorted(EXPORT_ARCH)}")
    out = {"architectures": [EXPORT_ARCH[fam, cfg.task]], "model_type": fam,
           "pad_token_id": cfg.pad_id, "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id,
           "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings}
    if cfg.labels:
        out["id2label"] = {str(i): n for i, n in enumerate(cfg.labels)}
        out["label2id"] = {n: i for i, n in enumerate(cfg.labels)}
    elif cfg.task == "classify":
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
    if fam == "bert":
        out.update(hidden_size=cfg.d_model, num_attention_heads=cfg.n_heads, num_hidden_layers=cfg.n_encoder_layers,
                   intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_len,
                   type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps,
                   hidden_act=_ACT_OUT[cfg.activation], hidden_dropout_prob=cfg.dropout,
                   attention_probs_dropout_prob=cfg.attn_dropout)
    elif fam == "gpt2":
        out.update(n_embd=cfg.d_model, n_head=cfg.n_heads, n_layer=cfg.n_decoder_layers, n_inner=cfg.d_ff,
                   n_positions=cfg.max_len, layer_norm_epsilon=cfg.norm_eps,
                   activation_function=_ACT_OUT[cfg.activation], resid_pdrop=cfg.dropout,
                   embd_pdrop=cfg.dropout, attn_pdrop=cfg.attn_dropout)
    elif fam == "llama":
        out.update(hidden_size=cfg.d_model, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                   head_dim=cfg.head_dim, num_hidden_layers=cfg.n_decoder_layers, intermediate_size=cfg.d_ff,
                   max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
                   rope_theta=cfg.rope_theta,
                   rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
                   attention_bias=False, mlp_bias=False)
    elif fam == "t5":
        ff = {"relu": "relu", "geglu": "gated-gelu", "gelu": "gelu", "swiglu": "gated-silu"}[cfg.activation]
        out.update(d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.d_ff, num_layers=cfg.n_encoder_layers,
                   num_decoder_layers=cfg.n_decoder_layers, num_heads=cfg.n_heads,
                   relative_attention_num_buckets=cfg.rel_buckets,
                   relative_attention_max_distance=cfg.rel_max_distance, layer_norm_epsilon=cfg.norm_eps,
                   feed_forward_proj=ff, scale_decoder_outputs=cfg.logit_scale != 1.0, dropout_rate=cfg.dropout, decoder_start_token_id=cfg.decoder_start_id,
                   is_encoder_decoder=True)
    else:
        out.update(d_model=cfg.d_model, encoder_layers=cfg.n_encoder_layers, decoder_layers=cfg.n_decoder_layers,
                   encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
                   encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff, max_position_embeddings=cfg.max_len,
                   activation_function={"silu": "swish"}.get(cfg.activation, _ACT_OUT.get(cfg.activation)),
                   scale_embedding=cfg.embed_scale, dropout=cfg.dropout, attention_dropout=cfg.attn_dropout,
                   decoder_start_token_id=cfg.decoder_start_id, is_encoder_decoder=True,
                   normalize_before=cfg.norm_placement == "pre")
        if fam == "marian":
            out["decoder_vocab_size"] = cfg.vocab_size
            out["share_encoder_decoder_embeddings"] = True
    return out
