"""LT-TTD's two training modes' disjoint half, and its two-level evaluation.

`fit_disjoint` is the baseline the LT-TTD paper's claim is measured against: train the two-tower
encoder (TTE) alone on its retrieval loss, freeze it, then train the listwise transformer (LT).
Both phases are ordinary `ListwiseTrainer.fit_lists` runs with a zero hybrid loss (the model's own
losses come from `auxiliary_losses`); the model's `training_stage` tells `score` and the losses
which part is being trained. Phase 1 early-stops on the TTE's validation NDCG@10 (in that phase
`score` is the TTE), phase 2 on the LT's.

`two_stage_report` evaluates the model as a two-level pipeline on cascade lists: the TTE scores
every candidate of a request, its top `k` survive, the LT scores the survivors in one call. It
reports the TTE stage (Recall@k of the relevant items surviving it, and its own NDCG), the final
list of the pipeline (Recall/NDCG at K <= k: items dropped by the TTE are not in it), the LT run
over the whole list, and the per-request serving latency of each path.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from prerank.cascade import CascadeLists
from prerank.data.table import PreparedData
from prerank.metrics import ndcg_at_k, recall_at_k, upqe_report
from prerank.models.base import PreRankModel, gather_items
from prerank.train.listwise import ListwiseTrainer, list_report, score_lists
from prerank.train.losses import HybridLossConfig
from prerank.train.trainer import TrainConfig

NO_HYBRID = HybridLossConfig(distill_weight=0.0, fine_weight=0.0, coarse_weight=0.0)


def fit_disjoint(model: PreRankModel, config: TrainConfig, data: PreparedData, train: CascadeLists, valid: CascadeLists,
                 out_dir: Path | None = None) -> tuple[ListwiseTrainer, ListwiseTrainer]:
    """Phase 1: the TTE alone on L_ret. Phase 2: the TTE frozen, the LT (and the residual
    extractors, which feed only the LT) on L_rank (+ lambda_KD w_up L_up). Returns both trainers."""
    trainable = {p: p.requires_grad for p in model.parameters()}
    frozen = [p for p in model.two_tower_parameters() if trainable[p]]
    tte = {id(p) for p in frozen}
    rest = [p for p in model.parameters() if id(p) not in tte and trainable[p]]
    try:
        # Each phase freezes what it does not train, so the optimiser (and DDP, which expects a
        # gradient for every trainable parameter) sees only that phase's parameters.
        for p in rest:
            p.requires_grad_(False)
        model.training_stage = "two_tower"
        first = ListwiseTrainer(model, config, NO_HYBRID)
        first.fit_lists(data, train, valid, out_dir=Path(out_dir) / "phase1_two_tower" if out_dir else None)
        for p in rest:
            p.requires_grad_(True)
        for p in frozen:
            p.requires_grad_(False)
        model.training_stage = "transformer"
        second = ListwiseTrainer(model, config, NO_HYBRID)
        second.fit_lists(data, train, valid, out_dir=Path(out_dir) / "phase2_transformer" if out_dir else None)
    finally:
        model.training_stage = "both"
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    return first, second


@torch.no_grad()
def score_two_stage(model: PreRankModel, data: PreparedData, lists: CascadeLists, k: int,
                    batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(TTE logits [R, N] over every candidate, pipeline scores [R, N]: the LT's score for the TTE's
    top-k survivors, -inf for the dropped candidates and the padding)."""
    was_training = model.training
    model.eval()
    table = model.encode_catalogue(data.items.to_tensors())
    users = data.splits[lists.split].subset(lists.source_rows).to_tensors()
    tte_out, final_out = [], []
    for lo in range(0, len(lists), batch_size):
        user_state = model.encode_user({f.name: users[f.name][lo : lo + batch_size] for f in model.schema.user_features})
        rows = torch.from_numpy(lists.item_rows[lo : lo + batch_size])
        mask = torch.from_numpy(lists.mask[lo : lo + batch_size])
        tte = model.two_tower_logits(user_state, gather_items(table, rows)).masked_fill(~mask, float("-inf"))
        top = tte.topk(min(k, tte.shape[1]), dim=1).indices
        survivors = mask.gather(1, top)
        lt = model.score(user_state, gather_items(table, rows.gather(1, top)), mask=survivors)
        final = torch.full_like(tte, float("-inf")).scatter(1, top, lt.masked_fill(~survivors, float("-inf")))
        tte_out.append(tte.float().numpy())
        final_out.append(final.float().numpy())
    model.train(was_training)
    return np.concatenate(tte_out), np.concatenate(final_out)


