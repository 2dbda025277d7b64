"""Training objectives over candidate lists: RankTower's hybrid loss on full-stage samples.

Every loss takes per-request lists `[B, N]`: the student's `logits`, and for each (request, item)
its furthest cascade `stage` (padding: -1), the teacher's score, the graded `relevance` and a
validity `mask`. The reconstruction of RankTower's hybrid loss (design notes §6.5, [I]):

    L = w_dis * L_dis + w_fine * L_fine + w_coarse * L_coarse

- distillation on the ranked space (stage >= `distill_min_stage`, the items the ranker scored):
  listwise KL( softmax(teacher / T) || softmax(logits) ), per request;
- fine-grained ranking on the exposed space (stage >= `fine_min_stage`) with graded labels:
  ListNet softmax cross-entropy against the gain distribution (2^rel - 1) / sum(2^rel - 1);
- coarse-grained stage ordering on all stages: pairwise logistic loss
  log(1 + exp(-(s_i - s_j))) averaged over the pairs of one request with stage_i > stage_j.

Readings chosen where the sources are silent (all config): ListNet rather than a differentiable-
sorting NDCG surrogate for the fine term; full pairwise rather than sampled pairs for the coarse
term; each term is a mean over the requests where it is defined (>= 2 items in its space, a
positive gain, a stage pair), so a term missing from a batch contributes 0.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from torch import Tensor

from prerank.config import NonNegativeFloat, PositiveFloat, config_dataclass
from prerank.models.list_losses import distillation_loss, listnet_loss, stage_pairwise_loss


# Stages of a cascade candidate (`prerank.cascade`): random 0, retrieved 1, pre-ranked 2, exposed 3.
Stage = Annotated[int, Field(ge=0, le=3)]


@config_dataclass
class HybridLossConfig:
    distill_weight: NonNegativeFloat = 1.0
    fine_weight: NonNegativeFloat = 1.0
    coarse_weight: NonNegativeFloat = 1.0
    teacher_temperature: PositiveFloat = 1.0
    distill_min_stage: Stage = 2  # the ranked space: passed pre-ranking (or really interacted)
    fine_min_stage: Stage = 3  # the exposed space: teacher top-N2 plus the real interactions


# No hybrid term: a model whose own auxiliary losses are its list objective (`list_objective = "own"`).
NO_HYBRID = HybridLossConfig(distill_weight=0.0, fine_weight=0.0, coarse_weight=0.0)


def hybrid_loss(logits: Tensor, stage: Tensor, teacher: Tensor, relevance: Tensor, mask: Tensor,
                config: HybridLossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted sum and each weighted term (terms with weight 0 are skipped, not computed)."""
    if not (logits.shape == stage.shape == teacher.shape == relevance.shape == mask.shape):
        raise ValueError(f"hybrid loss inputs must share one [B, N] shape: logits {tuple(logits.shape)}, "
                         f"stage {tuple(stage.shape)}, teacher {tuple(teacher.shape)}, relevance {tuple(relevance.shape)}, "
                         f"mask {tuple(mask.shape)}")
    mask = mask.bool()
    terms: dict[str, Tensor] = {}
    if config.distill_weight:
        space = mask & (stage >= config.distill_min_stage)
        terms["distill"] = config.distill_weight * distillation_loss(logits, teacher, space, config.teacher_temperature)
    if config.fine_weight:
        space = mask & (stage >= config.fine_min_stage)
        terms["fine"] = config.fine_weight * listnet_loss(logits, relevance, space)
    if config.coarse_weight:
        terms["coarse"] = config.coarse_weight * stage_pairwise_loss(logits, stage, mask)
    total = sum(terms.values(), logits.new_zeros(()))
    return total, terms
