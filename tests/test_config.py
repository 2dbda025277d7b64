"""Every configuration derives from one validated base (`prerank.config`): unknown keys, wrong types
and values out of range fail with an error naming the configuration and the field; the move of the
tower fields into `TowerConfig` left every model's defaults and size as they were."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import prerank.models
from prerank.benchmark import BenchmarkConfig, resolve_variant
from prerank.cascade import CascadeConfig
from prerank.config import ConfigError
from prerank.data.pipeline import ProtocolConfig
from prerank.models import REGISTRY, create_model
from prerank.models.base import config_to_dict, make_config
from prerank.run_config import variant_names
from prerank.train.losses import HybridLossConfig
from prerank.train.trainer import TrainConfig

# Each model's default config as it was before the tower fields moved into `TowerConfig` (DAT's last_relu
# since turned off on purpose: models/dat.py).
DEFAULTS = {
    "cold": {"hidden": (1024, 512, 256, 128, 64), "activation": "relu", "batch_norm": True, "dropout": 0.0, "se": "concat",
             "cross": "product", "groups": None, "linear_log": False, "linear_part": False, "embed_init_std": 0.01},
    "dat": {"hidden": (256, 128, 32), "activation": "relu", "batch_norm": False, "dropout": 0.0, "last_relu": False,
            "temperature": 0.05, "learn_temperature": True, "output_bias": True, "mimic_user_weight": 0.5,
            "mimic_item_weight": 0.5, "category_weight": 1.0, "category_feature": "auto", "multi_category": "first",
            "embed_init_std": 0.01},
    "din": {"hidden": (200, 80), "activation": "prelu", "dropout": 0.0, "attention_hidden": (80, 40),
            "attention_softmax": False, "crosses": True, "embed_init_std": 0.01},
    "fit": {"hidden": (300, 300, 128), "activation": "relu", "batch_norm": True, "dropout": 0.0, "embed_init_std": 0.01,
            "use_mqm": True, "num_meta": 16, "selection_features": (), "meta_init": "kaiming_uniform", "tau_start": 1.0,
            "tau_end": 0.001, "anneal_steps": 300, "tau_schedule": "exponential", "soft_selection": "query",
            "attention_hidden": (16,), "attention_activation": "prelu", "attention_softmax": False, "concat_query": True,
            "scorer": "lss", "user_heads": 4, "item_heads": 4, "head_dim": 32, "row_units": 8, "col_units": 8,
            "lss_activation": "relu", "fc_hidden": (64,), "normalize_heads": False, "temperature": 0.05},
    "inttower": {"hidden": (300, 300, 128), "activation": "relu", "batch_norm": True, "dropout": 0.1, "light_se": "both",
                 "light_se_bias": True, "fe_block": "output", "heads": 4, "head_dim": 64, "multi_layer": True,
                 "output_bias": False, "cir_weight": 0.0, "cir_temperature": 0.07, "embed_init_std": 0.01, "init_std": None},
    "lttd": {"dim": 64, "field_hidden": 64, "tower_hidden": (128,), "residual_dim": 16, "residual_hidden": (128,),
             "activation": "relu", "pooling": "attention", "similarity": "cosine", "temperature": 0.05,
             "learn_temperature": True, "embed_init_std": 0.01, "model_dim": 64, "layers": 2, "heads": 4,
             "feedforward": 128, "dropout": 0.1, "list_attention": True, "mode": "joint", "retrieval_weight": 1.0,
             "rank_weight": 1.0, "kd_weight": 0.5, "kd_down_weight": 1.0, "kd_up_weight": 0.25, "kd_temperature": 1.0,
             "retrieval_negatives": "list+batch", "retrieval_min_relevance": 3},
    "ranktower": {"heads": 4, "head_dim": 64, "hidden": (256,), "activation": "relu", "dropout": 0.1, "gate_scale": 2.0,
                  "attention_heads": 1, "symmetric_maxsim": False, "temperature": 0.1, "learn_bias": True,
                  "embed_init_std": 0.01},
    "tarq": {"hidden": (300, 300, 128), "activation": "relu", "batch_norm": True, "dropout": 0.0, "temperature": 0.05,
             "embed_init_std": 0.01, "levels": 3, "codebook_size": 64, "codebook_init": "kmeans", "kmeans_iterations": 10,
             "codebook_update": "ema", "ema_decay": 0.99, "codebook_weight": 1.0, "commitment_weight": 0.25,
             "dead_code_restart": True, "restart_after": 50, "attention_heads": 2, "share_attention": False,
             "teacher_query": "item_encoder", "teacher_head": "composed", "combine": "sum", "attention_weight": 1.0,
             "teacher_weight": 1.0, "distill_weight": 1.0, "align": True, "align_weight": 1.0, "align_rows": 256,
             "align_normalise": False, "align_temperature": 1.0, "item_encoder_hidden": (64,)},
    "two_tower": {"hidden": (300, 300, 128), "activation": "relu", "batch_norm": True, "dropout": 0.0, "similarity": "cosine",
                  "temperature": 0.05, "learn_temperature": True, "embed_init_std": 0.01},
}
# Each model's parameter count at its defaults on `small_data` (embedding dim 8), measured before the
# tower pair and the temperature moved into `prerank.models.layers`.
PARAMETERS = {"cold": 837329, "dat": 111226, "din": 37334, "fit": 316295, "inttower": 497900, "lttd": 126875,
              "ranktower": 200889, "tarq": 281006, "two_tower": 277206}


def test_every_model_is_recorded():
    assert sorted(DEFAULTS) == sorted(PARAMETERS) == sorted(REGISTRY)


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_default_config_is_unchanged(name):
    config = config_to_dict(make_config(name))
    # Keys added since (new options) may follow; every recorded default keeps its value.
    assert {key: config.get(key, "<missing>") for key in DEFAULTS[name]} == DEFAULTS[name]


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_default_parameter_count_is_unchanged(name, small_data):
    torch.manual_seed(0)
    assert create_model(name, small_data.schema).num_parameters() == PARAMETERS[name]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_config_round_trips_through_a_dict(name):
    config = make_config(name)
    assert make_config(name, config_to_dict(config)) == config


def test_tower_fields_are_flat_keys():
    # `--set hidden=[256,128]` and the @paper variants' overrides address inherited fields directly.
    config = make_config("fit", {"hidden": [256, 128], "batch_norm": False, "dropout": 0.2})
    assert (config.hidden, config.batch_norm, config.dropout) == ((256, 128), False, 0.2)
    for variant in variant_names():
        name, overrides, _ = resolve_variant(variant)
        config = make_config(name, overrides)
        assert all(getattr(config, key) == (tuple(value) if isinstance(value, list) else value)
                   for key, value in overrides.items()), variant


def test_no_model_imports_another_model():
    folder = Path(prerank.models.__file__).parent
    model_modules = {cls.__module__ for cls in REGISTRY.values() if cls.__module__.startswith("prerank.models.")}
    assert len(model_modules) >= 9
    for module in model_modules:
        path = folder / f"{module.rsplit('.', 1)[1]}.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prerank.models"):
                assert node.module not in model_modules, f"{path.name} imports the model module {node.module}"


# (model, overrides, what the error says after "bad config for model '<model>': ")
BAD_MODEL_CONFIGS = [
    ("two_tower", {"temperature": 0}, "temperature: Input should be greater than 0 (got 0)"),
    ("two_tower", {"hidden": [128, 0]}, "hidden[1]: Input should be greater than or equal to 1 (got 0)"),
    ("two_tower", {"hidden": []}, "hidden: Tuple should have at least 1 item"),
    ("dat", {"dropout": 1.5}, "dropout: Input should be less than 1 (got 1.5)"),
    ("dat", {"mimic_user_weight": -0.5}, "mimic_user_weight: Input should be greater than or equal to 0"),
    ("cold", {"groups": []}, "groups: Tuple should have at least 1 item"),
    ("din", {"activation": "swish"}, "activation: Input should be 'relu', 'prelu', 'gelu', 'tanh' or 'silu' (got 'swish')"),
    ("inttower", {"heads": 0}, "heads: Input should be greater than or equal to 1 (got 0)"),
    ("inttower", {"init_std": 0.0}, "init_std: Input should be greater than 0"),
    ("ranktower", {"attention_heads": 3}, "head_dim 64 must be divisible by attention_heads 3"),
    ("ranktower", {"temperature": -1}, "temperature: Input should be greater than 0"),
    ("lttd", {"kd_temperature": 0}, "kd_temperature: Input should be greater than 0"),
    ("lttd", {"heads": 3}, "model_dim 64 must be divisible by heads 3"),
    ("fit", {"tau_start": 0.1, "tau_end": 1.0}, "need tau_end <= tau_start"),
    ("fit", {"lss_activation": "swish"}, "lss_activation: Input should be"),
    ("tarq", {"ema_decay": 1.0}, "ema_decay: Input should be less than 1 (got 1.0)"),
    ("tarq", {"temperature": 0.0}, "temperature: Input should be greater than 0"),
]


@pytest.mark.parametrize("name, overrides, message", BAD_MODEL_CONFIGS)
def test_bad_model_config_names_the_model_and_field(name, overrides, message):
    with pytest.raises(ConfigError) as err:
        make_config(name, overrides)
    assert str(err.value).startswith(f"bad config for model {name!r}: ")
    assert message in str(err.value)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_model_config_rejects_unknown_keys_wrong_types_and_ranges(name):
    with pytest.raises(ConfigError, match=rf"bad config for model '{name}': hiden: unknown key; known keys: .*embed_init_std"):
        make_config(name, {"hiden": [8]})
    with pytest.raises(ConfigError, match=r"embed_init_std: Input should be a valid number.*\(got 'small'\)"):
        make_config(name, {"embed_init_std": "small"})
    with pytest.raises(ConfigError, match=r"embed_init_std: Input should be greater than 0 \(got 0\)"):
        make_config(name, {"embed_init_std": 0})
    if "dropout" in DEFAULTS[name]:
        with pytest.raises(ConfigError, match=r"dropout: Input should be less than 1 \(got 1\.5\)"):
            make_config(name, {"dropout": 1.5})


# (config class, keyword arguments, what the error says)
BAD_CONFIGS = [
    (TrainConfig, {"epochs": 0}, "bad TrainConfig: epochs: Input should be greater than or equal to 1 (got 0)"),
    (TrainConfig, {"batch_size": 0}, "bad TrainConfig: batch_size: Input should be greater than or equal to 1"),
    (TrainConfig, {"lr": 0.0}, "bad TrainConfig: lr: Input should be greater than 0 (got 0.0)"),
    (TrainConfig, {"patience": 0}, "bad TrainConfig: patience: Input should be greater than or equal to 1"),
    (TrainConfig, {"seed": -1}, "bad TrainConfig: seed: Input should be greater than or equal to 0"),
    (TrainConfig, {"max_grad_norm": 0}, "bad TrainConfig: max_grad_norm: Input should be greater than 0"),
    (TrainConfig, {"epoch": 3}, "bad TrainConfig: epoch: unknown key; known keys: epochs, batch_size"),
    (TrainConfig, {"epochs": "many"}, "bad TrainConfig: epochs: Input should be a valid integer"),
    (ProtocolConfig, {"name": "random"}, "bad ProtocolConfig: name: Input should be 'temporal', 'global_time', 'inttower' or 'leave_last_out'"),
    (ProtocolConfig, {"seq_len": -1}, "bad ProtocolConfig: seq_len: Input should be greater than or equal to 0 (got -1)"),
    (ProtocolConfig, {"valid_fraction": 1.0}, "bad ProtocolConfig: valid_fraction: Input should be less than 1"),
    (ProtocolConfig, {"valid_fraction": 0.5, "test_fraction": 0.5}, "valid_fraction + test_fraction must be < 1"),
    (ProtocolConfig, {"negatives": -2}, "bad ProtocolConfig: negatives: Input should be greater than or equal to 0"),
    (CascadeConfig, {"window": 0}, "bad CascadeConfig: window: Input should be greater than or equal to 1"),
    (CascadeConfig, {"random_items": -1}, "bad CascadeConfig: random_items: Input should be greater than or equal to 0"),
    (CascadeConfig, {"prerank_size": 5, "exposure_size": 10}, "exposure_size <= prerank_size <= retrieval_size, got 10, 5, 500"),
    (CascadeConfig, {"relevance_by_grade": []}, "bad CascadeConfig: relevance_by_grade: Tuple should have at least 1 item"),
    (CascadeConfig, {"retriever": "bm25"}, "bad CascadeConfig: retriever: Input should be 'itemcf' or 'model'"),
    (HybridLossConfig, {"teacher_temperature": 0}, "bad HybridLossConfig: teacher_temperature: Input should be greater than 0"),
    (HybridLossConfig, {"coarse_weight": -1}, "bad HybridLossConfig: coarse_weight: Input should be greater than or equal to 0"),
    (HybridLossConfig, {"fine_min_stage": 4}, "bad HybridLossConfig: fine_min_stage: Input should be less than or equal to 3"),
    (BenchmarkConfig, {"seeds": 0}, "bad BenchmarkConfig: seeds: Input should be greater than or equal to 1 (got 0)"),
    (BenchmarkConfig, {"models": ()}, "bad BenchmarkConfig: models: Tuple should have at least 1 item"),
    (BenchmarkConfig, {"protocol": "random"}, "bad BenchmarkConfig: protocol: Input should be 'temporal'"),
    (BenchmarkConfig, {"latency_repeats": 0}, "bad BenchmarkConfig: latency_repeats: Input should be greater than or equal to 1"),
]


@pytest.mark.parametrize("cls, kwargs, message", BAD_CONFIGS, ids=lambda v: getattr(v, "__name__", None))
def test_bad_config_names_the_config_and_field(cls, kwargs, message):
    with pytest.raises(ConfigError) as err:
        cls(**kwargs)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)  # the CLI turns ValueErrors into messages, not tracebacks


def test_assignment_and_replace_are_validated_too():
    config = TrainConfig()
    with pytest.raises(ConfigError, match="bad TrainConfig: epochs: Input should be greater than or equal to 1"):
        config.epochs = 0
    with pytest.raises(ConfigError, match="bad ProtocolConfig: seq_len"):
        dataclasses.replace(ProtocolConfig(), seq_len=-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ProtocolConfig().seq_len = 3  # the protocol is part of the preprocessing cache key


def test_validated_configs_keep_the_dataclass_interface():
    # Code reads configs through `__dict__` (cache keys, metrics.json), `asdict` and `__dataclass_fields__`.
    protocol = ProtocolConfig(seq_len=8)
    assert protocol.__dict__ == dataclasses.asdict(protocol)
    assert list(protocol.__dict__) == list(ProtocolConfig.__dataclass_fields__)  # no validator state in the cache key
    assert ProtocolConfig(**protocol.__dict__) == protocol
    assert list(HybridLossConfig.__dataclass_fields__) == [
        "distill_weight", "fine_weight", "coarse_weight", "teacher_temperature", "distill_min_stage", "fine_min_stage"]
    assert CascadeConfig(relevance_by_grade=[1, 2, 3]).relevance_by_grade == (1, 2, 3)
    assert dataclasses.replace(TrainConfig(), epochs=3).epochs == 3
