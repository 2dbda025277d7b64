import numpy as np
import pytest
import torch

from prerank.cascade import CascadeConfig, build_cascade
from prerank.data.pipeline import ProtocolConfig
from prerank.data.synthetic import load_synthetic
from prerank.data.table import ITEM_ROW
from prerank.models import create_model
from prerank.train.trainer import Trainer, TrainConfig

# The cascade of `small_data` that the cascade, listwise and LT-TTD tests share.
CASCADE_CONFIG = CascadeConfig(retrieval_size=20, random_items=5, prerank_size=8, exposure_size=3, window=4)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_data():
    """A small generated dataset under the leakage-free protocol."""
    return load_synthetic(ProtocolConfig(seq_len=8), n_users=120, n_items=60, events_per_user=20, seed=3, embed_dim=8)


@pytest.fixture(scope="session")
def small_batch(small_data):
    rows = np.arange(48)
    table = small_data.test.subset(rows)
    return {k: v for k, v in table.to_tensors().items()}, table[ITEM_ROW]


@pytest.fixture(scope="session")
def teacher(small_data):
    """A small DIN ranking teacher trained on `small_data` (eval mode)."""
    torch.manual_seed(0)
    model = create_model("din", small_data.schema, {"hidden": [16], "attention_hidden": [8]})
    Trainer(model, TrainConfig(epochs=15, patience=15, lr=1e-2, batch_size=128, progress=False)).fit(small_data.train, small_data.valid)
    return model.eval()


@pytest.fixture(scope="session")
def cascade(small_data, teacher):
    return build_cascade(small_data, teacher, CASCADE_CONFIG)
