"""The shared contract, checked for every registered model: parity of precomputed item states with
the forward pass, user/item isolation, the N axis, gradient flow, and the training side: training-mode
parity with the serving stages, one optimisation step in every declared training mode and phase,
a config round trip through YAML and a checkpoint round trip."""

import numpy as np
import pytest
import torch
import yaml

from prerank.data.table import LABEL
from prerank.models import REGISTRY, create_model
from prerank.models.base import PreRankModel, config_to_dict, gather_items
from prerank.models.checkpoint import load_checkpoint, save_checkpoint
from prerank.train.listwise import ListBatches, ListwiseTrainer
from prerank.train.losses import NO_HYBRID, HybridLossConfig
from prerank.train.trainer import Trainer, TrainConfig

MODELS = sorted(REGISTRY)
# Small configs keep the suite fast; each model's defaults are exercised by the CLI tests.
SMALL = {
    "two_tower": {"hidden": [32, 16]},
    "inttower": {"hidden": [32, 16], "heads": 2, "head_dim": 8},
    "dat": {"hidden": [32, 16]},
    "cold": {"hidden": [32, 16]},
    "din": {"hidden": [32, 16], "attention_hidden": [16]},
    "ranktower": {"heads": 2, "head_dim": 8, "hidden": [16], "attention_heads": 2},
    "lttd": {"dim": 16, "field_hidden": 16, "tower_hidden": [16], "residual_dim": 4, "residual_hidden": [16],
             "model_dim": 16, "heads": 2, "feedforward": 32, "layers": 1},
    "fit": {"hidden": [32, 16], "num_meta": 4, "attention_hidden": [8], "user_heads": 2, "item_heads": 3, "head_dim": 8},
    "tarq": {"hidden": [32, 16], "levels": 2, "codebook_size": 8},
}


def build(name, schema, seed=0) -> PreRankModel:
    torch.manual_seed(seed)
    return create_model(name, schema, SMALL.get(name, {}))


def catalogue_states(model, data):
    """The offline item-state table: encode_items over the whole catalogue, in chunks of 7."""
    return model.encode_catalogue(data.items.to_tensors(), batch_size=7)


def gather(state, rows):
    return gather_items(state, torch.as_tensor(rows))


@pytest.mark.parametrize("name", MODELS)
def test_parity_of_precomputed_item_states(name, small_data, small_batch):
    batch, item_rows = small_batch
    model = build(name, small_data.schema).eval()
    with torch.no_grad():
        expected = model(batch).logits
        table = catalogue_states(model, small_data)
        user_state = model.encode_user(model.user_inputs(batch))
        served = model.score(user_state, gather(table, item_rows[:, None]))
    assert expected.shape == (len(item_rows), 1)
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_user_state_ignores_item_features_and_vice_versa(name, small_data, small_batch):
    batch, _ = small_batch
    model = build(name, small_data.schema).eval()
    perm = torch.randperm(len(batch[LABEL]), generator=torch.Generator().manual_seed(0))
    swapped_items = dict(batch, **{f.name: batch[f.name][perm] for f in small_data.schema.item_features})
    swapped_users = dict(batch, **{f.name: batch[f.name][perm] for f in small_data.schema.user_features})
    with torch.no_grad():
        for encode, inputs, swapped in ((model.encode_user, model.user_inputs, swapped_items),
                                        (model.encode_items, model.item_inputs, swapped_users)):
            state, other = encode(inputs(batch)), encode(inputs(swapped))
            # An empty state would pass the comparison below without checking anything.
            assert state and state.keys() == other.keys(), (encode.__name__, sorted(state), sorted(other))
            for key in state:
                torch.testing.assert_close(state[key], other[key], msg=f"{encode.__name__}: {key}")
        # And each stage runs on its own side's features alone: no hidden reach across.
        model.encode_user({f.name: batch[f.name] for f in small_data.schema.user_features})
        model.encode_items({f.name: batch[f.name] for f in small_data.schema.item_features})


