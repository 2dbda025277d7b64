import math

import numpy as np
import pytest
import torch

from prerank.data.table import LABEL
from prerank.models import create_model
from prerank.models.tarq import codebook_usage, residual_kmeans, residual_quantize, symmetric_kl


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
    assert set(output.aux_losses) == {"teacher_bce", "distill", "align"}
    output.aux_losses["distill"].backward()
    # Distillation moves the student, never the teacher it imitates.
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.teacher_attention.parameters())
    assert model.student_attention.attention.in_proj_weight.grad.abs().sum() > 0
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

    data = load_synthetic(ProtocolConfig(seq_len=0, embed_dim=4), n_users=20, n_items=10, events_per_user=5)
    with pytest.raises(ValueError, match="needs a behaviour-sequence"):
        create_model("tarq", data.schema)
