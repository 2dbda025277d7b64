"""One training run end to end: model from the registry, fit, evaluate, write metrics.json."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from prerank.atomic import write_json_atomic
from prerank.cascade import Cascade, check_cascade_matches
from prerank.data.table import PreparedData
from prerank.models.base import PreRankModel, config_to_dict, create_model
from prerank.train import distributed
from prerank.models.checkpoint import save_checkpoint
from prerank.train.listwise import ListwiseTrainer, evaluate_lists
from prerank.train.losses import NO_HYBRID, HybridLossConfig
from prerank.train.ranking import ranking_candidates, ranking_report
from prerank.train.two_stage import two_stage_report
from prerank.train.trainer import Trainer, TrainConfig, evaluate, fit_plan, seed_everything


def train_and_evaluate(
    data: PreparedData,
    model_name: str,
    train_config: TrainConfig,
    model_overrides: dict | None = None,
    out_dir: Path | None = None,
    data_source: dict | None = None,
    cascade: Cascade | None = None,
    hybrid: HybridLossConfig | None = None,
) -> tuple[dict, PreRankModel]:
    """Train `model_name` on `data`, evaluate the best epoch on validation and test, and return
    (and, with `out_dir`, write) the metrics. `data_source` records how to reload the data.

    With a `cascade` (built on the same data by `prerank cascade build`), the model trains on its
    request lists with the hybrid loss (`hybrid`, see `prerank.train.listwise`), early-stops on
    validation NDCG@10, and the metrics add the test lists' Recall@K / NDCG@K.

    Returns (metrics, the trained model at its best epoch); `run_training` returns the metrics alone."""
    seed_everything(train_config.seed)  # the initial weights too follow the seed (and agree across ranks)
    model = create_model(model_name, data.schema, model_overrides)
    mode = "pointwise" if cascade is None else "listwise"
    if mode not in model.training_modes:
        raise ValueError(f"model {model_name!r} trains on {' or '.join(model.training_modes)} data, not {mode} "
                         f"({'give --cascade' if cascade is None else 'drop --cascade'})")
    extra = {"data_source": data_source or {}, "data_meta": data.meta, "train_config": train_config.__dict__}
    history_context = {"protocol": data.meta.get("protocol"), "leaks_labels": data.meta.get("leaks_labels", False)}
    if cascade is None:
        def fit_phase(phase_dir: Path | None) -> Trainer:
            trainer = Trainer(model, train_config)
            trainer.history_context = history_context
            trainer.fit(data.train, data.valid, out_dir=phase_dir, checkpoint_extra=extra)
            return trainer
    else:
        check_cascade_matches(cascade, data)
        if hybrid is None and model.list_objective == "own":
            # A model whose auxiliary losses are its list objective gets the hybrid loss only on request.
            hybrid = NO_HYBRID
        train_lists, valid_lists = cascade.lists("train"), cascade.lists("valid")

        def fit_phase(phase_dir: Path | None) -> Trainer:
            trainer = ListwiseTrainer(model, train_config, hybrid)
            trainer.history_context = history_context
            trainer.fit_lists(data, train_lists, valid_lists, out_dir=phase_dir)
            return trainer
    phases = fit_plan(model, fit_phase, out_dir)
    trainer = phases[-1]
    if out_dir is not None and distributed.context().is_main and (cascade is not None or len(phases) > 1):
        extra.update(epoch=trainer.best_epoch, phases=[t.best_epoch for t in phases])
        if cascade is not None:
            extra.update(valid_ndcg10=trainer.best_valid, cascade=cascade.meta, hybrid_loss=asdict(trainer.loss_config))
        save_checkpoint(Path(out_dir) / "checkpoint.pt", model, extra=extra)
    metrics = {
        "model": model_name,
        "dataset": data.meta.get("dataset"),
        "dataset_label": data.meta.get("dataset_label"),
        "protocol": data.meta.get("protocol"),
        "leaks_labels": data.meta.get("leaks_labels", False),
        "seed": train_config.seed,
        "test": evaluate(model, data.test, device=train_config.device),
        "valid": evaluate(model, data.valid, device=train_config.device),
        "best_epoch": trainer.best_epoch,
        "epochs_run": len(trainer.history),
        "seconds_per_epoch": trainer.seconds_per_epoch,
        "cpu_seconds_per_epoch": trainer.cpu_seconds_per_epoch,
        "rows_per_second": trainer.rows_per_second,
        "train_rows": len(data.train),
        "num_parameters": model.num_parameters(),
        "model_config": config_to_dict(model.config),
        "history": [h.__dict__ for h in trainer.history],
    }
    spec = data.meta.get("ranking_eval")
    candidates = ranking_candidates(train_config.eval_candidates, spec.get("candidates", ["full"])) if spec else []
    if candidates:
        # Implicit-feedback datasets are judged by top-K over candidate sets (see train/ranking.py).
        started, cpu_started = time.perf_counter(), time.process_time()
        metrics["test_ranking"] = {
            str(c): ranking_report(model, data, "test", tuple(spec.get("ks", (10, 20))), c, seed=train_config.seed,
                                   progress=train_config.progress)
            for c in candidates
        }
        metrics["ranking_eval_seconds"] = time.perf_counter() - started
        metrics["ranking_eval_cpu_seconds"] = time.process_time() - cpu_started
    if cascade is not None:
        metrics["objective"] = {"hybrid": asdict(trainer.loss_config), "cascade": cascade.meta}
        metrics["test_lists"] = evaluate_lists(model, data, cascade.lists("test"))
        if model.two_level:
            # The first stage, the pipeline's final list and UPQE.
            metrics["test_two_stage"] = two_stage_report(model, data, cascade.lists("test"))
    if data.meta.get("note"):
        metrics["note"] = data.meta["note"]
    if out_dir is not None and distributed.context().is_main:
        write_json_atomic(Path(out_dir) / "metrics.json", metrics)
    return metrics, model


def run_training(*args, **kwargs) -> dict:
    """`train_and_evaluate`'s metrics alone (same arguments)."""
    return train_and_evaluate(*args, **kwargs)[0]
