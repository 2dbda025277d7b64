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
    each request's candidates, or None for the whole catalogue (N = M, as a broadcast view of the
    table rather than R copies); `mask` [R, N] bool marks real candidates of padded lists and is
    handed to `score`."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    user_features = {f.name: users[f.name] for f in model.schema.user_features}
    n_requests = len(next(iter(user_features.values()))) if user_features else len(item_rows)
    as_tensor = lambda a: torch.as_tensor(np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a)  # noqa: E731
    try:
        with torch.no_grad():
            for lo in range(0, n_requests, batch_size):
                part = slice(lo, min(lo + batch_size, n_requests))
                user_state = model.encode_user({k: v[part].to(device) for k, v in user_features.items()})
                if item_rows is None:
                    size = part.stop - part.start
                    item_state = {k: v.unsqueeze(0).expand(size, *v.shape) for k, v in table.items()}
                else:
                    item_state = gather_items(table, as_tensor(item_rows[part]).to(device))
                part_mask = None if mask is None else as_tensor(mask[part]).to(device).bool()
                yield part, scorer(model, user_state, item_state, part_mask)
    finally:
        model.train(was_training)


def score_requests(model: PreRankModel, table: State, users: dict[str, Tensor], item_rows: np.ndarray | Tensor | None = None,
                   mask: np.ndarray | Tensor | None = None, batch_size: int = 256, scorer: Scorer = serving_score) -> np.ndarray:
    """Logits [R, N] (float32) of every request through the serving path (`iter_request_scores`)."""
    parts = [scores.float().cpu().numpy() for _, scores in iter_request_scores(model, table, users, item_rows, mask, batch_size, scorer)]
    if parts:
        return np.concatenate(parts)
    width = len(next(iter(table.values()))) if item_rows is None else np.shape(item_rows)[1]
    return np.zeros((0, width), np.float32)
