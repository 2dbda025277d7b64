import numpy as np
import pytest
from sklearn.metrics import log_loss, ndcg_score, roc_auc_score

from prerank.metrics import auc, gauc, logloss, ndcg_at_k, recall_at_k, rela_impr


@pytest.fixture
def random_case():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500).astype(float)
    # Rounded scores create many ties, which the rank statistic must credit by half.
    scores = np.round(rng.random(500) + 0.3 * labels, 1)
    return labels, scores


def test_auc_matches_sklearn_with_ties(random_case):
    labels, scores = random_case
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_rejects_bad_input():
    with pytest.raises(ValueError, match="both positive and negative"):
        auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="differ in length"):
        auc([1, 0], [0.2])
    with pytest.raises(ValueError, match="NaN"):
        auc([1, 0], [np.nan, 0.1])


def test_gauc_is_impression_weighted_per_user_auc(random_case):
    labels, scores = random_case
    groups = np.arange(500) % 7
    expected = sum((groups == g).sum() * roc_auc_score(labels[groups == g], scores[groups == g]) for g in range(7)) / 500
    assert gauc(labels, scores, groups) == pytest.approx(expected)
    # A single-class group is skipped: by hand, group a AUC 1.0 (2 rows), group b skipped, group c AUC 0.0 (2 rows).
    assert gauc([1, 0, 1, 1, 0, 1], [0.9, 0.1, 0.5, 0.4, 0.8, 0.2], ["a", "a", "b", "b", "c", "c"]) == pytest.approx(0.5)


def test_logloss_matches_sklearn(random_case):
    labels, _ = random_case
    p = np.random.default_rng(1).random(500)
    assert logloss(labels, p) == pytest.approx(log_loss(labels, p), rel=1e-9)


def test_rela_impr_by_hand():
    assert rela_impr(0.8974, 0.8697) == pytest.approx(((0.8974 - 0.5) / (0.8697 - 0.5) - 1) * 100)
    assert rela_impr(0.75, 0.7) == pytest.approx(25.0)


def test_recall_and_ndcg_by_hand():
    scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    relevance = np.array([[0, 1, 0, 1], [2, 0, 0, 1]])
    # Request 1: top-2 = items 0, 1 -> 1 of 2 relevant. Request 2: top-2 = items 3, 2 -> 1 of 2.
    assert recall_at_k(scores, relevance, 2) == pytest.approx(0.5)
    # NDCG@2 request 1: DCG = 1/log2(3); IDCG = 1 + 1/log2(3).
    # Request 2: DCG = (2^1-1)/1 = 1; IDCG = 3 + 1/log2(3).
    r1 = (1 / np.log2(3)) / (1 + 1 / np.log2(3))
    r2 = 1 / (3 + 1 / np.log2(3))
    assert ndcg_at_k(scores, relevance, 2) == pytest.approx((r1 + r2) / 2)
    # The mask removes padding candidates from both rankings and relevance.
    mask = np.array([[True, False, True, True], [True, True, True, True]])
    # Request 1 keeps items 0, 2, 3: relevant {3}, top-2 {0, 2} -> 0. Request 2 unchanged -> 0.5.
    assert recall_at_k(scores, relevance, 2, mask=mask) == pytest.approx((0.0 + 0.5) / 2)


def test_ndcg_matches_sklearn_for_binary_relevance():
    rng = np.random.default_rng(2)
    scores = rng.random((30, 50))
    relevance = (rng.random((30, 50)) < 0.1).astype(float)
    relevance[:, 0] = 1  # every request has a relevant item
    for k in (5, 10, 50):
        assert ndcg_at_k(scores, relevance, k) == pytest.approx(ndcg_score(relevance, scores, k=k))


def test_upqe_by_hand_and_its_reported_inputs():
    from prerank.metrics import upqe, upqe_report

    # Eff = 1 / (1 + 5 / 5) = 0.5; equal weights: (0.5 * 0.2 * 0.5) ** (1/3) = 0.05 ** (1/3).
    assert upqe(0.5, 0.2, 5.0, 5.0) == pytest.approx(0.368403149864, rel=1e-9)
    # Weights pick the qualities: no efficiency weight -> sqrt(0.5 * 0.2); all on recall -> recall.
    assert upqe(0.5, 0.2, 5.0, 5.0, weights=(0.5, 0.5, 0.0)) == pytest.approx(0.316227766017, rel=1e-9)
    assert upqe(0.5, 0.2, 123.0, 5.0, weights=(1.0, 0.0, 0.0)) == pytest.approx(0.5)
    # Zero latency costs nothing (Eff = 1); Eff = 1 / (1 + 15 / 5) = 0.25 at three times the reference.
    assert upqe(0.8, 0.8, 0.0) == pytest.approx(0.64 ** (1 / 3))
    report = upqe_report(0.9, 0.3, 15.0, 5.0)
    assert report["upqe_efficiency"] == pytest.approx(0.25)
    assert report["upqe"] == pytest.approx((0.9 * 0.3 * 0.25) ** (1 / 3))
    assert (report["upqe_retrieval_recall"], report["upqe_ranking_ndcg"], report["upqe_latency_ms"]) == (0.9, 0.3, 15.0)


def test_upqe_rejects_bad_input():
    from prerank.metrics import upqe

    with pytest.raises(ValueError, match="summing to 1"):
        upqe(0.5, 0.5, 1.0, weights=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="retrieval_recall"):
        upqe(1.5, 0.5, 1.0)
    with pytest.raises(ValueError, match="latency"):
        upqe(0.5, 0.5, -1.0)