@pytest.mark.parametrize("name", [n for n in MODELS if not REGISTRY[n].listwise])
def test_scores_are_pointwise_along_the_candidate_axis(name, small_data, small_batch):
    batch, _ = small_batch
    model = build(name, small_data.schema).eval()
    n_items = len(small_data.item_raw_ids)
    candidates = torch.randint(0, n_items, (4, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        table = catalogue_states(model, small_data)
        users = {k: v[:4] for k, v in model.user_inputs(batch).items()}
        user_state = model.encode_user(users)
        many = model.score(user_state, gather(table, candidates))
        one_by_one = torch.cat([model.score(user_state, gather(table, candidates[:, j : j + 1])) for j in range(100)], dim=1)
    assert many.shape == (4, 100)
    torch.testing.assert_close(many, one_by_one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_gradient_reaches_every_parameter(name, small_data):
    model = build(name, small_data.schema).train()
    batch = {k: v for k, v in small_data.train.subset(np.arange(256)).to_tensors().items()}
    output = model(batch)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(output.logits.reshape(-1), batch[LABEL])
    loss = loss + sum(output.aux_losses.values(), torch.zeros(()))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reaches: {missing}"


# -- the training side of the contract ---------------------------------------------------------

def without_dropout(name):
    """The model's small config with dropout off where it has one: training-mode parity compares two
    computations of the same function, which dropout would draw differently."""
    config = dict(SMALL.get(name, {}))
    if "dropout" in REGISTRY[name].Config.__dataclass_fields__:
        config["dropout"] = 0.0
    return config


def list_batch(model, data, cascade, requests=6):
    """The first `requests` training lists of the shared cascade as one listwise batch ([B, N] items, mask)."""
    return next(ListBatches(model, data, cascade.lists("train"), torch.device("cpu")).batches(requests))


@pytest.mark.parametrize("name", MODELS)
def test_training_mode_forward_equals_the_serving_stages(name, small_data, cascade):
    """`forward` in training mode (through the model's `batch_states`, which may take a cheaper path
    when the candidates are known) gives the logits of `encode_user` + `encode_items` + `score` in
    the same mode, on rows and (for models that train on them) padded request lists; and the item state has the same keys in
    training and serving."""
    torch.manual_seed(0)
    model = create_model(name, small_data.schema, without_dropout(name)).train()
    rows = small_data.train.subset(np.arange(64)).to_tensors()
    lists = [list_batch(model, small_data, cascade)] if "listwise" in model.training_modes else []
    for batch in (rows, *lists):
        trained = model(batch).logits
        with torch.no_grad():
            mask = batch.get("mask")
            stages = model.score(model.encode_user(model.user_inputs(batch)), model.encode_item_lists(model.item_inputs(batch)),
                                 None if mask is None else mask.bool())
        torch.testing.assert_close(trained.detach(), stages, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        training_keys = set(model.encode_items(model.item_inputs(rows)))
        serving_keys = set(model.eval().encode_items(model.item_inputs(rows)))
    assert training_keys == serving_keys


@pytest.mark.parametrize("name", MODELS)
def test_one_optimisation_step_in_every_declared_training_mode(name, small_data, cascade):
    """Each mode the model declares (`training_modes`), each phase of its training plan: the loss the
    trainer builds is finite and one Adam step moves that phase's parameters and no others."""
    for mode in REGISTRY[name].training_modes:
        torch.manual_seed(0)
        model = create_model(name, small_data.schema, SMALL.get(name, {})).train()
        config = TrainConfig(epochs=1, batch_size=32, lr=1e-2, progress=False)
        if mode == "pointwise":
            batch, trainer = small_data.train.subset(np.arange(64)).to_tensors(), Trainer(model, config)
            loss_of = trainer.loss
        else:
            hybrid = NO_HYBRID if model.list_objective == "own" else HybridLossConfig()
            batch, trainer = list_batch(model, small_data, cascade), ListwiseTrainer(model, config, hybrid)
            loss_of = trainer.list_loss
        for phase in model.training_phases():
            with model.training_phase(phase):
                trainable = [p for p in model.parameters() if p.requires_grad]
                before = {n: p.detach().clone() for n, p in model.named_parameters()}
                loss, _ = loss_of(batch)
                assert torch.isfinite(loss), (mode, phase.name)
                optimizer = torch.optim.Adam(trainable, lr=1e-2)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
                chosen = {n for n, p in model.named_parameters() if any(p is q for q in trainable)}
            assert moved and moved <= chosen, (mode, phase.name, sorted(moved - chosen))


@pytest.mark.parametrize("name", MODELS)
def test_config_round_trip_through_yaml(name, small_data):
    """YAML -> config -> model -> YAML: the written options rebuild the same config and the same model shapes."""
    model = build(name, small_data.schema)
    written = yaml.safe_dump(config_to_dict(model.config))
    rebuilt = create_model(name, small_data.schema, yaml.safe_load(written))
    assert config_to_dict(rebuilt.config) == config_to_dict(model.config)
    assert yaml.safe_dump(config_to_dict(rebuilt.config)) == written
    assert {n: p.shape for n, p in rebuilt.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_round_trip(name, small_data, small_batch, tmp_path):
    """A trained step saved and loaded: the same class, config, weights (buffers too) and scores."""
    batch, _ = small_batch
    model = build(name, small_data.schema).train()
    rows = small_data.train.subset(np.arange(64)).to_tensors()
    model(rows)  # training-mode side effects (batch-norm statistics, step counters, codebooks) must survive too
    model.eval()
    save_checkpoint(tmp_path / "checkpoint.pt", model, extra={"note": "round trip"})
    loaded, payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert type(loaded) is type(model) and payload["extra"]["note"] == "round trip"
    assert config_to_dict(loaded.config) == config_to_dict(model.config)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, atol=0, rtol=0, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(batch).logits, model(batch).logits, atol=0, rtol=0)


def test_a_checkpoint_of_another_format_is_a_clear_error(small_data, tmp_path):
    save_checkpoint(tmp_path / "checkpoint.pt", build("two_tower", small_data.schema))
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.save({**payload, "format_version": 1}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"old\.pt: checkpoint format 1, this prerank reads format 2; retrain"):
        load_checkpoint(tmp_path / "old.pt")
