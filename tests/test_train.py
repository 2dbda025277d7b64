import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prerank.data.table import LABEL
from prerank.models import REGISTRY, create_model
from prerank.models.checkpoint import load_checkpoint, save_checkpoint
from prerank.train import Trainer, TrainConfig, evaluate, predict_table
from tests.test_contract import SMALL

def train_loss(model, table):
    probabilities = torch.as_tensor(predict_table(model, table))
    return F.binary_cross_entropy(probabilities.double().clamp(1e-7, 1 - 1e-7), torch.as_tensor(table[LABEL]).double()).item()

# Models without batch norm or a learnable temperature need more steps on the tiny data.
TRAIN_SMALL = {"din": {"epochs": 4, "patience": 4, "lr": 1e-2, "batch_size": 128}}


# Listwise models (LT-TTD) train on cascade lists with their own losses, which vanish on lists of
# one row; their learning test is tests/test_lttd.py (pointwise BCE alone does not move LT-TTD's
# score on this tiny data in one epoch).
@pytest.mark.parametrize("name", sorted(n for n in REGISTRY if not REGISTRY[n].listwise))
def test_one_epoch_lowers_the_loss(name, small_data):
    torch.manual_seed(0)
    model = create_model(name, small_data.schema, SMALL.get(name, {}))
    before = train_loss(model, small_data.train)
    # Batches of 16 give 120 steps: enough for a model that starts calibrated at the prior
    # (logits near 0, e.g. IntTower's sum-max) to show learning, not only a shrinking scale.
    config = {"epochs": 1, "batch_size": 16, "progress": False, **TRAIN_SMALL.get(name, {})}
    Trainer(model, TrainConfig(**config)).fit(small_data.train, small_data.valid)
    after = train_loss(model, small_data.train)
    assert after < before - 0.01, (before, after)

def test_training_is_deterministic_under_a_seed(small_data):
    runs = []
    for _ in range(2):
        torch.manual_seed(123)  # a different global state: the trainer must reseed from its config
        model = create_model("two_tower", small_data.schema, SMALL["two_tower"])
        trainer = Trainer(model, TrainConfig(epochs=2, batch_size=128, seed=7, progress=False))
        trainer.fit(small_data.train, small_data.valid)
        runs.append((model.state_dict(), [h.train_loss for h in trainer.history]))
    assert runs[0][1] == runs[1][1]
    for key in runs[0][0]:
        torch.testing.assert_close(runs[0][0][key], runs[1][0][key], atol=0, rtol=0)

def test_early_stopping_keeps_the_best_epoch(small_data):
    model = create_model("two_tower", small_data.schema, SMALL["two_tower"])
    trainer = Trainer(model, TrainConfig(epochs=12, batch_size=64, lr=1e-2, patience=1, progress=False))
    trainer.fit(small_data.train, small_data.valid)
    aucs = [h.valid_auc for h in trainer.history]
    assert len(aucs) < 12  # it stopped
    assert trainer.best_valid_auc == max(aucs)
    assert evaluate(model, small_data.valid)["auc"] == pytest.approx(max(aucs))

def test_checkpoint_round_trip(small_data, tmp_path):
    model = create_model("two_tower", small_data.schema, SMALL["two_tower"])
    Trainer(model, TrainConfig(epochs=1, batch_size=128, progress=False)).fit(small_data.train, small_data.valid)
    save_checkpoint(tmp_path / "c.pt", model, extra={"note": "x"})
    restored, payload = load_checkpoint(tmp_path / "c.pt")
    assert payload["extra"] == {"note": "x"} and payload["model"] == "two_tower"
    np.testing.assert_array_equal(predict_table(model, small_data.test), predict_table(restored, small_data.test))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left

def test_bad_config_is_a_clear_error(small_data):
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model("nope", small_data.schema)
    with pytest.raises(ValueError, match="bad config for model 'two_tower'.*hiden"):
        create_model("two_tower", small_data.schema, {"hiden": [3]})
    with pytest.raises(ValueError, match="bad config.*similarity"):
        create_model("two_tower", small_data.schema, {"similarity": "l7"})
