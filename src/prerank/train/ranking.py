"""Top-K evaluation over candidate sets, through the served scoring path.

One request per user of the evaluated split: the relevant items are that user's positive rows in
the split (relevance = the row's grade where grades are known and positive, else 1; the highest
grade when an item repeats); the user features are those of the user's earliest positive row
there, whose behaviour sequence holds only events before it. Scores come from the path a server
runs: `encode_catalogue` once, `encode_user` once per request, `gather_items` + `score` over the
candidates (the full catalogue in chunks of item states laid out once per block of users and
reused by all of them: `prerank.models.scoring`).

Candidates (`candidates`):
- ``"full"``: the whole catalogue. With `exclude_seen`, the items of the user's positive rows in
  the other splits are masked out unless they are relevant here (the usual full-ranking reading).
  A listwise model does not score a whole catalogue as one list (its cost grows with the list's
  square); a two-level one is ranked as it is served, its `coarse_score` over the catalogue and
  `score` over the top `rerank` (`prerank.models.scoring.two_stage_scorer`), and any other listwise
  model must take sampled candidates.
- an integer n: the relevant items plus n items drawn uniformly (seeded) among catalogue items
  with no logged row for the user in any split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from prerank.data.table import GRADE, ITEM_ROW, LABEL, PreparedData
from prerank.metrics import top_k_metrics
from prerank.models.base import PreRankModel
from prerank.models.scoring import catalogue_tiling, item_table, iter_request_scores, serving_score, two_stage_scorer


@dataclass(frozen=True)
class _Pairs:
    """(request, column) pairs as sorted keys request * width + column, with a value per pair or
    none: the relevant items of every request, or the candidates it must not see."""

    keys: np.ndarray
    width: int
    value: np.ndarray | None = None

    @staticmethod
    def of(request: np.ndarray, column: np.ndarray, width: int, value: np.ndarray | None = None) -> "_Pairs":
        keys = request.astype(np.int64) * width + column
        if value is None:
            return _Pairs(np.unique(keys), width)
        order = np.argsort(keys, kind="stable")
        return _Pairs(keys[order], width, value[order])

    def rows(self, lo: int, hi: int) -> slice:
        """The pairs of requests lo..hi-1."""
        return slice(*np.searchsorted(self.keys, (lo * self.width, hi * self.width)))

    def _find(self, request: np.ndarray, column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keys = request.astype(np.int64) * self.width + column
        at = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
        return at, (self.keys[at] == keys) if len(self.keys) else np.zeros(keys.shape, dtype=bool)

    def contains(self, request: np.ndarray, column: np.ndarray) -> np.ndarray:
        return self._find(request, column)[1]

    def lookup(self, request: np.ndarray, column: np.ndarray) -> np.ndarray:
        """The value of each (request, column), 0 where there is no such pair."""
        at, found = self._find(request, column)
        return np.where(found, self.value[at], 0.0)

    def without(self, other: "_Pairs") -> "_Pairs":
        return _Pairs(np.setdiff1d(self.keys, other.keys, assume_unique=True), self.width)


def _requests(data: PreparedData, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per user with a positive in `split`, by user id: (user ids [R], earliest positive row [R]),
    and its relevant items as flat arrays sorted by request: (request [P], item row [P],
    relevance [P]), each (user, item) once with its highest relevance."""
    table = data.splits[split]
    positive = np.flatnonzero(table[LABEL] > 0)
    if len(positive) == 0:
        raise ValueError(f"the {split} split has no positive rows to rank")
    grade = table[GRADE][positive].astype(np.float64) if GRADE in table.columns else np.full(len(positive), -1.0)
    relevance = np.where(grade > 0, grade, 1.0)
    users, first, request = np.unique(table[data.schema.user_id][positive], return_index=True, return_inverse=True)
    item = table[ITEM_ROW][positive].astype(np.int64)
    # Best relevance first within each (request, item), then one row per pair.
    order = np.lexsort((-relevance, item, request))
    request, item, relevance = request[order], item[order], relevance[order]
    keep = np.r_[True, (request[1:] != request[:-1]) | (item[1:] != item[:-1])]
    return users, positive[first], request[keep], item[keep], relevance[keep]


def _logged(data: PreparedData, users: np.ndarray, splits: tuple[str, ...], positives_only: bool, width: int) -> _Pairs:
    """(request, item row) of every logged row of the requests' users in `splits` (`users` sorted)."""
    requests, items = [], []
    for name in splits:
        t = data.splits[name]
        keep = t[LABEL] > 0 if positives_only else np.ones(len(t), dtype=bool)
        user, item = t[data.schema.user_id][keep], t[ITEM_ROW][keep].astype(np.int64)
        at = np.minimum(np.searchsorted(users, user), len(users) - 1)
        found = users[at] == user
        requests.append(at[found])
        items.append(item[found])
    return _Pairs.of(np.concatenate(requests), np.concatenate(items), width)


def _ideal(request: np.ndarray, relevance: np.ndarray, n_requests: int, k: int) -> np.ndarray:
    """[R, k]: each request's k largest relevances, largest first, zero-padded."""
    order = np.lexsort((-relevance, request))
    request, relevance = request[order], relevance[order]
    starts = np.searchsorted(request, np.arange(n_requests))
    rank = np.arange(len(request)) - starts[request]
    out = np.zeros((n_requests, k))
    keep = rank < k
    out[request[keep], rank[keep]] = relevance[keep]
    return out


