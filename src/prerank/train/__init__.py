"""Training: the loop, losses, checkpoints."""

from prerank.train.checkpoint import load_checkpoint, save_checkpoint
from prerank.train.trainer import Trainer, TrainConfig, evaluate, predict_table

__all__ = ["TrainConfig", "Trainer", "evaluate", "load_checkpoint", "predict_table", "save_checkpoint"]
