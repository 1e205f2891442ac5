"""The one training loop (loop.py), learning-rate schedules (schedule.py), checkpoints that
resume exactly (checkpoint.py) and YAML pretraining recipes (recipe.py)."""

from lmforge.train.loop import TrainConfig, TrainingDiverged, evaluate, train
from lmforge.train.pretrain import run_pretraining
from lmforge.train.recipe import Recipe, load_recipe

__all__ = ["TrainConfig", "TrainingDiverged", "train", "evaluate", "Recipe", "load_recipe", "run_pretraining"]
