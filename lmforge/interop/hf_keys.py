"""Per-family key maps between lmforge's state dict and Hugging Face checkpoints.

A map is data: our key → HF key candidates (the first one is what we export;
the others are tied copies that a checkpoint may or may not contain).
`{p}` is the base-model prefix ("bert.", "transformer.", "model." or "").
"""

from __future__ import annotations

import torch

from lmforge.config import ModelConfig

# HF keys that are buffers or tied copies: accepted in a checkpoint, never required.
IGNORED_SUFFIXES = ("position_ids", "token_type_ids", "attn.bias", "attn.masked_bias", "rotary_emb.inv_freq",
                    "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")

BASE_PREFIX = {"bert": "bert.", "gpt2": "transformer.", "llama": "model.", "t5": "", "bart": "model.",
               "marian": "model."}


def _lin(ours: str, theirs: str, bias: bool) -> dict[str, list[str]]:
    out = {f"{ours}.weight": [f"{theirs}.weight"]}
    if bias:
        out[f"{ours}.bias"] = [f"{theirs}.bias"]
    return out


def _norm(ours: str, theirs: str, cfg: ModelConfig) -> dict[str, list[str]]:
    return _lin(ours, theirs, cfg.norm == "layernorm")


def _bert(cfg: ModelConfig) -> dict[str, list[str]]:
    m = {"backbone.tokens.weight": ["{p}embeddings.word_embeddings.weight"],
         "backbone.encoder.positions.weight": ["{p}embeddings.position_embeddings.weight"],
         **_norm("backbone.encoder.embed_norm", "{p}embeddings.LayerNorm", cfg)}
    if cfg.type_vocab_size:
        m["backbone.encoder.types.weight"] = ["{p}embeddings.token_type_embeddings.weight"]
    for i in range(cfg.n_encoder_layers):
        o, t = f"backbone.encoder.layers.{i}", f"{{p}}encoder.layer.{i}"
        for a, b in (("q", "query"), ("k", "key"), ("v", "value")):
            m.update(_lin(f"{o}.attn.{a}", f"{t}.attention.self.{b}", True))
        m.update(_lin(f"{o}.attn.o", f"{t}.attention.output.dense", True))
        m.update(_norm(f"{o}.attn_norm", f"{t}.attention.output.LayerNorm", cfg))
        m.update(_lin(f"{o}.ff.up", f"{t}.intermediate.dense", True))
        m.update(_lin(f"{o}.ff.down", f"{t}.output.dense", True))
        m.update(_norm(f"{o}.ff_norm", f"{t}.output.LayerNorm", cfg))
    if cfg.pooler:
        m.update(_lin("backbone.pooler", "{p}pooler.dense", True))
    if cfg.task in ("mlm", "pretraining"):
        m.update(_lin("mlm_head.dense", "cls.predictions.transform.dense", True))
        m.update(_lin("mlm_head.norm", "cls.predictions.transform.LayerNorm", True))
        m["mlm_head.bias"] = ["cls.predictions.bias"]
    if cfg.task == "pretraining":
        m.update(_lin("nsp_head", "cls.seq_relationship", True))
    if cfg.task == "classify":
        m.update(_lin("classifier", "classifier", True))
    if cfg.task == "qa":
        m.update(_lin("qa_head", "qa_outputs", True))
    return m


def _gpt2(cfg: ModelConfig) -> dict[str, list[str]]:
    # c_attn is split into q/k/v (and Conv1D weights transposed) by `gpt2_in` before mapping
    m = {"backbone.tokens.weight": ["{p}wte.weight"], "backbone.decoder.positions.weight": ["{p}wpe.weight"],
         **_norm("backbone.decoder.norm", "{p}ln_f", cfg)}
    for i in range(cfg.n_decoder_layers):
        o, t = f"backbone.decoder.layers.{i}", f"{{p}}h.{i}"
        for a in "qkv":
            m.update(_lin(f"{o}.attn.{a}", f"{t}.attn.c_attn.{a}", True))
        m.update(_lin(f"{o}.attn.o", f"{t}.attn.c_proj", True))
        m.update(_norm(f"{o}.attn_norm", f"{t}.ln_1", cfg))
        m.update(_lin(f"{o}.ff.up", f"{t}.mlp.c_fc", True))
        m.update(_lin(f"{o}.ff.down", f"{t}.mlp.c_proj", True))
        m.update(_norm(f"{o}.ff_norm", f"{t}.ln_2", cfg))
    return {**m, **_decoder_heads(cfg)}


def _llama(cfg: ModelConfig) -> dict[str, list[str]]:
    m = {"backbone.tokens.weight": ["{p}embed_tokens.weight"], "backbone.decoder.norm.weight": ["{p}norm.weight"]}
    for i in range(cfg.n_decoder_layers):
        o, t = f"backbone.decoder.layers.{i}", f"{{p}}layers.{i}"
        for a in "qkvo":
            m[f"{o}.attn.{a}.weight"] = [f"{t}.self_attn.{a}_proj.weight"]
        for a in ("gate", "up", "down"):
            m[f"{o}.ff.{a}.weight"] = [f"{t}.mlp.{a}_proj.weight"]
        m[f"{o}.attn_norm.weight"] = [f"{t}.input_layernorm.weight"]
        m[f"{o}.ff_norm.weight"] = [f"{t}.post_attention_layernorm.weight"]
    return {**m, **_decoder_heads(cfg)}


def _decoder_heads(cfg: ModelConfig) -> dict[str, list[str]]:
    m = {}
    if cfg.task == "lm" and not cfg.tie_embeddings:
        m["lm_head.weight"] = ["lm_head.weight"]
    if cfg.task == "classify":
        m["classifier.weight"] = ["score.weight"]
    return m


