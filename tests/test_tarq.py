import math

import numpy as np
import pytest
import torch

from prerank.data.table import LABEL
from prerank.models import create_model
from prerank.models.base import gather_items
from prerank.models.tarq import codebook_usage, ema_codebook_step, residual_kmeans, residual_quantize, symmetric_kl


def test_residual_quantization_by_hand():
    codebooks = torch.tensor([[[0.0, 0.0], [4.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])  # L=2, K=2, d=2
    vectors = torch.tensor([[5.0, 0.2], [0.1, 0.9]])
    codes, residuals = residual_quantize(vectors, codebooks)
    # (5, .2): level 1 -> (4, 0), residual (1, .2) -> level 2 -> (1, 0). (.1, .9): (0, 0) then (0, 1).
    assert codes.tolist() == [[1, 0], [0, 1]]
    torch.testing.assert_close(residuals[:, 1], torch.tensor([[1.0, 0.2], [0.1, 0.9]]))


def test_residual_kmeans_recovers_separated_clusters():
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, 0.0]])
    points = centres.repeat_interleave(20, 0) + 0.01 * torch.randn(60, 2, generator=torch.Generator().manual_seed(0))
    books = residual_kmeans(points, levels=1, k=3, iterations=10, generator=torch.Generator().manual_seed(1))
    found = sorted(books[0].round().tolist())
    assert found == sorted(centres.tolist())


def test_symmetric_kl_by_hand():
    p = torch.tensor([[0.5, 0.5]])
    q = torch.tensor([[0.9, 0.1]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1) + 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert symmetric_kl(p, q).item() == pytest.approx(expected, rel=1e-5)
    assert symmetric_kl(p, p).item() == pytest.approx(0.0, abs=1e-7)


def test_codebook_usage_by_hand():
    codes = torch.tensor([[0, 1], [0, 1], [2, 1], [3, 1]])
    usage = codebook_usage(codes, codebook_size=4)
    assert usage["utilisation"] == [0.75, 0.25]
    assert usage["entropy"][0] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert usage["entropy"][1] == pytest.approx(0.0)


def _model(small_data, **overrides):
    torch.manual_seed(0)
    return create_model("tarq", small_data.schema, {"hidden": [32, 16], "codebook_size": 8, **overrides})


def test_score_sums_the_personalised_codewords_of_the_items_codes(small_data, small_batch):
    batch, _ = small_batch
    model = _model(small_data).eval()
    with torch.no_grad():
        user = model.encode_user(model.user_inputs(batch))
        items = model.encode_items(model.item_inputs(batch))
        behaviours, mask = model._behaviours(model.user_inputs(batch))
        for row in (0, 5):
            by_hand = sum(
                model.student_attention(model.codebooks[level, code].reshape(1, 1, -1), behaviours[row : row + 1], mask[row : row + 1])[0, 0]
                for level, code in enumerate(items["codes"][row].tolist())
            )
            got = model.approximate_attention(user["personal_codebook"][row : row + 1], items["codes"][row].reshape(1, 1, -1))
            torch.testing.assert_close(got[0, 0], by_hand, atol=1e-5, rtol=1e-5)


def test_distillation_target_is_stop_gradient_and_alignment_can_be_switched_off(small_data):
    batch = {k: v for k, v in small_data.train.subset(np.arange(64)).to_tensors().items()}
    model = _model(small_data, teacher_weight=0.0).train()
    output = model(batch)
    assert set(output.aux_losses) == {"teacher_bce", "distill", "commitment", "align"}
    output.aux_losses["distill"].backward()
    # Distillation moves the student, never the teacher it imitates.
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.teacher_attention.parameters())
    assert model.student_attention.key.weight.grad.abs().sum() > 0
    off = _model(small_data, align=False).train()
    assert "align" not in off(batch).aux_losses


def test_kmeans_initialises_codebooks_on_the_first_training_batch(small_data):
    model = _model(small_data)
    before = model.codebooks.detach().clone()
    assert not bool(model.codebooks_ready)
    model.train()(small_data.train.subset(np.arange(128)).to_tensors())
    assert bool(model.codebooks_ready) and not torch.equal(before, model.codebooks.detach())
    random_init = _model(small_data, codebook_init="random")
    assert bool(random_init.codebooks_ready)


