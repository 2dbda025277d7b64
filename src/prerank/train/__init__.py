"""Training: the loop, losses, the end-to-end run (checkpoints are `prerank.models.checkpoint`)."""

from prerank.train.trainer import Trainer, TrainConfig, evaluate, predict_table

__all__ = ["TrainConfig", "Trainer", "evaluate", "predict_table"]
