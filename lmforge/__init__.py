"""lmforge: a compact toolkit to pretrain, fine-tune and run Transformer language models."""

from lmforge.api import describe, load, save
from lmforge.config import PRESETS, ModelConfig
from lmforge.models.heads import Model, build_model

__all__ = ["ModelConfig", "PRESETS", "Model", "build_model", "load", "save", "describe"]
__version__ = "0.1.0"
