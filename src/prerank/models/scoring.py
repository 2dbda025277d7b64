"""The one offline scoring path: requests scored as serving scores them.

`encode_catalogue` once (the item-state table), then per batch of requests `encode_user` once, the
candidates' item states gathered from the table and one `score` call. The cascade's retriever and
teacher, listwise training's evaluation, the two-stage evaluation, the top-K ranking metrics and
the benchmark all score through `iter_request_scores`, so what they measure is what is served.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from prerank.models.base import PreRankModel, State, gather_items

# scorer(model, user_state [b, ...], item_state [b, N, ...], mask [b, N] | None) -> logits [b, N]
Scorer = Callable[[PreRankModel, State, State, "Tensor | None"], Tensor]


def serving_score(model: PreRankModel, user_state: State, item_state: State, mask: Tensor | None) -> Tensor:
    """The default `Scorer`, the served one: `model.score` (user state [b, ...], item state
    [b, N, ...], mask [b, N] or None -> logits [b, N])."""
    return model.score(user_state, item_state, mask)


def two_stage_scorer(k: int, on_coarse: Callable[[Tensor], None] | None = None) -> Scorer:
    """The `Scorer` of a two-level model (`two_level`) served as a pipeline: `coarse_score` over every
    candidate, its top `k` survive, and one `score` call re-scores the survivors as their own list.
    Logits [b, N]: the survivors' scores, -inf for the dropped candidates and the padding.
    `on_coarse` receives each call's first-stage logits [b, N] (padding -inf)."""

    def pipeline(model: PreRankModel, user_state: State, item_state: State, mask: Tensor | None) -> Tensor:
        coarse = model.coarse_score(user_state, item_state)
        if mask is None:
            mask = torch.ones_like(coarse, dtype=torch.bool)
        coarse = coarse.masked_fill(~mask, float("-inf"))
        top = coarse.topk(min(k, coarse.shape[1]), dim=1).indices
        survivors = mask.gather(1, top)
        kept = {key: value.gather(1, top.reshape(*top.shape, *([1] * (value.dim() - 2))).expand(-1, -1, *value.shape[2:]))
                for key, value in item_state.items()}
        fine = model.score(user_state, kept, survivors).masked_fill(~survivors, float("-inf"))
        if on_coarse is not None:
            on_coarse(coarse)
        return torch.full_like(coarse, float("-inf")).scatter(1, top, fine)

    return pipeline


def model_device(model: PreRankModel) -> torch.device:
    """The device of the model's parameters (the CPU for a model without any)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def item_table(model: PreRankModel, catalogue: dict[str, Tensor], batch_size: int = 8192) -> State:
    """The item-state table {key: [M, ...]} of a catalogue's features {name: [M, ...]} (extra keys are
    ignored), on the model's device."""
    device = model_device(model)
    return model.encode_catalogue({f.name: catalogue[f.name].to(device) for f in model.schema.item_features}, batch_size)