def test_tarq_needs_a_behaviour_sequence():
    from prerank.data.pipeline import ProtocolConfig
    from prerank.data.synthetic import load_synthetic

    data = load_synthetic(ProtocolConfig(seq_len=0), n_users=20, n_items=10, events_per_user=5, embed_dim=4)
    with pytest.raises(ValueError, match="needs a behaviour-sequence"):
        create_model("tarq", data.schema)


def _list_batch(small_data, rows=16, n=5):
    """Pointwise user rows with N catalogue items each (item features [B, N]) and random labels."""
    batch = small_data.train.subset(np.arange(rows)).to_tensors()
    catalogue = small_data.items.to_tensors()
    item_rows = torch.randint(0, len(small_data.item_raw_ids), (rows, n), generator=torch.Generator().manual_seed(2))
    for f in small_data.schema.item_features:
        batch[f.name] = gather_items({f.name: catalogue[f.name]}, item_rows)[f.name]
    batch[LABEL] = (torch.rand(rows, n, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    return batch


@pytest.mark.parametrize("lists", [False, True])
def test_training_forward_with_own_codeword_queries_equals_the_serving_composition(small_data, lists):
    batch = _list_batch(small_data) if lists else small_data.train.subset(np.arange(64)).to_tensors()
    model = _model(small_data).train()
    fast = model(batch).logits  # initialises the codebooks; its codebook update waits for the next step
    with torch.no_grad():  # the serving composition from all L·K codeword queries, same batch-norm mode
        user_state = model.encode_user(model.user_inputs(batch))
        item_state = model.encode_item_lists(model.item_inputs(batch))
        memory = (user_state["memory_keys"], user_state["memory_values"], user_state["memory_mask"])
        L, K = model.codebooks.shape[:2]
        personal = model.student_attention.attend(model.student_attention.queries(model.codebooks).flatten(0, 1), memory)
        h_hat = model.approximate_attention(personal.reshape(len(personal), L, K, -1), item_state["codes"])
        full = model._compose(user_state["vector"], item_state, h_hat)
    assert fast.shape == full.shape == ((16, 5) if lists else (64, 1))
    torch.testing.assert_close(fast.detach(), full, atol=1e-5, rtol=1e-5)


def test_alignment_on_a_sub_batch_equals_the_definition_on_those_rows(small_data):
    batch = small_data.train.subset(np.arange(64)).to_tensors()
    model = _model(small_data, align_rows=10, distill_weight=0.0).train()
    got = model(batch).aux_losses["align"]
    with torch.no_grad():
        sub = {k: v[:10] for k, v in batch.items()}
        personal = model.eval().encode_user(model.user_inputs(sub))["personal_codebook"]  # attention has no train-mode layer
        h_ta, _ = model.teacher(sub)  # batch norm sits only in the towers, which neither term uses
        vectors = model.item_encoder(model.towers.item_fields(model.item_inputs(sub)).flat())
        codes, residuals = residual_quantize(vectors, model.codebooks)
        expected = 0.0
        target = h_ta[:, 0]
        for level in range(model.config.levels):
            p = torch.softmax(-((residuals[:, level, None] - model.codebooks[level]) ** 2).sum(-1), -1)
            q = torch.softmax(-((target[:, None] - personal[:, level]) ** 2).sum(-1), -1)
            expected += float(symmetric_kl(p, q).mean())
            target = target - personal[torch.arange(10), level, codes[:, level]]
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_ema_codebook_step_by_hand():
    ema_sum = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # L=1, K=2
    ema_count = torch.tensor([[1.0, 1.0]])
    codes = torch.tensor([[0], [0], [1]])
    residuals = torch.tensor([[[3.0, 0.0]], [[5.0, 0.0]], [[0.0, 2.0]]])
    new_sum, new_count, books = ema_codebook_step(ema_sum, ema_count, codes, residuals, decay=0.5, eps=0.0)
    torch.testing.assert_close(new_count, torch.tensor([[1.5, 1.0]]))  # .5·1 + .5·2, .5·1 + .5·1
    torch.testing.assert_close(new_sum, torch.tensor([[[4.5, 0.0], [0.0, 1.5]]]))  # .5·1 + .5·8, .5·1 + .5·2
    torch.testing.assert_close(books, torch.tensor([[[3.0, 0.0], [0.0, 1.5]]]))


def test_codebook_updates_wait_for_the_next_step_and_dead_codes_restart_on_batch_residuals(small_data):
    batch = small_data.train.subset(np.arange(64)).to_tensors()
    model = _model(small_data, levels=1, codebook_size=8, restart_after=1, align=False, codebook_init="random").train()
    model.codebooks[0, 7] = 100.0  # far from every item vector: never used
    model(batch)
    initial = model.codebooks.clone()
    model(batch)  # the first step's update is applied here, before this step's graph is built
    with torch.no_grad():
        vectors = model.item_encoder(model.towers.item_fields(model.item_inputs(batch)).flat())
        codes, _ = residual_quantize(vectors, initial)
    assert not torch.equal(model.codebooks, initial)
    used = torch.zeros(8, dtype=torch.bool)
    used[codes[:, 0].unique()] = True
    assert not used[7]
    # An unused codeword (after restart_after=1 step) is moved onto one of the batch's item vectors.
    distance = torch.cdist(model.codebooks[0, ~used], vectors).min(-1).values
    assert (distance < 1e-3).all()
    assert len(model.batch_utilisation) == 2 and len(model.batch_utilisation[0]) == 1


def test_codebook_loss_mode_trains_codebooks_by_gradient(small_data):
    batch = small_data.train.subset(np.arange(64)).to_tensors()
    model = _model(small_data, codebook_update="loss", dead_code_restart=False).train()
    output = model(batch)
    assert {"codebook", "commitment"} <= set(output.aux_losses)
    output.aux_losses["codebook"].backward()
    assert model.codebooks.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.item_encoder.parameters())  # sg(r) in the codebook term


def test_composed_teacher_is_the_served_composition_with_exact_attention(small_data, small_batch):
    batch, _ = small_batch
    model = _model(small_data).eval()
    with torch.no_grad():
        h_ta, logit = model.teacher(batch)
        user = model.encode_user(model.user_inputs(batch))
        items = model.encode_item_lists(model.item_inputs(batch))
        by_hand = (user["vector"][:, None] * items["vector"]).sum(-1) * model.similarity_scale.log_inv_temperature.exp() \
            + (h_ta * items["head_key"]).sum(-1) + model.bias
        vectors = model.item_encoder(model.towers.item_fields(model.item_inputs(batch)).flat())
        behaviours, mask = model._behaviours(model.user_inputs(batch))
        exact = model.teacher_attention(vectors[:, None], behaviours, mask)
    torch.testing.assert_close(logit, by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_ta, exact)
    mlp = _model(small_data, teacher_head="mlp", teacher_query="separate").eval()
    with torch.no_grad():
        assert mlp.teacher(batch)[1].shape == (len(batch[LABEL]), 1)


def test_cached_codeword_queries_follow_weight_changes(small_data, small_batch):
    batch, _ = small_batch
    model = _model(small_data).eval()
    user = model.user_inputs(batch)
    with torch.inference_mode():
        first = model.encode_user(user)["personal_codebook"]
        again = model.encode_user(user)["personal_codebook"]
    torch.testing.assert_close(first, again)
    with torch.no_grad():
        model.student_attention.query.weight.mul_(2.0)
    with torch.inference_mode():
        changed = model.encode_user(user)["personal_codebook"]
    with torch.enable_grad():
        reference = model.encode_user(user)["personal_codebook"]
    assert not torch.allclose(first, changed)
    torch.testing.assert_close(changed, reference.detach())


def test_heads_must_divide_the_embedding_dim(small_data):
    with pytest.raises(ValueError, match="must divide"):
        _model(small_data, attention_heads=3)


def test_normalised_alignment_distribution_is_scale_free(small_data):
    model = _model(small_data, align_normalise=True, align_temperature=0.5)
    distances = torch.tensor([[1.0, 2.0, 3.0]])
    expected = torch.softmax(-torch.tensor([[0.5, 1.0, 1.5]]) / 0.5, -1)
    torch.testing.assert_close(model._code_distribution(distances), expected)
    torch.testing.assert_close(model._code_distribution(distances * 1e-4), expected)
    official = _model(small_data)
    torch.testing.assert_close(official._code_distribution(distances), torch.softmax(-distances, -1))
