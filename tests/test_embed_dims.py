"""Embedding dims are model configuration: the `embed_dim` option of every model, per table or for all."""

import pytest
import torch

from prerank.data.pipeline import ProtocolConfig
from prerank.data.synthetic import load_synthetic
from prerank.models import REGISTRY, create_model, get_model_class, make_config
from prerank.models.base import config_to_dict
from prerank.models.layers import EmbeddingBank
from prerank.serve import export_artifact, load_artifact
from prerank.models.checkpoint import load_checkpoint, save_checkpoint
from tests.test_contract import SMALL

MODELS = sorted(REGISTRY)


@pytest.fixture(scope="module")
def no_sequence():
    """Without a behaviour sequence the user side shares no table with the item side."""
    return load_synthetic(ProtocolConfig(seq_len=0), n_users=40, n_items=20, events_per_user=8, seed=1, embed_dim=8)


def bank_dims(model) -> dict[str, int]:
    banks = [m for m in model.modules() if isinstance(m, EmbeddingBank)]
    assert banks, "every model keeps its tables in an EmbeddingBank"
    return {vocab: table.embedding_dim for bank in banks for vocab, table in bank.tables.items()}


def test_with_embed_dims_sets_all_tables_or_named_ones(small_data):
    schema = small_data.schema
    assert set(schema.embed_dims.values()) == {8}
    assert set(schema.with_embed_dims(5).embed_dims.values()) == {5}
    assert schema.with_embed_dims(None) is schema
    # A feature name stands for its table: the behaviour sequence shares the item-id table.
    per_table = schema.with_embed_dims({"hist_items": 6, "segment": 3})
    assert per_table["item_id"].embed_dim == per_table["hist_items"].embed_dim == 6
    assert per_table.embed_dims == {**schema.embed_dims, "item_id": 6, "segment": 3}
    assert per_table.same_data(schema) and schema.same_data(per_table) and per_table != schema
    with pytest.raises(ValueError, match=r"embed_dim: features \['hist_items', 'item_id'\] share the table 'item_id'"):
        schema.with_embed_dims({"item_id": 4, "hist_items": 6})
    with pytest.raises(ValueError, match=r"embed_dim: no embedding table 'nope'; tables: \["):
        schema.with_embed_dims({"nope": 4})
    with pytest.raises(ValueError, match="embed_dim: no embedding table 'popularity'"):  # a dense feature has none
        schema.with_embed_dims({"popularity": 4})
    with pytest.raises(ValueError, match="must be a positive integer"):
        schema.with_embed_dims(0)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_takes_embed_dim(name, small_data):
    default = create_model(name, small_data.schema, SMALL.get(name, {}))
    assert set(bank_dims(default).values()) == {8} and default.config.embed_dim is None
    model = create_model(name, small_data.schema, {**SMALL.get(name, {}), "embed_dim": 4})
    assert set(bank_dims(model).values()) == {4}
    assert set(model.schema.embed_dims.values()) == {4} and model.schema.same_data(small_data.schema)
    batch = {k: v[:6] for k, v in small_data.train.to_tensors().items()}
    assert model(batch).logits.shape == (6, 1)
    # A config round trip (what checkpoints and artifacts store) rebuilds the same dims.
    again = create_model(name, small_data.schema, config_to_dict(model.config))
    assert bank_dims(again) == bank_dims(model)


def test_per_table_dims_where_the_model_allows_and_a_clear_error_where_not(small_data, no_sequence):
    user, item = {"user_id": 4, "segment": 4}, {"item_id": 12, "category": 12, "tags": 12}
    model = create_model("two_tower", no_sequence.schema, {"hidden": [8], "embed_dim": {**user, **item}})
    assert bank_dims(model) == {**user, **item}
    batch = {k: v[:3] for k, v in no_sequence.train.to_tensors().items()}
    assert model(batch).logits.shape == (3, 1)
    # A side's tables are stacked as fields; with a behaviour sequence the user side holds the item-id table.
    with pytest.raises(ValueError, match=r"tables \{'user_id': 4, 'segment': 4, 'item_id': 12\} .* model option embed_dim"):
        create_model("two_tower", small_data.schema, {"embed_dim": {**user, **item}})
    with pytest.raises(ValueError, match=r"din: crosses need .* 4 and 12: .* option embed_dim, or set crosses=False"):
        create_model("din", no_sequence.schema, {"embed_dim": {**user, **item}})
    assert bank_dims(create_model("din", no_sequence.schema, {"embed_dim": {**user, **item}, "crosses": False})) == {**user, **item}
    with pytest.raises(ValueError, match="cold: its feature groups are stacked and need one embedding dim.*embed_dim"):
        create_model("cold", no_sequence.schema, {"embed_dim": {**user, **item}})


@pytest.mark.parametrize("value, message", [
    (0, "embed_dim"), ("16", "embed_dim"), (True, "embed_dim"), ({"item_id": -1}, "embed_dim"),
    ({"nope": 4}, "no embedding table 'nope'"),
])
def test_bad_embed_dim_is_a_config_error(small_data, value, message):
    with pytest.raises(ValueError, match=rf"bad config for model 'two_tower': .*{message}"):
        create_model("two_tower", small_data.schema, {"embed_dim": value})


def test_a_model_built_directly_must_match_its_embed_dim(small_data):
    cls = get_model_class("two_tower")
    with pytest.raises(ValueError, match="build the model with create_model"):
        cls(small_data.schema, make_config("two_tower", {"embed_dim": 4}))


def test_checkpoint_and_artifact_rebuild_the_model_with_its_dims(small_data, tmp_path):
    torch.manual_seed(0)
    model = create_model("two_tower", small_data.schema, {"hidden": [8], "embed_dim": {"item_id": 4, "category": 4,
                                                                                       "tags": 4, "user_id": 4, "segment": 4}}).eval()
    batch = {k: v[:5] for k, v in small_data.test.to_tensors().items()}
    save_checkpoint(tmp_path / "checkpoint.pt", model)
    loaded, _ = load_checkpoint(tmp_path / "checkpoint.pt")
    assert bank_dims(loaded) == bank_dims(model) and set(bank_dims(loaded).values()) == {4}
    torch.testing.assert_close(loaded(batch).logits, model(batch).logits)
    # The artifact is exported against the data (schema dims 8) and keeps the model's dims.
    export_artifact(loaded, small_data, tmp_path / "artifact")
    served = load_artifact(tmp_path / "artifact").model
    assert bank_dims(served) == bank_dims(model)
    torch.testing.assert_close(served(batch).logits, model(batch).logits)