def ranking_candidates(choice: str, dataset_candidates: list) -> list:
    """The candidate sets `ranking_report` runs for `TrainConfig.eval_candidates`: "dataset" the
    dataset's own list, "full" the catalogue, "sampled" the dataset's sampled count (100 where it
    has none), "sampled:N" N sampled items, "none" nothing."""
    if choice == "dataset":
        return list(dataset_candidates)
    if choice == "none":
        return []
    if choice == "full":
        return ["full"]
    name, _, count = choice.partition(":")
    if name != "sampled":
        raise ValueError(f"eval candidates must be dataset, full, sampled, sampled:N or none (got {choice!r})")
    if count:
        return [int(count)]
    return [c for c in dataset_candidates if c != "full"] or [100]


@torch.no_grad()
def ranking_report(
    model: PreRankModel,
    data: PreparedData,
    split: str = "test",
    ks: tuple[int, ...] = (10, 20),
    candidates: str | int = "full",
    exclude_seen: bool = True,
    seed: int = 0,
    max_scores_per_block: int = 16_000_000,
    progress: bool = False,
    rerank: int = 100,
) -> dict:
    """Recall@K and NDCG@K (metrics.top_k_metrics) averaged over the split's users; `progress`
    shows a bar over them; `rerank`: the first-stage survivors a two-level listwise model's `score`
    re-ranks in a full ranking (module docstring).

    Relevance and masks stay sparse ((request, item) pairs): per block of requests only the
    scores [b, N] are dense, masked in place, and one top-max(ks) of them is read."""
    users, first_rows, rel_request, rel_item, rel_value = _requests(data, split)
    n_requests = len(users)
    catalogue_state = item_table(model, data.items.to_tensors())
    n_items = len(data.item_raw_ids)
    user_tensors = data.splits[split].subset(first_rows).to_tensors()
    n_relevant = np.bincount(rel_request, minlength=n_requests)
    full = candidates == "full"
    rows, mask, scorer = None, None, serving_score
    if full and model.listwise:
        if not model.two_level:
            raise ValueError(f"{model.name} scores its candidates as one list: rank it over sampled candidates, "
                             "not the whole catalogue")
        if rerank < max(ks):
            raise ValueError(f"rerank ({rerank}) must be at least the largest K ({max(ks)})")
        scorer = two_stage_scorer(rerank)
    if not full:
        n_sampled = int(candidates)
        if n_sampled < 1:
            raise ValueError("candidates must be 'full' or a positive number of sampled items")
        # Each request's list: its relevant items, padding, then n_sampled items it never touched.
        width = int(n_relevant.max()) + n_sampled
        position = np.arange(len(rel_request)) - np.searchsorted(rel_request, rel_request)
        rows = np.zeros((n_requests, width), dtype=np.int64)
        rows[rel_request, position] = rel_item
        rows[:, width - n_sampled :] = _draw_unseen(np.random.default_rng(seed), n_requests, n_sampled,
                                                    _logged(data, users, tuple(data.splits), False, n_items))
        relevant = _Pairs.of(rel_request, position, width, rel_value)
        # Padding between a request's relevant items and its sampled ones is no candidate.
        columns = np.arange(width)
        mask = (columns < n_relevant[:, None]) | (columns >= width - n_sampled)
        block = max(1, 500_000 // width)
    else:
        width = n_items
        relevant = _Pairs.of(rel_request, rel_item, width, rel_value)
        others = tuple(s for s in data.splits if s != split)
        hidden = _logged(data, users, others, True, width).without(relevant) if exclude_seen else None
        # Blocks of whole score rows; a multiple of the requests one `score` call takes.
        group = catalogue_tiling(model, catalogue_state)[0]
        block = max(group, max_scores_per_block // width // group * group)
    depth = min(max(ks), width)
    ideal = _ideal(rel_request, rel_value, n_requests, depth)
    sums = {f"{name}@{k}": 0.0 for k in ks for name in ("recall", "ndcg")}
    bar = tqdm(total=n_requests, disable=not progress, desc=f"ranking {split} users", unit="user", leave=False)
    for part, logits in iter_request_scores(model, catalogue_state, user_tensors, rows, mask, block, scorer):
        logits = logits.float()
        if full and hidden is not None:
            keys = hidden.keys[hidden.rows(part.start, part.stop)]
            logits[torch.as_tensor(keys // width - part.start), torch.as_tensor(keys % width)] = -torch.inf
        elif not full:
            logits[~torch.as_tensor(mask[part])] = -torch.inf
        top = torch.topk(logits, depth, dim=1).indices.cpu().numpy()
        request = np.arange(part.start, part.stop)[:, None]
        found = top_k_metrics(relevant.lookup(request, top), ideal[part], n_relevant[part], ks)
        for name, values in found.items():
            sums[name] += float(values.sum())  # every request has a relevant item: none is NaN
        bar.update(part.stop - part.start)
    bar.close()
    report = {name: value / n_requests for name, value in sums.items()}
    report.update(requests=n_requests, candidates="full catalogue" if full else f"relevant + {n_sampled} sampled",
                  catalogue_items=n_items, exclude_seen=bool(full and exclude_seen))
    if scorer is not serving_score:
        report["reranked"] = rerank
    return report


def _draw_unseen(rng: np.random.Generator, n_requests: int, n: int, touched: _Pairs) -> np.ndarray:
    """[R, n] catalogue rows (with replacement), none of which request r's user touched."""
    n_items = touched.width
    if (np.bincount(touched.keys // n_items, minlength=n_requests) >= n_items).any():
        raise ValueError("a user has interacted with the whole catalogue: nothing left to sample")
    out = rng.integers(0, n_items, size=(n_requests, n))
    request = np.broadcast_to(np.arange(n_requests)[:, None], out.shape)
    clash = touched.contains(request, out)
    while clash.any():
        out[clash] = rng.integers(0, n_items, size=int(clash.sum()))
        clash = touched.contains(request, out)
    return out
