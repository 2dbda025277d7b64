"""Listwise (full-stage) training and evaluation on cascade requests, beside the pointwise loop.

A batch is `batch_size` requests: the user features of each request ([B, ...], from the split's
sample table) and the item features of its candidate list ([B, N, ...], gathered from the
catalogue), so the model runs its ordinary `forward` along the N axis. The objective is
`prerank.train.losses.hybrid_loss` (plus the model's auxiliary losses); early stopping keeps the
epoch with the best validation NDCG@10 against the real interactions.

Evaluation scores each request's whole candidate list through the serving path
(`prerank.models.scoring`) and reports Recall@K and NDCG@K against
the real positive interactions (graded by the cascade's relevance) and against the teacher's
top-K of the same list (agreement with the ranker).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from prerank.cascade import CascadeLists
from prerank.data.table import PreparedData
from prerank.metrics import ndcg_at_k, recall_at_k
from prerank.models.base import PreRankModel
from prerank.models.scoring import item_table, score_requests
from prerank.train import distributed
from prerank.train.losses import HybridLossConfig, hybrid_loss
from prerank.train.trainer import EpochLog, Trainer, TrainConfig

KS = (10, 50, 100)


class ListBatches:
    """Tensors of one split's cascade lists, sliced into request batches."""

    def __init__(self, model: PreRankModel, data: PreparedData, lists: CascadeLists, device: torch.device) -> None:
        users = data.splits[lists.split].subset(lists.source_rows).to_tensors()
        self.user = {f.name: users[f.name].to(device) for f in model.schema.user_features}
        catalogue = data.items.to_tensors()
        self.catalogue = {f.name: catalogue[f.name].to(device) for f in model.schema.item_features}
        self.item_rows = torch.from_numpy(lists.item_rows).to(device)
        targets = {"stage": lists.stage, "teacher": lists.teacher, "relevance": lists.relevance, "mask": lists.mask}
        self.targets = {name: torch.from_numpy(values).to(device) for name, values in targets.items()}
        self.device = device

    def __len__(self) -> int:
        return len(self.item_rows)

    def batches(self, batch_size: int, generator: torch.Generator | None = None, shard: distributed.Context | None = None):
        """Batches of `batch_size` requests; with `shard`, this rank's share of the shuffled order
        (as `iterate_batches` does for sample rows)."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        if shard is not None:
            order = distributed.shard_order(order, shard)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size].to(self.device)
            item_rows = self.item_rows.index_select(0, rows)
            batch = {k: v.index_select(0, rows) for k, v in self.user.items()}
            batch.update({k: v[item_rows] for k, v in self.catalogue.items()})
            batch.update({k: v.index_select(0, rows) for k, v in self.targets.items()})
            yield batch


def score_lists(model: PreRankModel, data: PreparedData, lists: CascadeLists, batch_size: int = 256) -> np.ndarray:
    """Logits [R, N] for every request's candidate list, through the serving path (padding masked)."""
    users = data.splits[lists.split].subset(lists.source_rows).to_tensors()
    return score_requests(model, item_table(model, data.items.to_tensors()), users, lists.item_rows, lists.mask, batch_size)


def teacher_top_k(lists: CascadeLists, k: int) -> np.ndarray:
    """Relevance 1 for the teacher's top-k of each list (valid candidates only)."""
    teacher = np.where(lists.mask, lists.teacher, -np.inf)
    top = np.argsort(-teacher, axis=1, kind="stable")[:, :k]
    relevant = np.zeros(teacher.shape, np.float64)
    np.put_along_axis(relevant, top, 1.0, axis=1)
    return relevant * lists.mask


def list_report(scores: np.ndarray, lists: CascadeLists, ks=KS) -> dict[str, float]:
    """Recall@K / NDCG@K against the real positives (graded) and against the teacher's top-K."""
    real = np.where(lists.label > 0, lists.relevance, 0).astype(np.float64)
    report: dict[str, float] = {"requests": int(len(lists)), "mean_list_length": float(lists.mask.sum(1).mean())}
    for k in ks:
        report[f"recall@{k}"] = recall_at_k(scores, real, k, lists.mask)
        report[f"ndcg@{k}"] = ndcg_at_k(scores, real, k, lists.mask)
        teacher = teacher_top_k(lists, k)
        report[f"teacher_recall@{k}"] = recall_at_k(scores, teacher, k, lists.mask)
        report[f"teacher_ndcg@{k}"] = ndcg_at_k(scores, teacher, k, lists.mask)
    return report


def evaluate_lists(model: PreRankModel, data: PreparedData, lists: CascadeLists, ks=KS) -> dict[str, float]:
    return list_report(score_lists(model, data, lists), lists, ks)


class ListwiseTrainer(Trainer):
    """The trainer with the hybrid loss over cascade lists; `config.batch_size` counts requests.
    `EpochLog.valid_auc` holds the validation NDCG@10 in its history."""

    metric_name = "valid NDCG@10"

    def __init__(self, model: PreRankModel, config: TrainConfig, loss: HybridLossConfig | None = None) -> None:
        super().__init__(model, config)
        self.loss_config = loss or HybridLossConfig()

    def list_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        output = self.network(batch)
        total, terms = hybrid_loss(output.logits, batch["stage"], batch["teacher"], batch["relevance"], batch["mask"], self.loss_config)
        terms = {**terms, **output.aux_losses}
        return total + sum(output.aux_losses.values(), torch.zeros((), device=total.device)), terms

    def fit_lists(self, data: PreparedData, train: CascadeLists, valid: CascadeLists, out_dir: Path | None = None) -> list[EpochLog]:
        ctx, batch_size = self.prepare()
        source = ListBatches(self.model, data, train, self.device)

        def validate() -> float:
            # Every rank scores all validation lists (they are few) with identical weights and
            # rank 0's BatchNorm statistics, so early stopping agrees across ranks without a gather.
            distributed.broadcast_buffers(self.model, ctx)
            return evaluate_lists(self.model, data, valid, ks=(10,))["ndcg@10"]

        return self.run_epochs(lambda generator: source.batches(batch_size, generator, ctx), math.ceil(len(train) / self.config.batch_size),
                               self.list_loss, "mask", validate, ctx, out_dir=out_dir)
