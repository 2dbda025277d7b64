"""Evaluation metrics of the pre-ranking papers.

Pointwise: AUC, GAUC (per-user AUC weighted by impressions, as in DIN and COLD), log loss,
RelaImpr (DIN: ((AUC_model - 0.5) / (AUC_base - 0.5) - 1) * 100%).
Listwise, over per-request candidate lists: Recall@K and NDCG@K with graded relevance.
Unified two-level architectures: UPQE (LT-TTD), in the proposed form of the design notes (below).
All take numpy arrays; the tests check them against scikit-learn and hand-computed cases.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores differ in length: {labels.shape[0]} vs {scores.shape[0]}")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    return labels, scores


def auc(labels, scores) -> float:
    """Area under the ROC curve via the rank-sum statistic; ties get half credit."""
    labels, scores = _check(labels, scores)
    n_pos = labels.sum()
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    ranks = rankdata(scores)
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gauc(labels, scores, groups) -> float:
    """Impression-weighted mean of per-group AUC over groups that have both classes."""
    labels, scores = _check(labels, scores)
    groups = np.asarray(groups).reshape(-1)
    order = np.argsort(groups, kind="stable")
    labels, scores, groups = labels[order], scores[order], groups[order]
    bounds = np.r_[0, np.flatnonzero(groups[1:] != groups[:-1]) + 1, len(groups)]
    total, weight = 0.0, 0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        group_labels = labels[lo:hi]
        positives = group_labels.sum()
        if 0 < positives < hi - lo:
            total += (hi - lo) * auc(group_labels, scores[lo:hi])
            weight += hi - lo
    if weight == 0:
        raise ValueError("GAUC needs at least one group with both positive and negative labels")
    return float(total / weight)


def logloss(labels, probabilities, eps: float = 1e-7) -> float:
    labels, probabilities = _check(labels, probabilities)
    p = np.clip(probabilities, eps, 1 - eps)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def rela_impr(auc_model: float, auc_base: float) -> float:
    """RelaImpr in percent."""
    if auc_base == 0.5:
        raise ValueError("RelaImpr is undefined for a base AUC of 0.5")
    return ((auc_model - 0.5) / (auc_base - 0.5) - 1.0) * 100.0


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores per row, best first (ties broken by position)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _check_lists(scores, relevance, mask):
    scores = np.asarray(scores)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)  # float32 scores stay float32: the same order, half the memory
    relevance = np.asarray(relevance, dtype=np.float64)
    if scores.ndim != 2 or scores.shape != relevance.shape:
        raise ValueError(f"scores and relevance must be [requests, candidates] of one shape: {scores.shape} vs {relevance.shape}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        scores = np.where(mask, scores, -np.inf)
        relevance = np.where(mask, relevance, 0.0)
    return scores, relevance


def ranking_metrics(scores, relevance, ks=(10,), mask=None) -> dict[str, np.ndarray]:
    """Per request [R]: "recall@k" and "ndcg@k" (`top_k_metrics`) for every k of `ks`, from one
    top-max(ks) of the scores [R, N] with relevance [R, N]; `mask` [R, N] drops candidates."""
    scores, relevance = _check_lists(scores, relevance, mask)
    top = _topk(scores, max(ks))
    width = top.shape[1]
    # The ideal list: the largest relevances, found without sorting every candidate.
    ideal = np.partition(-relevance, width - 1, axis=1)[:, :width] if width < relevance.shape[1] else -relevance
    return top_k_metrics(np.take_along_axis(relevance, top, axis=1), -np.sort(ideal, axis=1),
                         (relevance > 0).sum(1), ks)


def top_k_metrics(top_relevance, ideal_relevance, n_relevant, ks=(10,)) -> dict[str, np.ndarray]:
    """Per request [R]: "recall@k" = |top-k ∩ relevant| / |relevant| (relevance > 0) and "ndcg@k"
    with gains 2^rel - 1 and discount log2(rank + 1), for every k of `ks`; NaN for a request
    without a relevant item.

    `top_relevance` [R, K]: the relevance of each request's K best-scored candidates, best first;
    `ideal_relevance` [R, K]: its K largest relevances, largest first (zero-padded); `n_relevant`
    [R]: how many of its candidates are relevant. A k above K reads as K (the list is shorter)."""
    top_relevance = np.asarray(top_relevance, dtype=np.float64)
    ideal_relevance = np.asarray(ideal_relevance, dtype=np.float64)
    n_relevant = np.asarray(n_relevant)
    width = top_relevance.shape[1]
    if ideal_relevance.shape != top_relevance.shape or n_relevant.shape != top_relevance.shape[:1]:
        raise ValueError(f"top [R, K] {top_relevance.shape}, ideal [R, K] {ideal_relevance.shape} and "
                         f"n_relevant [R] {n_relevant.shape} disagree")
    discounts = 1.0 / np.log2(np.arange(2, width + 2))
    hits = np.cumsum(top_relevance > 0, axis=1)
    dcg = np.cumsum((np.power(2.0, top_relevance) - 1.0) * discounts, axis=1)
    ideal = np.cumsum((np.power(2.0, ideal_relevance) - 1.0) * discounts, axis=1)
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for k in ks:
            last = min(k, width) - 1
            out[f"recall@{k}"] = np.where(n_relevant > 0, hits[:, last] / n_relevant, np.nan)
            out[f"ndcg@{k}"] = np.where(ideal[:, last] > 0, dcg[:, last] / ideal[:, last], np.nan)
    return out


def _mean_over_relevant(values: np.ndarray, name: str) -> float:
    kept = values[~np.isnan(values)]
    if not len(kept):
        raise ValueError(f"{name} needs at least one request with a relevant item")
    return float(kept.mean())


def recall_at_k(scores, relevance, k: int, mask=None) -> float:
    """Mean over requests with any relevant item of |top-k ∩ relevant| / |relevant| (relevance > 0)."""
    return _mean_over_relevant(ranking_metrics(scores, relevance, (k,), mask)[f"recall@{k}"], "Recall@K")


def ndcg_at_k(scores, relevance, k: int, mask=None) -> float:
    """Mean NDCG@K with gains 2^rel - 1 and discount log2(rank + 1), over requests with any gain."""
    return _mean_over_relevant(ranking_metrics(scores, relevance, (k,), mask)[f"ndcg@{k}"], "NDCG@K")


def pointwise_report(labels, probabilities, groups) -> dict[str, float]:
    return {
        "auc": auc(labels, probabilities),
        "gauc": gauc(labels, probabilities, groups),
        "logloss": logloss(labels, probabilities),
        "rows": int(len(np.asarray(labels).reshape(-1))),
    }


def upqe(retrieval_recall: float, ranking_ndcg: float, latency_ms: float, latency_ref_ms: float = 5.0,
         weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)) -> float:
    """UPQE, the Unified Performance-Quality-Efficiency metric of LT-TTD (Abraich, arXiv 2505.04434).

    The paper's formula is not public; this is the design notes' proposal (§3.3, [I]), the
    weighted geometric mean of the three qualities the abstract names:

        UPQE = RetQ^w1 * RankQ^w2 * Eff^w3,   w1 + w2 + w3 = 1
        RetQ = recall of the relevant items surviving the retrieval (two-tower) stage
        RankQ = NDCG@k of the final list
        Eff = 1 / (1 + latency / latency_ref)      (1 at zero cost, 1/2 at the reference latency)

    `latency_ref_ms` 5 ms stands for the pre-ranking budget of a few milliseconds. Report the three
    inputs beside it (`upqe_report`): the product hides which one moved.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (3,) or (w < 0).any() or not np.isclose(w.sum(), 1.0):
        raise ValueError(f"UPQE weights must be three non-negative numbers summing to 1, got {tuple(weights)}")
    for name, value in (("retrieval_recall", retrieval_recall), ("ranking_ndcg", ranking_ndcg)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"UPQE {name} must lie in [0, 1], got {value}")
    if latency_ms < 0 or latency_ref_ms <= 0:
        raise ValueError(f"UPQE needs latency >= 0 and latency_ref > 0, got {latency_ms} and {latency_ref_ms}")
    efficiency = 1.0 / (1.0 + latency_ms / latency_ref_ms)
    return float(retrieval_recall ** w[0] * ranking_ndcg ** w[1] * efficiency ** w[2])


def upqe_report(retrieval_recall: float, ranking_ndcg: float, latency_ms: float, latency_ref_ms: float = 5.0,
                weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)) -> dict[str, float]:
    """UPQE with its inputs, each reported on its own."""
    return {"upqe": upqe(retrieval_recall, ranking_ndcg, latency_ms, latency_ref_ms, weights),
            "upqe_retrieval_recall": float(retrieval_recall), "upqe_ranking_ndcg": float(ranking_ndcg),
            "upqe_latency_ms": float(latency_ms), "upqe_efficiency": 1.0 / (1.0 + latency_ms / latency_ref_ms),
            "upqe_latency_ref_ms": float(latency_ref_ms)}
