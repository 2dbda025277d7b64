"""One training run end to end: model from the registry, fit, evaluate, write metrics.json."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prerank.atomic import write_json_atomic
from prerank.cascade import Cascade, check_cascade_matches
from prerank.data.table import PreparedData
from prerank.models.base import PreRankModel, config_to_dict, create_model
from prerank.train import distributed
from prerank.train.checkpoint import save_checkpoint
from prerank.train.listwise import ListwiseTrainer, evaluate_lists
from prerank.train.losses import HybridLossConfig
from prerank.train.two_stage import NO_HYBRID, fit_disjoint, two_stage_report
from prerank.train.trainer import Trainer, TrainConfig, evaluate, seed_everything


def run_training(
    data: PreparedData,
    model_name: str,
    train_config: TrainConfig,
    model_overrides: dict | None = None,
    out_dir: Path | None = None,
    data_source: dict | None = None,
    cascade: Cascade | None = None,
    hybrid: HybridLossConfig | None = None,
) -> dict:
    """Train `model_name` on `data`, evaluate the best epoch on validation and test, and return
    (and, with `out_dir`, write) the metrics. `data_source` records how to reload the data.

    With a `cascade` (built on the same data by `prerank cascade build`), the model trains on its
    request lists with the hybrid loss (`hybrid`, see `prerank.train.listwise`), early-stops on
    validation NDCG@10, and the metrics add the test lists' Recall@K / NDCG@K."""
    return train_and_evaluate(data, model_name, train_config, model_overrides, out_dir, data_source, cascade, hybrid)[0]


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
    """`run_training` that also returns the trained model (best epoch)."""
    seed_everything(train_config.seed)  # the initial weights too follow the seed (and agree across ranks)
    model = create_model(model_name, data.schema, model_overrides)
    extra = {"data_source": data_source or {}, "data_meta": data.meta, "train_config": train_config.__dict__}
    if cascade is None:
        trainer = Trainer(model, train_config)
        trainer.fit(data.train, data.valid, out_dir=out_dir, checkpoint_extra=extra)
    else:
        check_cascade_matches(cascade, data)
        if getattr(model, "own_list_objective", False) and hybrid is None:
            # LT-TTD brings its own list losses (auxiliary); the hybrid loss is added only on request.
            hybrid = NO_HYBRID
        if getattr(model.config, "mode", None) == "disjoint":
            # LT-TTD's disjoint baseline: the two-tower alone, frozen, then the transformer.
            _, trainer = fit_disjoint(model, train_config, data, cascade.lists("train"), cascade.lists("valid"), out_dir)
        else:
            trainer = ListwiseTrainer(model, train_config, hybrid)
            trainer.fit_lists(data, cascade.lists("train"), cascade.lists("valid"), out_dir=out_dir)
        if out_dir is not None and distributed.context().is_main:
            extra.update(epoch=trainer.best_epoch, valid_ndcg10=trainer.best_valid, cascade=cascade.meta,
                         hybrid_loss=asdict(trainer.loss_config))
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
        "rows_per_second": trainer.rows_per_second,
        "train_rows": len(data.train),
        "num_parameters": model.num_parameters(),
        "model_config": config_to_dict(model.config),
        "history": [h.__dict__ for h in trainer.history],
    }
    if data.meta.get("ranking_eval"):
        # Implicit-feedback datasets are judged by top-K over candidate sets (see train/ranking.py).
        from prerank.train.ranking import ranking_report

        spec = data.meta["ranking_eval"]
        metrics["test_ranking"] = {
            str(c): ranking_report(model, data, "test", tuple(spec.get("ks", (10, 20))), c, seed=train_config.seed)
            for c in spec.get("candidates", ("full",))
        }
    if cascade is not None:
        metrics["objective"] = {"hybrid": asdict(trainer.loss_config), "cascade": cascade.meta}
        metrics["test_lists"] = evaluate_lists(model, data, cascade.lists("test"))
        if hasattr(model, "two_tower_logits"):
            # A two-level model (LT-TTD): its two-tower stage, the pipeline's final list and UPQE.
            metrics["test_two_stage"] = two_stage_report(model, data, cascade.lists("test"))
    if data.meta.get("note"):
        metrics["note"] = data.meta["note"]
    if out_dir is not None and distributed.context().is_main:
        write_json_atomic(Path(out_dir) / "metrics.json", metrics)
    return metrics, model
