import torch

from prerank.train.run import run_training
from prerank.train.trainer import TrainConfig


def test_run_training_is_reproducible_whatever_the_global_rng_state(small_data):
    config = TrainConfig(epochs=1, batch_size=256, seed=4, progress=False)
    first = run_training(small_data, "two_tower", config, {"hidden": [16]})
    torch.rand(1000)  # whatever ran before must not change the initial weights
    second = run_training(small_data, "two_tower", config, {"hidden": [16]})
    assert first["test"] == second["test"]