def iter_request_scores(
    model: PreRankModel,
    table: State,
    users: dict[str, Tensor],
    item_rows: np.ndarray | Tensor | None = None,
    mask: np.ndarray | Tensor | None = None,
    batch_size: int = 256,
    scorer: Scorer = serving_score,
) -> Iterator[tuple[slice, Tensor]]:
    """(request slice, logits [b, N]) per batch of `batch_size` requests, in eval mode and without
    gradients (the model's mode is restored afterwards).

    `users`: user features [R, ...] (extra keys are ignored); `item_rows` [R, N] catalogue rows of
    each request's candidates, or None for the whole catalogue (N = M, in chunks laid out once per
    block of requests, `_catalogue_blocks`); `mask` [R, N] bool marks real candidates of padded lists
    and is handed to `score` (a catalogue has no padding: no mask without `item_rows`)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    user_features = {f.name: users[f.name] for f in model.schema.user_features}
    n_requests = len(next(iter(user_features.values()))) if user_features else len(item_rows)
    as_tensor = lambda a: torch.as_tensor(np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a)  # noqa: E731

    def user_state(lo: int, hi: int) -> State:
        return model.encode_user({k: v[lo:hi].to(device) for k, v in user_features.items()})

    try:
        with torch.no_grad():
            if item_rows is None:
                if mask is not None:
                    raise ValueError("a mask marks padded candidate lists; the whole catalogue (item_rows None) has none")
                yield from _catalogue_blocks(model, table, user_state, n_requests, batch_size, scorer)
                return
            for lo in range(0, n_requests, batch_size):
                part = slice(lo, min(lo + batch_size, n_requests))
                item_state = gather_items(table, as_tensor(item_rows[part]).to(device))
                part_mask = None if mask is None else as_tensor(mask[part]).to(device).bool()
                yield part, scorer(model, user_state(part.start, part.stop), item_state, part_mask)
    finally:
        model.train(was_training)


# Bytes of candidate item states that one `score` call reads: big enough that the call's fixed cost
# is small beside its arithmetic, small enough to stay in cache with the intermediates (a dot
# product over a 4 MiB buffer ran at 27 GFLOP/s on one core here, over 16 MiB at 21).
CANDIDATE_BUFFER_BYTES = 4 << 20
# The fewest catalogue items per call: fewer and the per-call cost of `score` dominates.
MIN_CATALOGUE_CHUNK = 64


def catalogue_tiling(model: PreRankModel, table: State) -> tuple[int, int]:
    """(requests per `score` call, catalogue items per call) of whole-catalogue scoring over the
    table {key: [M, ...]}: each call reads a [requests, items, ...] buffer of about
    `CANDIDATE_BUFFER_BYTES` of item states; a listwise model scores the whole catalogue (items = M)
    as one list."""
    n_items = len(next(iter(table.values())))
    bytes_per_item = max(1, sum(v[0].numel() * v.element_size() for v in table.values()))
    pairs = max(1, CANDIDATE_BUFFER_BYTES // bytes_per_item)
    chunk = n_items if model.listwise else min(n_items, max(MIN_CATALOGUE_CHUNK, pairs // 32))
    return max(1, pairs // chunk), chunk


def _catalogue_blocks(model: PreRankModel, table: State, user_state: Callable[[int, int], State], n_requests: int,
                      block: int, scorer: Scorer) -> Iterator[tuple[slice, Tensor]]:
    """Every request against the whole catalogue table {key: [M, ...]}: (request slice, logits
    [b, M]) per block of `block` requests.

    Scoring [b, M] at once would copy the table b times (`score` wants [b, N, ...] contiguous
    candidates: the cost of a full-catalogue evaluation was that copy, not the arithmetic). Here a
    chunk of catalogue items is laid out once as a [s, chunk, ...] buffer and reused by every group
    of s requests of the block, each group's `encode_user` run once per block; a model with a
    `score_shared` scores the chunk itself, with no buffer."""
    n_items = len(next(iter(table.values())))
    group, chunk = catalogue_tiling(model, table)
    for lo in range(0, n_requests, block):
        hi = min(lo + block, n_requests)
        groups = [(start, min(start + group, hi)) for start in range(lo, hi, group)]
        states = [user_state(start, stop) for start, stop in groups]
        width = max(stop - start for start, stop in groups)
        logits: Tensor | None = None
        for first in range(0, n_items, chunk):
            part = {k: v[first : first + chunk] for k, v in table.items()}
            buffer = None
            for (start, stop), state in zip(groups, states):
                scores = model.score_shared(state, part) if scorer is serving_score else None
                if scores is None:
                    if buffer is None:
                        buffer = {k: v.unsqueeze(0).expand(width, *v.shape).contiguous() for k, v in part.items()}
                    scores = scorer(model, state, {k: v[: stop - start] for k, v in buffer.items()}, None)
                if logits is None:
                    logits = scores.new_empty((hi - lo, n_items))
                logits[start - lo : stop - lo, first : first + chunk] = scores
        yield slice(lo, hi), logits


def score_requests(model: PreRankModel, table: State, users: dict[str, Tensor], item_rows: np.ndarray | Tensor | None = None,
                   mask: np.ndarray | Tensor | None = None, batch_size: int = 256, scorer: Scorer = serving_score) -> np.ndarray:
    """Logits [R, N] (float32) of every request through the serving path (`iter_request_scores`)."""
    parts = [scores.float().cpu().numpy() for _, scores in iter_request_scores(model, table, users, item_rows, mask, batch_size, scorer)]
    if parts:
        return np.concatenate(parts)
    width = len(next(iter(table.values()))) if item_rows is None else np.shape(item_rows)[1]
    return np.zeros((0, width), np.float32)
