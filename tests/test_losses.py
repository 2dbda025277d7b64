"""The hybrid loss terms against hand-computed values."""

import math

import pytest
import torch

from prerank.train.losses import HybridLossConfig, distillation_loss, hybrid_loss, listnet_loss, stage_pairwise_loss


def test_distillation_is_the_listwise_kl_on_its_space_only():
    # Request 0: space = items 0, 1; teacher uniform, student softmax [3/4, 1/4]; item 2 is outside.
    # Request 1: one item in the space, so the term is undefined there and left out of the mean.
    logits = torch.tensor([[math.log(3.0), 0.0, 50.0], [1.0, 2.0, 3.0]])
    teacher = torch.tensor([[0.0, 0.0, -50.0], [5.0, 0.0, 0.0]])
    space = torch.tensor([[True, True, False], [True, False, False]])
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert distillation_loss(logits, teacher, space).item() == pytest.approx(expected, rel=1e-5)


def test_distillation_teacher_temperature_sharpens_the_target():
    logits = torch.zeros(1, 2)
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # T = 0.5 -> target softmax([2 ln 3, 0]) = [9/10, 1/10]
    space = torch.ones(1, 2, dtype=torch.bool)
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert distillation_loss(logits, teacher, space, teacher_temperature=0.5).item() == pytest.approx(expected, rel=1e-5)


def test_listnet_uses_normalised_gains_2_pow_rel_minus_1():
    # gains [3, 1, 0] -> target [3/4, 1/4, 0]; uniform student over 3 items -> CE = ln 3.
    # The second request has no gain at all and is left out.
    logits = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    relevance = torch.tensor([[2, 1, 0], [0, 0, 0]])
    space = torch.ones(2, 3, dtype=torch.bool)
    assert listnet_loss(logits, relevance, space).item() == pytest.approx(math.log(3.0), rel=1e-5)
    # With item 2 outside the space the student softmax is over two items: CE = ln 2.
    space[0, 2] = False
    assert listnet_loss(logits, relevance, space).item() == pytest.approx(math.log(2.0), rel=1e-5)


def test_stage_pairwise_loss_averages_logistic_loss_over_ordered_pairs():
    # stages [2, 1, 0] (+ one padding item): pairs (0,1) and (0,2) have margin 1, (1,2) margin 0.
    logits = torch.tensor([[1.0, 0.0, 0.0, 9.0]])
    stage = torch.tensor([[2, 1, 0, -1]])
    mask = torch.tensor([[True, True, True, False]])
    expected = (2 * math.log(1 + math.exp(-1.0)) + math.log(2.0)) / 3
    assert stage_pairwise_loss(logits, stage, mask).item() == pytest.approx(expected, rel=1e-5)
    # A request whose items all share one stage has no pair and contributes nothing.
    assert stage_pairwise_loss(logits, torch.zeros_like(stage), mask).item() == 0.0


def test_hybrid_loss_is_the_weighted_sum_and_drops_zero_weight_terms():
    torch.manual_seed(0)
    logits, teacher = torch.randn(3, 6), torch.randn(3, 6)
    stage = torch.tensor([[3, 3, 2, 2, 1, 0]] * 3)
    relevance = torch.tensor([[4, 1, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    mask = torch.ones(3, 6, dtype=torch.bool)
    config = HybridLossConfig(distill_weight=0.5, fine_weight=2.0, coarse_weight=3.0)
    total, terms = hybrid_loss(logits, stage, teacher, relevance, mask, config)
    distill = distillation_loss(logits, teacher, stage >= 2)
    fine = listnet_loss(logits, relevance, stage >= 3)
    coarse = stage_pairwise_loss(logits, stage, mask)
    assert total.item() == pytest.approx((0.5 * distill + 2.0 * fine + 3.0 * coarse).item(), rel=1e-5)
    total, terms = hybrid_loss(logits, stage, teacher, relevance, mask, HybridLossConfig(fine_weight=0.0))
    assert set(terms) == {"distill", "coarse"}
    assert total.item() == pytest.approx((distill + coarse).item(), rel=1e-5)


def test_hybrid_loss_rejects_mismatched_shapes_and_bad_config():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="share one"):
        hybrid_loss(x, torch.zeros(2, 4, dtype=torch.long), x, x, x.bool(), HybridLossConfig())
    with pytest.raises(ValueError, match="fine_weight"):
        HybridLossConfig(fine_weight=-1.0)
