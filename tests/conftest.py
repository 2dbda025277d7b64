import numpy as np
import pytest
import torch

from prerank.data.pipeline import ProtocolConfig
from prerank.data.synthetic import load_synthetic
from prerank.data.table import ITEM_ROW


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_data():
    """A small generated dataset under the leakage-free protocol."""
    return load_synthetic(ProtocolConfig(seq_len=8, embed_dim=8), n_users=120, n_items=60, events_per_user=20, seed=3)


@pytest.fixture(scope="session")
def small_batch(small_data):
    rows = np.arange(48)
    table = small_data.test.subset(rows)
    return {k: v for k, v in table.to_tensors().items()}, table[ITEM_ROW]
