"""Two-level models (`two_level = True`, e.g. LT-TTD) evaluated as a pipeline on cascade lists.

The model's `coarse_score` (its cheap first stage) scores every candidate of a request, its top `k`
survive, and the full `score` re-scores the survivors in one call. `two_stage_report` gives the
first stage (Recall@k of the relevant items surviving it, and its own NDCG), the pipeline's final
list (Recall/NDCG at K <= k: items dropped by the first stage are not in it), the full `score` run
over the whole list, and the per-request serving latency of each path (`prerank.latency`).
"""

from __future__ import annotations

import numpy as np
import torch

from prerank.cascade import CascadeLists
from prerank.data.table import PreparedData
from prerank.latency import time_request_stages
from prerank.metrics import ndcg_at_k, recall_at_k, upqe_report
from prerank.models.base import PreRankModel, State, gather_items
from prerank.models.scoring import item_table, score_requests, two_stage_scorer
from prerank.train.listwise import list_report, score_lists


def score_two_stage(model: PreRankModel, data: PreparedData, lists: CascadeLists, k: int,
                    batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(first-stage logits [R, N] over every candidate, pipeline scores [R, N]: the full score of
    the first stage's top-k survivors, -inf for the dropped candidates and the padding)."""
    coarse_parts: list[np.ndarray] = []
    pipeline = two_stage_scorer(k, lambda coarse: coarse_parts.append(coarse.float().cpu().numpy()))
    users = data.splits[lists.split].subset(lists.source_rows).to_tensors()
    final = score_requests(model, item_table(model, data.items.to_tensors()), users, lists.item_rows, lists.mask,
                           batch_size, pipeline)
    coarse = np.concatenate(coarse_parts) if coarse_parts else np.zeros_like(final)
    return coarse, final


@torch.no_grad()
def request_latency_ms(model: PreRankModel, data: PreparedData, lists: CascadeLists, two_stage_k: int | None = None,
                       requests: int = 100, warmup: int = 10) -> float:
    """Median wall time (ms) of serving one request, item states precomputed, timed by
    `prerank.latency`: its user stage and its whole candidate list, through `score`, or with
    `two_stage_k` the first stage over the list, its top-k and `score` over the survivors.
    Single-request calls, the caller's thread setting; the requests cycle over the first `requests`."""
    was_training = model.training
    model.eval()
    table = item_table(model, data.items.to_tensors())
    users = data.splits[lists.split].subset(lists.source_rows).to_tensors()
    count = min(requests, len(lists))
    row_lists = [torch.from_numpy(lists.item_rows[r : r + 1, : int(lists.mask[r].sum())]) for r in range(count)]

    def candidate_stage(i: int, user_state: State) -> None:
        rows = row_lists[i % count]
        items = gather_items(table, rows)
        if two_stage_k is not None:
            top = model.coarse_score(user_state, items).topk(min(two_stage_k, rows.shape[1]), dim=1).indices
            items = gather_items(table, rows.gather(1, top))
        model.score(user_state, items)

    timed = time_request_stages(lambda i: model.encode_user({f.name: users[f.name][i % count : i % count + 1]
                                                               for f in model.schema.user_features}),
                                candidate_stage, repeats=count, warmup=min(warmup, count))
    model.train(was_training)
    return timed["wall"]["total"]["p50_ms"]


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
