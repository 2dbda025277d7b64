"""Top-K evaluation over candidate sets, through the served scoring path.

One request per user of the evaluated split: the relevant items are that user's positive rows in
the split (relevance = the row's grade where grades are known and positive, else 1; the highest
grade when an item repeats); the user features are those of the user's earliest positive row
there, whose behaviour sequence holds only events before it. Scores come from the path a server
runs: `encode_catalogue` once, `encode_user` once per request, `gather_items` + `score` over the
candidates (the full catalogue as a broadcast view of the table, equal to gathering every row).

Candidates (`candidates`):
- ``"full"``: the whole catalogue. With `exclude_seen`, the items of the user's positive rows in
  the other splits are masked out unless they are relevant here (the usual full-ranking reading).
- an integer n: the relevant items plus n items drawn uniformly (seeded) among catalogue items
  with no logged row for the user in any split.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from prerank.data.table import GRADE, ITEM_ROW, LABEL, PreparedData
from prerank.metrics import ndcg_at_k, recall_at_k
from prerank.models.base import PreRankModel
from prerank.models.scoring import item_table, iter_request_scores


def _requests(data: PreparedData, split: str) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Per user with a positive in `split`: its earliest positive row, relevant catalogue rows, relevance."""
    table = data.splits[split]
    user_id = data.schema.user_id
    positive = np.flatnonzero(table[LABEL] > 0)
    if len(positive) == 0:
        raise ValueError(f"the {split} split has no positive rows to rank")
    grade = table[GRADE][positive].astype(np.float64) if GRADE in table.columns else np.full(len(positive), -1.0)
    frame = pd.DataFrame({"user": table[user_id][positive], "row": positive, "item": table[ITEM_ROW][positive],
                          "relevance": np.where(grade > 0, grade, 1.0)})
    first = frame.groupby("user", sort=True)["row"].min()
    best = frame.groupby(["user", "item"], sort=True)["relevance"].max().reset_index()
    grouped = best.groupby("user", sort=True)
    items = [g["item"].to_numpy() for _, g in grouped]
    relevance = [g["relevance"].to_numpy() for _, g in grouped]
    return first.to_numpy(), items, relevance


def _interacted(data: PreparedData, users: np.ndarray, splits: tuple[str, ...], positives_only: bool) -> dict:
    user_id = data.schema.user_id
    out: dict = {}
    wanted = set(users.tolist())
    for name in splits:
        t = data.splits[name]
        keep = t[LABEL] > 0 if positives_only else np.ones(len(t), dtype=bool)
        for user, item in zip(t[user_id][keep], t[ITEM_ROW][keep]):
            if user in wanted:
                out.setdefault(int(user), set()).add(int(item))
    return out


@torch.no_grad()
def ranking_report(
    model: PreRankModel,
    data: PreparedData,
    split: str = "test",
    ks: tuple[int, ...] = (10, 20),
    candidates: str | int = "full",
    exclude_seen: bool = True,
    seed: int = 0,
    max_scores_per_batch: int = 500_000,
) -> dict:
    """Recall@K and NDCG@K (metrics.recall_at_k / ndcg_at_k) averaged over the split's users."""
    table = data.splits[split]
    first_rows, relevant, relevance = _requests(data, split)
    user_id = data.schema.user_id
    users = table[user_id][first_rows]
    catalogue_state = item_table(model, data.items.to_tensors())
    n_items = len(data.item_raw_ids)
    user_tensors = table.subset(first_rows).to_tensors()
    full = candidates == "full"
    rows = None
    if not full:
        n_sampled = int(candidates)
        if n_sampled < 1:
            raise ValueError("candidates must be 'full' or a positive number of sampled items")
        rng = np.random.default_rng(seed)
        touched = _interacted(data, users, tuple(data.splits), positives_only=False)
        # Each request's list: its relevant items, padding, then n_sampled items it never touched.
        width = max(len(r) for r in relevant) + n_sampled
        rows = np.zeros((len(users), width), dtype=np.int64)
        for i in range(len(users)):
            rows[i, : len(relevant[i])] = relevant[i]
            rows[i, width - n_sampled :] = _draw_unseen(rng, n_items, touched.get(int(users[i]), set()), n_sampled)
    else:
        seen = _interacted(data, users, tuple(s for s in data.splits if s != split), positives_only=True) if exclude_seen else {}
        width = n_items
    sums = {f"{name}@{k}": 0.0 for k in ks for name in ("recall", "ndcg")}
    counted = 0
    batch = max(1, max_scores_per_batch // width)
    for part, logits in iter_request_scores(model, catalogue_state, user_tensors, rows, batch_size=batch):
        size = part.stop - part.start
        rel = np.zeros((size, width))
        mask = np.ones((size, width), dtype=bool)
        for b, i in enumerate(range(part.start, part.stop)):
            r = len(relevant[i])
            if full:
                rel[b, relevant[i]] = relevance[i]
                mask[b, list(seen.get(int(users[i]), set()) - set(relevant[i].tolist()))] = False
            else:
                rel[b, :r] = relevance[i]
                mask[b, r : width - n_sampled] = False
        scores = logits.cpu().numpy()
        for k in ks:
            sums[f"recall@{k}"] += recall_at_k(scores, rel, k, mask) * size
            sums[f"ndcg@{k}"] += ndcg_at_k(scores, rel, k, mask) * size
        counted += size
    report = {name: value / counted for name, value in sums.items()}
    report.update(requests=counted, candidates="full catalogue" if full else f"relevant + {n_sampled} sampled",
                  catalogue_items=n_items, exclude_seen=bool(full and exclude_seen))
    return report


def _draw_unseen(rng: np.random.Generator, n_items: int, touched: set, n: int) -> np.ndarray:
    """n catalogue rows (with replacement) none of which the user touched."""
    if len(touched) >= n_items:
        raise ValueError("a user has interacted with the whole catalogue: nothing left to sample")
    out = rng.integers(0, n_items, size=n)
    if touched:
        blocked = np.fromiter(touched, dtype=np.int64)
        clash = np.isin(out, blocked)
        while clash.any():
            out[clash] = rng.integers(0, n_items, size=int(clash.sum()))
            clash = np.isin(out, blocked)
    return out
