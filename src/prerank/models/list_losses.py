"""Loss primitives over candidate lists [B, N], shared by the trainer's hybrid loss
(`prerank.train.losses`) and models whose own objective is listwise (LT-TTD).

Each is a mean over the requests where it is defined, so a term missing from a batch contributes 0;
`space` / `mask` [B, N] bool select the items a term runs over.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NEG = -1e9  # stands for -inf inside softmaxes (keeps empty rows finite)


def mean_over_requests(per_request: Tensor, defined: Tensor) -> Tensor:
    """The mean [] of `per_request` [B] over the requests where `defined` [B] bool holds; 0 if none."""
    if not defined.any():
        return per_request.new_zeros(())
    return per_request[defined].mean()


def distillation_loss(logits: Tensor, teacher: Tensor, space: Tensor, teacher_temperature: float = 1.0) -> Tensor:
    """Mean over requests of KL(softmax(teacher/T) || softmax(logits)) restricted to `space` [B, N]:
    `logits`, `teacher` [B, N] -> []. Requests with fewer than two items in `space` are left out."""
    target = F.softmax((teacher / teacher_temperature).masked_fill(~space, NEG), dim=-1)
    log_student = F.log_softmax(logits.masked_fill(~space, NEG), dim=-1)
    log_target = torch.log(target.clamp_min(1e-30))
    per_request = (target * (log_target - log_student)).masked_fill(~space, 0.0).sum(-1)
    return mean_over_requests(per_request, space.sum(-1) >= 2)


def listnet_loss(logits: Tensor, relevance: Tensor, space: Tensor) -> Tensor:
    """Mean over requests of the cross-entropy between gains (2^rel - 1, normalised) and softmax(logits):
    `logits`, graded `relevance`, `space` [B, N] -> []. Requests without gain or with fewer than two
    items in `space` are left out."""
    gains = (torch.pow(2.0, relevance.float()) - 1.0).masked_fill(~space, 0.0)
    total = gains.sum(-1, keepdim=True)
    target = gains / total.clamp_min(1e-12)
    log_student = F.log_softmax(logits.masked_fill(~space, NEG), dim=-1)
    per_request = -(target * log_student).masked_fill(~space, 0.0).sum(-1)
    return mean_over_requests(per_request, (total.squeeze(-1) > 0) & (space.sum(-1) >= 2))


def stage_pairwise_loss(logits: Tensor, stage: Tensor, mask: Tensor) -> Tensor:
    """Mean over requests of the mean logistic loss over pairs (i, j) with stage_i > stage_j:
    `logits`, `stage` (the cascade stage an item reached), `mask` [B, N] -> []."""
    pairs = (stage.unsqueeze(-1) > stage.unsqueeze(-2)) & mask.unsqueeze(-1) & mask.unsqueeze(-2)
    margin = logits.unsqueeze(-1) - logits.unsqueeze(-2)
    per_pair = F.softplus(-margin).masked_fill(~pairs, 0.0)
    count = pairs.sum((-1, -2))
    per_request = per_pair.sum((-1, -2)) / count.clamp_min(1)
    return mean_over_requests(per_request, count > 0)
