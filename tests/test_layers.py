import math

import pytest
import torch

from prerank.models.layers import MLP, LearnableTemperature, TargetAttention, masked_mean


def test_masked_mean_ignores_padding_and_empty_rows():
    values = torch.tensor([[[1.0], [3.0], [100.0]], [[5.0], [7.0], [9.0]]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(masked_mean(values, mask), torch.tensor([[2.0], [0.0]]))


def test_target_attention_ignores_masked_positions_and_broadcasts_queries():
    torch.manual_seed(0)
    attention = TargetAttention(4, hidden=(8,)).eval()
    keys = torch.randn(2, 5, 4)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    query = torch.randn(2, 4)
    out = attention(query, keys, mask)
    changed = keys.clone()
    changed[0, 2:] = 99.0  # masked positions: no effect
    torch.testing.assert_close(attention(query, changed, mask), out)
    # Three queries per row against the same keys equal three separate calls.
    queries = torch.randn(2, 3, 4)
    many = attention(queries, keys.unsqueeze(1).expand(2, 3, 5, 4), mask.unsqueeze(1).expand(2, 3, 5))
    for j in range(3):
        torch.testing.assert_close(many[:, j], attention(queries[:, j], keys, mask))
    soft = TargetAttention(4, hidden=(8,), softmax=True)
    empty = soft(query, keys, torch.zeros(2, 5, dtype=torch.bool))
    torch.testing.assert_close(empty, torch.zeros(2, 4))


def test_mlp_batch_norm_accepts_extra_leading_dims():
    mlp = MLP(6, (5, 3), batch_norm=True, output_activation=False).eval()
    x = torch.randn(4, 7, 6)
    torch.testing.assert_close(mlp(x), mlp(x.reshape(28, 6)).reshape(4, 7, 3))


def test_target_attention_many_queries_equals_expanded_forward():
    torch.manual_seed(0)
    keys = torch.randn(3, 6, 4)
    mask = torch.rand(3, 6) > 0.3
    for softmax, hidden in ((False, (8, 5)), (True, (8,)), (False, ())):
        attention = TargetAttention(4, hidden=hidden, softmax=softmax)
        shared = torch.randn(5, 4)  # the same 5 queries for every row
        per_row = torch.randn(3, 2, 4)  # 2 queries per row
        for queries in (shared, per_row):
            k = queries.shape[-2]
            expected = attention(queries.expand(3, k, 4), keys.unsqueeze(1).expand(3, k, 6, 4), mask.unsqueeze(1).expand(3, k, 6))
            torch.testing.assert_close(attention.many_queries(queries, keys, mask), expected, atol=1e-5, rtol=1e-5)


def test_learnable_temperature_is_the_old_clamped_formula():
    # The five models' former inline scale: exp(min(-log tau, log 100)).
    for tau in (1.0, 0.05, 0.01, 0.001):
        scale = LearnableTemperature(tau)()
        assert scale.shape == ()
        assert scale.item() == torch.tensor(-math.log(tau)).clamp(max=math.log(100.0)).exp().item()
    assert LearnableTemperature(0.001)().item() == pytest.approx(100.0)  # capped at tau = 0.01
    learned = LearnableTemperature(0.05)
    learned().backward()
    assert learned.log_inv_temperature.grad.item() == pytest.approx(20.0)  # d exp(x) / dx at x = log 20
    fixed = LearnableTemperature(1.0, learnable=False)
    assert not fixed.log_inv_temperature.requires_grad and list(fixed.state_dict()) == ["log_inv_temperature"]
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        LearnableTemperature(0.0)


def test_folding_batch_norm_keeps_the_eval_forward_and_removes_the_norm_and_dropout_layers():
    torch.manual_seed(0)
    mlp = MLP(6, (5, 4, 3), batch_norm=True, dropout=0.2, output_activation=False)
    for _ in range(3):  # move the running statistics and affine parameters off their initial values
        mlp(torch.randn(32, 6) * 3 + 1).sum().backward()
        with torch.no_grad():
            for p in mlp.parameters():
                p -= 0.1 * p.grad
    mlp.eval()
    x = torch.randn(2, 7, 6)
    expected = mlp(x)
    mlp.fold_batch_norm()
    assert [type(layer).__name__ for layer in mlp.net] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=1e-5)


def test_pooled_lookup_is_the_masked_mean_of_the_embeddings_and_gets_the_same_gradient():
    from prerank.data.schema import PAD_INDEX
    from prerank.models.layers import EmbeddingBank
    from prerank.data.pipeline import ProtocolConfig
    from prerank.data.synthetic import load_synthetic

    schema = load_synthetic(ProtocolConfig(seq_len=6), n_users=20, n_items=30, events_per_user=10).schema
    bag = schema.sequence_feature
    bank = EmbeddingBank(schema, init_std=1.0)
    ids = torch.randint(1, bag.vocab_size, (2, 3, bag.max_len))
    ids[0, 0, 2:] = PAD_INDEX
    ids[1, 2] = PAD_INDEX  # an empty bag pools to zeros
    pooled = bank.pooled(bag, ids)
    reference = masked_mean(bank.lookup(bag, ids), ids != PAD_INDEX)
    torch.testing.assert_close(pooled, reference)
    assert pooled[1, 2].abs().sum() == 0
    weight = bank.tables[bag.vocab].weight
    (grad_pooled,) = torch.autograd.grad(pooled.square().sum(), weight)
    (grad_reference,) = torch.autograd.grad(reference.square().sum(), weight)
    torch.testing.assert_close(grad_pooled, grad_reference)
