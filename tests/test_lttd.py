"""LT-TTD: the transformer mixes a request's candidates (and only its valid ones), the losses by
hand, disjoint training freezes what it should, the two-level evaluation, and a short training."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prerank.models import create_model
from prerank.models.base import gather_items
from prerank.models.lttd import list_kl, sampled_softmax_loss
from prerank.train.listwise import ListBatches, ListwiseTrainer, evaluate_lists, score_lists
from prerank.train.run import train_and_evaluate
from prerank.train.losses import NO_HYBRID
from prerank.train.trainer import TrainConfig, fit_plan
from prerank.train.two_stage import score_two_stage, two_stage_report
from tests.test_contract import SMALL


def build(small_data, seed=0, **overrides):
    torch.manual_seed(seed)
    return create_model("lttd", small_data.schema, {**SMALL["lttd"], **overrides})


def request_states(model, small_data, n_users=3, n_items=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    table = model.encode_catalogue(small_data.items.to_tensors())
    users = small_data.test.subset(np.arange(n_users)).to_tensors()
    user_state = model.encode_user(model.user_inputs(users))
    rows = torch.randint(0, len(small_data.item_raw_ids), (n_users, n_items), generator=g)
    return user_state, table, rows


@torch.no_grad()
def test_the_transformer_mixes_candidates_and_is_permutation_equivariant(small_data):
    model = build(small_data).eval()
    user_state, table, rows = request_states(model, small_data)
    scores = model.score(user_state, gather_items(table, rows))
    # Replacing candidate 0 changes the other candidates' scores: they attend to it.
    changed = rows.clone()
    changed[:, 0] = (rows[:, 0] + 1) % len(small_data.item_raw_ids)
    moved = model.score(user_state, gather_items(table, changed))
    assert (moved[:, 1:] - scores[:, 1:]).abs().max() > 1e-4
    # Reordering the list reorders the scores and nothing else (no positional encoding).
    perm = torch.randperm(rows.shape[1], generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model.score(user_state, gather_items(table, rows[:, perm])), scores[:, perm], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_padding_is_invisible_to_valid_candidates(small_data):
    model = build(small_data).eval()
    user_state, table, rows = request_states(model, small_data)
    mask = torch.ones_like(rows, dtype=torch.bool)
    mask[0, 6:] = False
    padded = model.score(user_state, gather_items(table, rows), mask=mask)
    alone = model.score({k: v[:1] for k, v in user_state.items()}, gather_items(table, rows[:1, :6]))
    torch.testing.assert_close(padded[0, :6], alone[0], atol=1e-5, rtol=1e-5)
    # Whatever sits in the padding.
    other = rows.clone()
    other[0, 6:] = 0
    torch.testing.assert_close(model.score(user_state, gather_items(table, other), mask=mask)[0, :6], padded[0, :6], atol=1e-5, rtol=1e-5)


def test_coarse_score_is_the_scaled_similarity_and_pointwise(small_data):
    model = build(small_data).eval()
    with torch.no_grad():
        user_state, table, rows = request_states(model, small_data)
        items = gather_items(table, rows)
        logits = model.coarse_score(user_state, items)
        cosine = F.cosine_similarity(user_state["vector"].unsqueeze(1), items["vector"], dim=-1)
        torch.testing.assert_close(logits, cosine * math.exp(model.similarity_scale.log_inv_temperature.item()) + model.bias, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.coarse_score(user_state, gather_items(table, rows[:, :1])), logits[:, :1])


def test_sampled_softmax_by_hand():
    # Two requests, lists of 3, 1-d vectors so the logits are easy: t = scale * u * v + bias.
    user = torch.tensor([[1.0], [2.0]])
    items = torch.tensor([[[1.0], [0.0], [-1.0]], [[0.5], [1.0], [3.0]]])
    positive = torch.tensor([[True, False, False], [False, True, False]])
    mask = torch.tensor([[True, True, True], [True, True, False]])  # request 1's third item is padding
    scale, bias = torch.tensor(2.0), torch.tensor(0.5)
    # Request 0: t = 2*[1, 0, -1] + .5 = [2.5, .5, -1.5]; positive 2.5; own negatives .5, -1.5.
    # In-batch negatives: request 1's valid items, scored by user 0: 2*[.5, 1] + .5 = [1.5, 2.5].
    lse0 = math.log(math.exp(0.5) + math.exp(-1.5) + math.exp(1.5) + math.exp(2.5))
    # Request 1: t = 2*2*[.5, 1] + .5 = [2.5, 4.5]; positive 4.5, own negative 2.5;
    # in-batch: request 0's items scored by user 1: 4*[1, 0, -1] + .5 = [4.5, .5, -3.5].
    lse1 = math.log(math.exp(2.5) + math.exp(4.5) + math.exp(0.5) + math.exp(-3.5))
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected_batch = (softplus(lse0 - 2.5) + softplus(lse1 - 4.5)) / 2
    expected_list = (softplus(math.log(math.exp(0.5) + math.exp(-1.5)) - 2.5) + softplus(2.5 - 4.5)) / 2
    got_batch = sampled_softmax_loss(user, items, positive, mask, scale, bias, in_batch=True)
    got_list = sampled_softmax_loss(user, items, positive, mask, scale, bias, in_batch=False)
    assert got_batch.item() == pytest.approx(expected_batch, rel=1e-5)
    assert got_list.item() == pytest.approx(expected_list, rel=1e-5)
    # A request without a positive does not count (and a batch without any is 0).
    none = torch.zeros_like(positive)
    assert sampled_softmax_loss(user, items, none, mask, scale, bias, True).item() == 0.0


def test_list_kl_by_hand_and_stop_gradient_on_the_target():
    target = torch.tensor([[2.0, 0.0, 1.0, 9.0]], requires_grad=True)
    student = torch.tensor([[0.0, 1.0, 0.0, -9.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True, False]])
    t = 2.0
    p = np.exp(np.array([1.0, 0.0, 0.5]))
    p /= p.sum()
    q = np.exp(np.array([0.0, 0.5, 0.0]))
    q /= q.sum()
    expected = t * t * float((p * np.log(p / q)).sum())
    loss = list_kl(target, student, mask, t)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert target.grad is None and student.grad.abs().sum() > 0
    assert student.grad[0, 3] == 0  # the padding gets nothing


def cascade_batch(model, small_data, cascade, n=8):
    source = ListBatches(model, small_data, cascade.lists("train"), torch.device("cpu"))
    return next(source.batches(n))


def test_auxiliary_losses_are_the_weighted_terms(small_data, cascade):
    from prerank.train.losses import listnet_loss

    model = build(small_data, dropout=0.0, retrieval_weight=0.5, rank_weight=2.0, kd_weight=0.3, kd_down_weight=1.0,
                  kd_up_weight=0.5, kd_temperature=2.0).train()
    batch = cascade_batch(model, small_data, cascade)
    out = model(batch)
    user_state = model.encode_user(model.user_inputs(batch))
    item_state = model.encode_item_lists(model.item_inputs(batch))
    mask, relevance = batch["mask"].bool(), batch["relevance"]
    tte = model.coarse_score(user_state, item_state)
    positive = mask & (relevance >= 3)
    expected = {
        "lttd_retrieval": 0.5 * sampled_softmax_loss(user_state["vector"], item_state["vector"], positive, mask,
                                                     model._scale(), model.bias, True),
        "lttd_rank": 2.0 * listnet_loss(out.logits, relevance, mask),
        "lttd_kd_down": 0.3 * 1.0 * list_kl(out.logits, tte, mask, 2.0),
        "lttd_kd_up": 0.3 * 0.5 * list_kl(tte, out.logits, mask, 2.0),
    }
    assert set(out.aux_losses) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(out.aux_losses[name], value, atol=1e-5, rtol=1e-5)
    assert set(build(small_data, kd_weight=0.0).train()(batch).aux_losses) == {"lttd_retrieval", "lttd_rank"}
    assert model.eval()(batch).aux_losses == {}


def test_disjoint_trains_the_two_tower_then_only_the_transformer(small_data, cascade):
    model = build(small_data, mode="disjoint")
    snapshots = []
    original = ListwiseTrainer.fit_lists

    def recording_fit(self, *args, **kwargs):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        history = original(self, *args, **kwargs)
        snapshots.append((model.phase, before, {n: p.detach().clone() for n, p in model.named_parameters()}))
        return history

    ListwiseTrainer.fit_lists = recording_fit
    try:
        config = TrainConfig(epochs=2, batch_size=16, lr=3e-3, patience=2, progress=False)

        def fit_phase(phase_dir):
            trainer = ListwiseTrainer(model, config, NO_HYBRID)
            trainer.fit_lists(small_data, cascade.lists("train"), cascade.lists("valid"))
            return trainer

        first, second = fit_plan(model, fit_phase)
    finally:
        ListwiseTrainer.fit_lists = original
    tte = {id(p) for p in model.two_tower_parameters()}
    names = {n: id(p) in tte for n, p in model.named_parameters()}
    (stage1, start1, end1), (stage2, start2, end2) = snapshots
    assert (stage1, stage2) == ("two_tower", "transformer") and model.phase == "all"
    changed = lambda a, b, n: not torch.equal(a[n], b[n])  # noqa: E731
    # Phase 1 moves the two-tower and nothing else; phase 2 moves the transformer, never the two-tower.
    assert any(changed(start1, end1, n) for n, is_tte in names.items() if is_tte)
    assert not any(changed(start1, end1, n) for n, is_tte in names.items() if not is_tte)
    assert not any(changed(start2, end2, n) for n, is_tte in names.items() if is_tte)
    assert any(changed(start2, end2, n) for n, is_tte in names.items() if not is_tte)
    assert all(p.requires_grad for p in model.parameters())  # restored after both phases
    assert set(first.history[0].aux_losses) == {"lttd_retrieval"}
    assert set(second.history[0].aux_losses) == {"lttd_rank", "lttd_kd_up"}


def test_two_stage_pipeline_scores_only_the_two_tower_survivors(small_data, cascade):
    model = build(small_data).eval()
    lists = cascade.lists("test")
    k = 5
    tte, final = score_two_stage(model, small_data, lists, k)
    valid_tte = np.where(lists.mask, tte, -np.inf)
    for r in range(len(lists)):
        top = np.argsort(-valid_tte[r], kind="stable")[:k]
        survivors = np.flatnonzero(np.isfinite(final[r]))
        assert set(survivors) == set(top[np.isfinite(valid_tte[r, top])])
        with torch.no_grad():
            user = {f.name: v[r : r + 1] for f in model.schema.user_features
                    for v in [small_data.test.subset(lists.source_rows).to_tensors()[f.name]]}
            table = model.encode_catalogue(small_data.items.to_tensors())
            alone = model.score(model.encode_user(user), gather_items(table, torch.as_tensor(lists.item_rows[r : r + 1, survivors])))
        np.testing.assert_allclose(final[r, survivors], alone[0].numpy(), atol=1e-5, rtol=1e-5)
        if r == 3:
            break
    report = two_stage_report(model, small_data, lists, k=k, final_ks=(5,), latency_requests=3)
    assert 0 <= report["tte_recall@5"] <= 1 and 0 <= report["upqe"] <= 1
    assert report["upqe_retrieval_recall"] == report["tte_recall@5"]
    with pytest.raises(ValueError, match="must be <="):
        two_stage_report(model, small_data, lists, k=5, final_ks=(10,))


def test_joint_training_improves_the_list_and_the_two_tower_stage(small_data, cascade):
    """Joint training fits the lists it trains on: the final list and the two-tower stage both
    improve (the tiny generated cascade holds too little held-out signal about real interactions
    to test generalisation; the ML-1M benchmark measures that)."""
    model = build(small_data)
    train = cascade.lists("train")
    before_list = evaluate_lists(model, small_data, train, ks=(10,))["ndcg@10"]
    before_tte = two_stage_report(model, small_data, train, k=10, latency_requests=1)["tte_recall@10"]
    trainer = ListwiseTrainer(model, TrainConfig(epochs=6, batch_size=16, lr=3e-3, patience=6, progress=False), NO_HYBRID)
    trainer.fit_lists(small_data, train, train)
    after_list = evaluate_lists(model, small_data, train, ks=(10,))["ndcg@10"]
    after_tte = two_stage_report(model, small_data, train, k=10, latency_requests=1)["tte_recall@10"]
    assert after_list > before_list + 0.02 and after_tte > before_tte + 0.05
    assert trainer.history[-1].train_loss < trainer.history[0].train_loss
    assert set(trainer.history[0].aux_losses) == {"lttd_retrieval", "lttd_rank", "lttd_kd_down", "lttd_kd_up"}


def test_run_training_picks_the_mode_and_reports_the_two_levels(small_data, cascade):
    config = TrainConfig(epochs=1, batch_size=32, patience=1, progress=False)
    metrics, model = train_and_evaluate(small_data, "lttd", config, {**SMALL["lttd"], "mode": "disjoint"}, cascade=cascade)
    assert metrics["objective"]["hybrid"] == {**metrics["objective"]["hybrid"], "distill_weight": 0.0, "fine_weight": 0.0, "coarse_weight": 0.0}
    assert {"tte_recall@50", "pipeline_ndcg@10", "upqe", "latency_ms_pipeline"} <= set(metrics["test_two_stage"])
    assert model.phase == "all"
    np.testing.assert_allclose(score_lists(model, small_data, cascade.lists("test"))[:, :1].shape, (len(cascade.lists("test")), 1))


def test_bad_config_is_a_clear_error(small_data):
    with pytest.raises(ValueError, match="divisible"):
        create_model("lttd", small_data.schema, {"model_dim": 10, "heads": 4})
    with pytest.raises(ValueError, match="kd_weight: Input should be greater than or equal to 0"):
        create_model("lttd", small_data.schema, {"kd_weight": -1.0})
    with pytest.raises(ValueError, match="mode"):
        create_model("lttd", small_data.schema, {"mode": "sequential"})


@torch.no_grad()
def test_without_list_attention_the_scores_are_pointwise(small_data):
    model = build(small_data, list_attention=False).eval()
    user_state, table, rows = request_states(model, small_data)
    many = model.score(user_state, gather_items(table, rows))
    one_by_one = torch.cat([model.score(user_state, gather_items(table, rows[:, j : j + 1])) for j in range(rows.shape[1])], dim=1)
    torch.testing.assert_close(many, one_by_one, atol=1e-5, rtol=1e-5)
