import numpy as np
import pytest
import torch

from prerank.data.pipeline import ProtocolConfig, build_samples
from prerank.data.synthetic import synthetic_features
from prerank.data.table import LABEL
from prerank.models import create_model
from prerank.models.dat import category_alignment_loss, category_membership, mimic_loss
from prerank.train.trainer import Trainer, TrainConfig, evaluate
from tests.test_contract import SMALL
from tests.test_pipeline_ext import implicit_log


def test_mimic_loss_pulls_only_the_augmented_vector_of_positive_rows():
    augment = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]], requires_grad=True)
    target = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 0.0]], requires_grad=True)
    label = torch.tensor([1.0, 0.0, 1.0])
    loss = mimic_loss(augment, target, label)
    # (1/T) sum y |a - p|^2 = ((0.25 + 2.25) + 0 + (9 + 1)) / 3
    assert loss.item() == pytest.approx(12.5 / 3)
    loss.backward()
    assert target.grad is None or not target.grad.abs().sum() > 0  # stop-gradient on p
    expected = 2 * label[:, None] * (augment.detach() - target.detach()) / 3
    torch.testing.assert_close(augment.grad, expected)


def test_category_alignment_loss_against_numpy_covariances():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(9, 3))
    category = np.array([2, 2, 2, 2, 3, 3, 3, 4, 5])  # 5 has one row: skipped; 2 is the major category
    membership = category_membership(torch.as_tensor(category)[:, None], 6, "first")
    loss = category_alignment_loss(torch.as_tensor(vectors, dtype=torch.float32), membership)
    major = np.cov(vectors[category == 2].T)
    expected = sum(((major - np.cov(vectors[category == c].T)) ** 2).sum() for c in (3, 4) if (category == c).sum() >= 2)
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_multi_valued_categories_map_to_the_first_or_to_each():
    ids = torch.tensor([[3, 5, 0], [4, 0, 0]])
    first = category_membership(ids, 6, "first")
    each = category_membership(ids, 6, "each")
    assert first.tolist() == [[0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0]]
    assert each.tolist() == [[0, 0, 0, 1, 0, 1], [0, 0, 0, 0, 1, 0]]  # padding 0 is no category


def test_the_mimic_losses_use_each_rows_augmented_vectors_and_the_states_stay_the_serving_ones(small_data, small_batch):
    batch, _ = small_batch
    torch.manual_seed(0)
    model = create_model("dat", small_data.schema, {**SMALL["dat"], "category_weight": 0.0})
    output = model.train()(batch)
    assert set(output.aux_losses) == {"mimic_user", "mimic_item"}
    with torch.no_grad():
        p_u = model.encode_user(model.user_inputs(batch))["vector"]
        p_v = model.encode_items(model.item_inputs(batch))["vector"]
        a_u = model.user_augment(batch[small_data.schema.user_id])
        a_v = model.item_augment(batch[small_data.schema.item_id])
        label = batch[LABEL]
        # Adaptive-Mimic by hand: positives pull their augmented vector onto the other side's vector.
        expected_user = (label * ((a_u - p_v) ** 2).sum(-1)).mean() * model.config.mimic_user_weight
        expected_item = (label * ((a_v - p_u) ** 2).sum(-1)).mean() * model.config.mimic_item_weight
    torch.testing.assert_close(output.aux_losses["mimic_user"].detach(), expected_user)
    torch.testing.assert_close(output.aux_losses["mimic_item"].detach(), expected_item)
    for mode in (model.train, model.eval):
        mode()
        assert set(model.encode_user(model.user_inputs(batch))) == {"vector"}
        assert set(model.encode_items(model.item_inputs(batch))) == {"vector"}
    # The main loss alone already trains the augmented vectors through their towers.
    model.train()
    model.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(model(batch).logits.reshape(-1), batch[LABEL]).backward()
    assert model.user_augment.weight.grad.abs().sum() > 0


def test_category_feature_is_checked(small_data):
    assert create_model("dat", small_data.schema, SMALL["dat"]).category_feature == "category"
    assert create_model("dat", small_data.schema, {**SMALL["dat"], "category_feature": "tags"}).category_feature == "tags"
    with pytest.raises(ValueError, match="category_feature 'segment' must be an item-side"):
        create_model("dat", small_data.schema, {"category_feature": "segment"})
    with pytest.raises(ValueError, match="'nope' is not in the schema"):
        create_model("dat", small_data.schema, {"category_feature": "nope"})
    assert create_model("dat", small_data.schema, {"category_weight": 0.0, "category_feature": "nope"}).category_feature is None


def test_dat_learns_from_sampled_negatives():
    # Implicit feedback, 4 sampled negatives per positive: the paper's last ReLU collapsed here to a
    # constant score (valid AUC 0.5000, users and items on disjoint ReLU supports); the default must learn.
    log, users, items = implicit_log(n_users=300, n_items=80, events=12, seed=1)
    data = build_samples(log, users, items, synthetic_features(4), ProtocolConfig(seq_len=4, negatives=4), "implicit")
    torch.manual_seed(0)
    model = create_model("dat", data.schema)
    Trainer(model, TrainConfig(epochs=5, batch_size=256, lr=3e-3, num_threads=1, progress=False, patience=5)).fit(data.train, data.valid)
    assert evaluate(model, data.valid)["auc"] > 0.6
