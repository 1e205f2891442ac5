"""lmforge: a compact toolkit to pretrain, fine-tune and run Transformer language models.

The public names below are imported on first use (PEP 562), so that `import lmforge` and
`lmforge --help` stay fast and do not load torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"  # the one version: pyproject.toml reads it from here

_LAZY = {"load": "lmforge.api", "save": "lmforge.api", "describe": "lmforge.api",
         "ModelConfig": "lmforge.config", "PRESETS": "lmforge.config",
         "Model": "lmforge.models.heads", "build_model": "lmforge.models.heads"}
__all__ = ["ModelConfig", "PRESETS", "Model", "build_model", "load", "save", "describe"]


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
    if name not in _LAZY:  # a submodule, e.g. `lmforge.api.generate_text` right after `import lmforge`
        try:
            return importlib.import_module(f"lmforge.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"lmforge.{name}":
                raise
            raise AttributeError(f"module 'lmforge' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
