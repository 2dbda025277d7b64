"""Listwise (full-stage) training and evaluation on cascade requests, beside the pointwise loop.

A batch is `batch_size` requests: the user features of each request ([B, ...], from the split's
sample table) and the item features of its candidate list ([B, N, ...], gathered from the
catalogue), so the model runs its ordinary `forward` along the N axis. The objective is
`prerank.train.losses.hybrid_loss` (plus the model's auxiliary losses); early stopping keeps the
epoch with the best validation NDCG@10 against the real interactions.

Evaluation scores each request's whole candidate list through the serving path (catalogue
item-state table, `gather_items`, `encode_user`, `score`) and reports Recall@K and NDCG@K against
the real positive interactions (graded by the cascade's relevance) and against the teacher's
top-K of the same list (agreement with the ranker).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from prerank.cascade import CascadeLists
from prerank.data.table import PreparedData
from prerank.metrics import ndcg_at_k, recall_at_k
from prerank.models.base import PreRankModel, gather_items
from prerank.train import distributed
from prerank.train.losses import HybridLossConfig, hybrid_loss
from prerank.train.trainer import EpochLog, Trainer, TrainConfig, seed_everything

KS = (10, 50, 100)
LIST_TARGETS = ("stage", "teacher", "relevance", "mask")


class ListBatches:
    """Tensors of one split's cascade lists, sliced into request batches."""

    def __init__(self, model: PreRankModel, data: PreparedData, lists: CascadeLists, device: torch.device) -> None:
        users = data.splits[lists.split].subset(lists.source_rows).to_tensors()
        self.user = {f.name: users[f.name].to(device) for f in model.schema.user_features}
        catalogue = data.items.to_tensors()
        self.catalogue = {f.name: catalogue[f.name].to(device) for f in model.schema.item_features}
        self.item_rows = torch.from_numpy(lists.item_rows).to(device)
        self.targets = {name: torch.from_numpy(getattr(lists, name)).to(device) for name in LIST_TARGETS}
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


@torch.no_grad()
def score_lists(model: PreRankModel, data: PreparedData, lists: CascadeLists, batch_size: int = 256) -> np.ndarray:
    """Logits [R, N] for every request's candidate list, through the serving path."""
    was_training = model.training
    model.eval()
    table = model.encode_catalogue(data.items.to_tensors())
    users = data.splits[lists.split].subset(lists.source_rows).to_tensors()
    out = []
    for lo in range(0, len(lists), batch_size):
        user_state = model.encode_user({f.name: users[f.name][lo : lo + batch_size] for f in model.schema.user_features})
        rows = torch.from_numpy(lists.item_rows[lo : lo + batch_size])
        # A listwise scorer mixes candidates inside `score`: it must not see the lists' padding.
        extra = {"mask": torch.from_numpy(lists.mask[lo : lo + batch_size])} if model.listwise else {}
        out.append(model.score(user_state, gather_items(table, rows), **extra).float().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, lists.item_rows.shape[1]), np.float32)


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
    """The trainer with the hybrid loss over cascade lists; `config.batch_size` counts requests."""

    def __init__(self, model: PreRankModel, config: TrainConfig, loss: HybridLossConfig | None = None) -> None:
        super().__init__(model, config)
        self.loss_config = loss or HybridLossConfig()
        self.best_valid_ndcg = -math.inf

    def list_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        output = self.network(batch)
        total, terms = hybrid_loss(output.logits, batch["stage"], batch["teacher"], batch["relevance"], batch["mask"], self.loss_config)
        terms = {**terms, **output.aux_losses}
        return total + sum(output.aux_losses.values(), torch.zeros((), device=total.device)), terms

    def fit_lists(self, data: PreparedData, train: CascadeLists, valid: CascadeLists, out_dir: Path | None = None) -> list[EpochLog]:
        c = self.config
        if c.num_threads:
            torch.set_num_threads(c.num_threads)
        seed_everything(c.seed)
        self.model.to(self.device)
        ctx = distributed.context()
        batch_size = distributed.per_rank_batch_size(c.batch_size, ctx)
        self.network = distributed.wrap(self.model, self.device, ctx)
        progress = c.progress and ctx.is_main
        source = ListBatches(self.model, data, train, self.device)
        optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=c.lr, weight_decay=c.weight_decay)
        generator = torch.Generator().manual_seed(c.seed)
        best_state = copy.deepcopy(self.model.state_dict())
        stale = 0
        for epoch in range(1, c.epochs + 1):
            self.model.train()
            started = time.perf_counter()
            total, count, term_totals = 0.0, 0, {}
            for batch in source.batches(batch_size, generator, ctx):
                loss, terms = self.list_loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if c.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
                optimizer.step()
                requests = len(batch["mask"])
                total += loss.item() * requests
                count += requests
                for name, value in terms.items():
                    term_totals[name] = term_totals.get(name, 0.0) + value.item() * requests
            seconds = time.perf_counter() - started
            if ctx.enabled:
                names = sorted(term_totals)
                total, count, *sums = distributed.sum_over_ranks([total, count, *(term_totals[k] for k in names)], ctx, self.device)
                term_totals = dict(zip(names, sums))
                distributed.broadcast_buffers(self.model, ctx)
            # Every rank scores all validation lists (they are few) with identical weights, so
            # early stopping agrees across ranks without a gather.
            valid_ndcg = evaluate_lists(self.model, data, valid, ks=(10,))["ndcg@10"]
            log = EpochLog(epoch, total / max(count, 1), valid_ndcg, seconds, count / seconds,
                           {k: v / max(count, 1) for k, v in term_totals.items()})
            self.history.append(log)
            if progress:
                print(f"epoch {epoch}: loss {log.train_loss:.4f}  valid NDCG@10 {valid_ndcg:.4f}  {seconds:.1f}s", flush=True)
            if valid_ndcg > self.best_valid_ndcg:
                self.best_valid_ndcg, self.best_epoch, stale = valid_ndcg, epoch, 0
                best_state = copy.deepcopy(self.model.state_dict())
            else:
                stale += 1
                if stale >= c.patience:
                    break
        self.model.load_state_dict(best_state)
        if out_dir is not None and ctx.is_main:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            # EpochLog.valid_auc holds the validation NDCG@10 in listwise runs.
            (Path(out_dir) / "history.json").write_text(json.dumps([asdict(h) for h in self.history], indent=2))
        return self.history
