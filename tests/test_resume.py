"""Resuming an interrupted training (`TrainConfig.resume`) ends as the uninterrupted run: on cascade
lists (the listwise trainer) and across the phases of a multi-phase plan."""

import dataclasses

import pytest
import torch

import prerank.train.listwise as listwise_module
from prerank.cascade import CascadeConfig, build_cascade
from prerank.models import create_model
from prerank.train.listwise import ListwiseTrainer
from prerank.train.trainer import RESUME_FILE, Trainer, TrainConfig, fit_plan
from tests.test_contract import SMALL


@pytest.fixture(scope="module")
def cascade(small_data):
    torch.manual_seed(2)
    teacher = create_model("din", small_data.schema, {"hidden": [8], "attention_hidden": [4]}).eval()
    return build_cascade(small_data, teacher, CascadeConfig(retrieval_size=16, random_items=4, prerank_size=6,
                                                             exposure_size=3, window=4))


def interrupt_at_call(monkeypatch, module, name: str, call: int) -> None:
    real, calls = getattr(module, name), []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def count_calls(monkeypatch, module, name: str) -> list:
    real, calls = getattr(module, name), []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_listwise_training_resumes_to_the_uninterrupted_result(small_data, cascade, tmp_path, monkeypatch):
    config = TrainConfig(epochs=4, patience=4, batch_size=8, lr=3e-3, seed=5, progress=False)

    def run(out, resume=False):
        torch.manual_seed(11)
        model = create_model("two_tower", small_data.schema, {"hidden": [16, 8], "batch_norm": False, "dropout": 0.2})
        trainer = ListwiseTrainer(model, dataclasses.replace(config, resume=resume))
        trainer.fit_lists(small_data, cascade.lists("train"), cascade.lists("valid"), out_dir=out)
        return model, trainer

    whole, whole_trainer = run(tmp_path / "whole")
    interrupt_at_call(monkeypatch, listwise_module, "evaluate_lists", 3)  # in epoch 3's validation
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    monkeypatch.undo()
    assert torch.load(tmp_path / "cut" / RESUME_FILE, weights_only=False)["epoch"] == 2
    validations = count_calls(monkeypatch, listwise_module, "evaluate_lists")
    resumed, resumed_trainer = run(tmp_path / "cut", resume=True)
    assert len(validations) == 2  # epochs 3 and 4 only: the first two were not run again
    assert same_weights(whole, resumed)
    assert [h.train_loss for h in whole_trainer.history] == [h.train_loss for h in resumed_trainer.history]
    assert (whole_trainer.best_epoch, whole_trainer.best_valid) == (resumed_trainer.best_epoch, resumed_trainer.best_valid)


def test_a_multi_phase_plan_resumes_in_its_second_phase(small_data, tmp_path, monkeypatch):
    import prerank.train.trainer as trainer_module

    config = TrainConfig(epochs=2, patience=2, batch_size=64, seed=3, progress=False)

    def run(out, resume=False):
        torch.manual_seed(0)
        model = create_model("lttd", small_data.schema, {**SMALL["lttd"], "mode": "disjoint"})

        def fit_phase(phase_dir):
            trainer = Trainer(model, dataclasses.replace(config, resume=resume))
            trainer.fit(small_data.train, small_data.valid, out_dir=phase_dir)
            return trainer

        fit_plan(model, fit_phase, out)
        return model

    whole = run(tmp_path / "whole")
    interrupt_at_call(monkeypatch, trainer_module, "auc", 4)  # phase 2, epoch 2
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    monkeypatch.undo()
    phases = sorted(p.name for p in (tmp_path / "cut").iterdir())
    assert phases == ["phase1_two_tower", "phase2_transformer"]
    assert torch.load(tmp_path / "cut" / phases[0] / RESUME_FILE, weights_only=False)["finished"]
    validations = count_calls(monkeypatch, trainer_module, "auc")
    assert same_weights(whole, run(tmp_path / "cut", resume=True))
    assert len(validations) == 1  # phase 1 was complete; phase 2 ran its epoch 2 only