def _t5(cfg: ModelConfig) -> dict[str, list[str]]:
    m = {"backbone.tokens.weight": ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"],
         "backbone.encoder.rel_bias.weight": ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
         "backbone.encoder.norm.weight": ["encoder.final_layer_norm.weight"]}
    ff = ({"gate": "wi_0", "up": "wi_1", "down": "wo"} if cfg.gated else {"up": "wi", "down": "wo"})
    stacks = [("encoder", cfg.n_encoder_layers)] if cfg.task == "embed" else \
        [("encoder", cfg.n_encoder_layers), ("decoder", cfg.n_decoder_layers)]
    for stack, n in stacks:
        for i in range(n):
            o, t = f"backbone.{stack}.layers.{i}", f"{stack}.block.{i}.layer"
            for a in "qkvo":
                m[f"{o}.attn.{a}.weight"] = [f"{t}.0.SelfAttention.{a}.weight"]
            m[f"{o}.attn_norm.weight"] = [f"{t}.0.layer_norm.weight"]
            j = 1
            if stack == "decoder":
                for a in "qkvo":
                    m[f"{o}.cross.{a}.weight"] = [f"{t}.1.EncDecAttention.{a}.weight"]
                m[f"{o}.cross_norm.weight"] = [f"{t}.1.layer_norm.weight"]
                j = 2
            for a, b in ff.items():
                m[f"{o}.ff.{a}.weight"] = [f"{t}.{j}.DenseReluDense.{b}.weight"]
            m[f"{o}.ff_norm.weight"] = [f"{t}.{j}.layer_norm.weight"]
    if cfg.task != "embed":
        m["backbone.decoder.rel_bias.weight"] = [
            "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        m["backbone.decoder.norm.weight"] = ["decoder.final_layer_norm.weight"]
        if not cfg.tie_embeddings:
            m["lm_head.weight"] = ["lm_head.weight"]
    return m


def _bart(cfg: ModelConfig) -> dict[str, list[str]]:
    m = {"backbone.tokens.weight": ["{p}shared.weight", "{p}encoder.embed_tokens.weight",
                                   "{p}decoder.embed_tokens.weight"]}
    for stack, n in (("encoder", cfg.n_encoder_layers), ("decoder", cfg.n_decoder_layers)):
        if cfg.position == "learned":
            m[f"backbone.{stack}.positions.weight"] = [f"{{p}}{stack}.embed_positions.weight"]
        if cfg.embed_norm:
            m.update(_norm(f"backbone.{stack}.embed_norm", f"{{p}}{stack}.layernorm_embedding", cfg))
        if cfg.norm_placement == "pre":
            m.update(_norm(f"backbone.{stack}.norm", f"{{p}}{stack}.layer_norm", cfg))
        for i in range(n):
            o, t = f"backbone.{stack}.layers.{i}", f"{{p}}{stack}.layers.{i}"
            attns = [("attn", "self_attn")] + ([("cross", "encoder_attn")] if stack == "decoder" else [])
            for ours, theirs in attns:
                for a, b in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
                    m.update(_lin(f"{o}.{ours}.{a}", f"{t}.{theirs}.{b}", cfg.bias))
                m.update(_norm(f"{o}.{ours}_norm", f"{t}.{theirs}_layer_norm", cfg))
            m.update(_lin(f"{o}.ff.up", f"{t}.fc1", cfg.bias))
            m.update(_lin(f"{o}.ff.down", f"{t}.fc2", cfg.bias))
            m.update(_norm(f"{o}.ff_norm", f"{t}.final_layer_norm", cfg))
    if cfg.task == "lm":
        m["lm_head.bias"] = ["final_logits_bias"]
    return m


_MAPS = {"bert": _bert, "gpt2": _gpt2, "llama": _llama, "t5": _t5, "bart": _bart, "marian": _bart}


def key_map(cfg: ModelConfig, prefix: str) -> dict[str, list[str]]:
    """our key → HF key candidates, with the base prefix filled in."""
    raw = _MAPS[cfg.hf_arch](cfg)
    return {k: [c.replace("{p}", prefix) for c in v] for k, v in raw.items()}


# ---- tensor layout fix-ups -------------------------------------------------------------
def gpt2_in(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2 Conv1D stores (in, out) weights and a fused c_attn: transpose and split q/k/v."""
    out = {}
    for k, t in sd.items():
        if k.endswith("attn.c_attn.weight") or k.endswith("attn.c_attn.bias"):
            base, kind = k.rsplit(".", 1)
            parts = t.chunk(3, dim=-1)
            for a, p in zip("qkv", parts):
                out[f"{base}.{a}.{kind}"] = p.t().contiguous() if kind == "weight" else p
        elif k.endswith(".weight") and (".c_proj." in k or ".c_fc." in k):
            out[k] = t.t().contiguous()
        else:
            out[k] = t
    return out


def gpt2_out(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `gpt2_in`."""
    out, fused = {}, {}
    for k, t in sd.items():
        if ".attn.c_attn." in k:
            base, a, kind = k.rsplit(".", 2)
            fused.setdefault((base, kind), {})[a] = t
        elif k.endswith(".weight") and (".c_proj." in k or ".c_fc." in k):
            out[k] = t.t().contiguous()
        else:
            out[k] = t
    for (base, kind), parts in fused.items():
        cat = [parts[a].t() if kind == "weight" else parts[a] for a in "qkv"]
        out[f"{base}.{kind}"] = torch.cat(cat, dim=-1).contiguous()
    return out
