"""The one training loop (loop.py) and its settings (config.py), learning-rate schedules
(schedule.py), checkpoints that resume exactly (checkpoint.py), metrics logs and the loss plot
(log.py), YAML pretraining recipes (recipe.py) and their run (pretrain.py), typed `key=value`
overrides (overrides.py), data parallelism (distributed.py), a clean stop on SIGINT/SIGTERM (signals.py), freed memory kept
for the next step (memory.py)."""

from lmforge.train.loop import TrainConfig, TrainingDiverged, TrainingInterrupted, evaluate, train
from lmforge.train.pretrain import run_pretraining
from lmforge.train.recipe import Recipe, load_recipe

__all__ = ["TrainConfig", "TrainingDiverged", "TrainingInterrupted", "train", "evaluate", "Recipe", "load_recipe",
           "run_pretraining"]
