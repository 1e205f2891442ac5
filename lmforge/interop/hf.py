"""Import and export Hugging Face model directories (BERT/MiniLM, GPT-2, Llama, T5, BART, Marian).

Import reads `config.json` + `model.safetensors` (sharded or not) or `pytorch_model.bin`,
translates every key through the family's key map, and refuses partial loads.
Export writes a directory that `transformers` loads with `from_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmforge.atomic import atomic_write
from lmforge.config import ModelConfig
from lmforge.interop.hf_config import from_hf_config, to_hf_config
from lmforge.interop.hf_keys import BASE_PREFIX, IGNORED_SUFFIXES, gpt2_in, gpt2_out, key_map
from lmforge.models.heads import Model
from lmforge.models.io import HEAD_PREFIXES, load_weights, read_safetensors
from lmforge.nn.layers import sinusoidal_table


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint directory, from whichever weight files it has."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd = {}
        for f in files:
            if not (directory / f).is_file():
                raise FileNotFoundError(f"{index} names shard {f}, which is missing")
            sd.update(read_safetensors(directory / f))
        return sd
    binary = directory / "pytorch_model.bin"
    if binary.is_file():
        try:
            return torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle/zip errors of a truncated file
            raise ValueError(f"{binary}: cannot read PyTorch checkpoint (truncated or corrupt?): {e}") from e
    raise FileNotFoundError(f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _prefix(cfg: ModelConfig, keys) -> str:
    p = BASE_PREFIX[cfg.hf_arch]
    return p if p and any(k.startswith(p) for k in keys) else ""


def convert_from_hf(cfg: ModelConfig, hf_sd: dict[str, torch.Tensor], source: str,
                    lenient_heads: bool = False) -> dict[str, torch.Tensor]:
    """HF state dict → our state dict. Unknown HF keys are an error unless they belong to
    a head we are replacing (lenient_heads)."""
    if cfg.hf_arch == "gpt2":
        hf_sd = gpt2_in(hf_sd)
    kmap = key_map(cfg, _prefix(cfg, hf_sd))
    ours, used = {}, set()
    for k, candidates in kmap.items():
        for c in candidates:
            if c in hf_sd:
                ours[k] = hf_sd[c].reshape(-1) if k == "lm_head.bias" else hf_sd[c]
                break
        used.update(candidates)
    # tied copies (lm_head.weight of a tied model, Marian's static sinusoid) are not needed
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    leftovers = [k for k in hf_sd if k not in used and k not in ignorable and not k.endswith(IGNORED_SUFFIXES)
                 and not (cfg.position == "sinusoidal" and k.endswith("embed_positions.weight"))]
    if leftovers and not lenient_heads:
        raise ValueError(f"{source}: unexpected {len(leftovers)} tensor(s) for a {cfg.hf_arch} {cfg.task} model: "
                         f"{', '.join(leftovers[:20])}")
    return ours


def hf_names(cfg: ModelConfig, hf_keys) -> dict[str, str]:
    """Our state-dict key → the HF key it is read from, for those of `hf_keys` the key map
    knows (names as stored, before GPT-2's Conv1D transposes)."""
    keys = set(hf_keys)
    kmap = key_map(cfg, _prefix(cfg, keys))
    return {k: found[0] for k, cands in kmap.items() if (found := [c for c in cands if c in keys])}


def load_hf(directory: str | Path, task: str | None = None, dtype: torch.dtype = torch.float32,
            **overrides) -> Model:
    """Load a HF model directory into an lmforge Model.

    task: replace the checkpoint's head (e.g. "classify" on a BertModel); the backbone
    must then load completely and the new head starts freshly initialised.
    """
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ValueError(f"{cfg_path}: not valid JSON: {e}") from e
    from_hf_config(hf_cfg, where=str(cfg_path))  # reject unsupported configs before reading weights
    return model_from_hf(hf_cfg, read_hf_weights(directory), str(directory), task, dtype, **overrides)


def model_from_hf(hf_cfg: dict, sd_hf: dict[str, torch.Tensor], source: str, task: str | None = None,
                  dtype: torch.dtype = torch.float32, **overrides) -> Model:
    """Build a Model from a HF config dict and HF-named tensors (also used by the GGUF import)."""
    base = from_hf_config(hf_cfg, where=source)
    if base.hf_arch == "bert" and base.task != "pretraining" and not any("pooler.dense" in k for k in sd_hf):
        base = base.replace(pooler=False)
    if base.hf_arch == "t5":  # a separate head exists only if the checkpoint holds a different one
        head, shared = sd_hf.get("lm_head.weight"), sd_hf.get("shared.weight")
        base = base.replace(tie_embeddings=head is None or (shared is not None and torch.equal(head, shared)))
    new_head = task is not None and task != base.task
    if new_head and task == "classify" and base.hf_arch == "bert":
        overrides = {"pooler": True, **overrides}
    cfg = base.replace(**({"task": task} if new_head else {}), **overrides)
    model = Model(cfg)
    sd = convert_from_hf(base if new_head else cfg, sd_hf, source, lenient_heads=new_head)
    load_weights(model, sd, source, new_head=new_head, dtype=dtype)
    return model.to(dtype)


def save_hf(model: Model, directory: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` in Hugging Face layout."""
    from lmforge.models.quantize import is_quantized
    if kind := is_quantized(model):
        raise ValueError(f"not saving to {directory}: the model is {kind}-quantised for inference; "
                         "save the float model (load it again without quantize)")
    cfg, directory = model.cfg, Path(directory)
    hf_cfg = to_hf_config(cfg)
    prefix = BASE_PREFIX[cfg.hf_arch]
    if (cfg.hf_arch, cfg.task) in {("bert", "embed"), ("gpt2", "embed"), ("llama", "embed")}:
        prefix = ""  # bare base models carry no prefix
    kmap = key_map(cfg, prefix)
    own = model.state_dict()
    out = {}
    for k, candidates in kmap.items():
        t = own[k]
        out[candidates[0]] = t.reshape(1, -1) if k == "lm_head.bias" else t
    if cfg.hf_arch == "gpt2":
        out = gpt2_out(out)
    if cfg.hf_arch == "marian":  # HF keeps the static sinusoid as a (frozen) tensor
        table = sinusoidal_table(cfg.max_len, cfg.d_model)
        for stack in ("encoder", "decoder"):
            out[f"{prefix}{stack}.embed_positions.weight"] = table
    missing = [k for k in own if k not in kmap]
    if missing:
        raise ValueError(f"cannot export {', '.join(missing[:10])}: no Hugging Face name for them")
    out = {k: v.detach().contiguous().clone() for k, v in out.items()}
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(out, tmp, metadata={"format": "pt"}))
    atomic_write(directory / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(hf_cfg, indent=2)))
    return directory