@torch.no_grad()
def request_latency_ms(model: PreRankModel, data: PreparedData, lists: CascadeLists, two_stage_k: int | None = None,
                       requests: int = 100, repeats: int = 3) -> float:
    """Median wall time of serving one request (its user stage and its whole candidate list, item
    states precomputed): `score` over the list, or with `two_stage_k` the TTE over the list, its
    top-k, and the LT over the survivors. Single-request calls, the caller's thread setting."""
    model.eval()
    table = model.encode_catalogue(data.items.to_tensors())
    users = data.splits[lists.split].subset(lists.source_rows).to_tensors()
    times = []
    for r in range(min(requests, len(lists))):
        valid = int(lists.mask[r].sum())
        rows = torch.from_numpy(lists.item_rows[r : r + 1, :valid])
        user = {f.name: users[f.name][r : r + 1] for f in model.schema.user_features}
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            user_state = model.encode_user(user)
            items = gather_items(table, rows)
            if two_stage_k is None:
                model.score(user_state, items)
            else:
                top = model.two_tower_logits(user_state, items).topk(min(two_stage_k, valid), dim=1).indices
                model.score(user_state, gather_items(table, rows.gather(1, top)))
            best = min(best, time.perf_counter() - started)
        times.append(best * 1e3)
    return float(statistics.median(times))


def relevant_of(lists: CascadeLists) -> np.ndarray:
    """The graded relevance of the real positive interactions (as `list_report` counts them)."""
    return np.where(lists.label > 0, lists.relevance, 0).astype(np.float64)


def two_stage_report(model: PreRankModel, data: PreparedData, lists: CascadeLists, k: int = 50,
                     final_ks: tuple[int, ...] = (10,), latency_ref_ms: float = 5.0, latency_requests: int = 100) -> dict:
    """The LT-TTD pipeline on cascade lists (module docstring); UPQE from TTE Recall@k, the pipeline's
    NDCG at the first of `final_ks` and its per-request latency."""
    if any(kk > k for kk in final_ks):
        raise ValueError(f"final-list cut-offs {final_ks} must be <= the two-tower stage's k = {k}")
    real = relevant_of(lists)
    tte, final = score_two_stage(model, data, lists, k)
    report = {"two_tower_k": k,
              f"tte_recall@{k}": recall_at_k(tte, real, k, lists.mask),
              "tte_ndcg@10": ndcg_at_k(tte, real, 10, lists.mask)}
    for kk in final_ks:
        report[f"pipeline_recall@{kk}"] = recall_at_k(final, real, kk, lists.mask)
        report[f"pipeline_ndcg@{kk}"] = ndcg_at_k(final, real, kk, lists.mask)
    report["full_list"] = list_report(score_lists(model, data, lists), lists)
    report["latency_ms_full_list"] = request_latency_ms(model, data, lists, None, latency_requests)
    report["latency_ms_pipeline"] = request_latency_ms(model, data, lists, k, latency_requests)
    report.update(upqe_report(report[f"tte_recall@{k}"], report[f"pipeline_ndcg@{final_ks[0]}"], report["latency_ms_pipeline"],
                              latency_ref_ms))
    report["upqe_ndcg_k"] = final_ks[0]
    return report


def single_stage_report(model: PreRankModel, data: PreparedData, lists: CascadeLists, k: int = 50,
                        latency_ref_ms: float = 5.0, latency_requests: int = 100) -> dict:
    """The same UPQE inputs for a one-stage pre-ranker: its own top-k recall is its retrieval
    quality, its own NDCG@10 the final list, its `score` over the list the latency."""
    lists_report = list_report(score_lists(model, data, lists), lists)
    latency = request_latency_ms(model, data, lists, None, latency_requests)
    return {"two_tower_k": k, "full_list": lists_report, "latency_ms_full_list": latency,
            **upqe_report(lists_report[f"recall@{k}"], lists_report["ndcg@10"], latency, latency_ref_ms)}
