"""The evaluation path: whole-catalogue scoring in tiles equals scoring gathered rows for every
model, the sparse top-K ranking equals the dense metrics, sampled candidates avoid what the user
touched, and the candidate choice reaches `prerank train`."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import ndcg_score
from typer.testing import CliRunner

from prerank.cli import app
from prerank.data.pipeline import ProtocolConfig, build_samples
from prerank.data.synthetic import synthetic_features
from prerank.metrics import ranking_metrics
from prerank.models import REGISTRY, scoring
from prerank.models.scoring import item_table, score_requests
from prerank.train.ranking import (
    _draw_unseen,
    _Pairs,
    ranking_candidates,
    ranking_report,
)
from prerank.train.trainer import TrainConfig
from tests.test_contract import MODELS, build
from tests.test_owndata import EXAMPLE
from tests.test_pipeline_ext import implicit_log


@pytest.mark.parametrize("name", MODELS)
def test_catalogue_scoring_in_tiles_equals_scoring_the_gathered_catalogue(name, small_data, monkeypatch):
    model = build(name, small_data.schema).eval()
    table = item_table(model, small_data.items.to_tensors())
    users = small_data.test.subset(np.arange(23)).to_tensors()
    n_items = len(small_data.item_raw_ids)
    every_item = np.tile(np.arange(n_items), (23, 1))
    expected = score_requests(model, table, users, every_item, batch_size=23)
    # Tiles much smaller than the catalogue and the block, neither dividing it evenly.
    monkeypatch.setattr(scoring, "CANDIDATE_BUFFER_BYTES", 2000)
    monkeypatch.setattr(scoring, "MIN_CATALOGUE_CHUNK", 7)
    group, chunk = scoring.catalogue_tiling(model, table)
    assert chunk == (n_items if model.listwise else 7) and group < 10
    tiled = score_requests(model, table, users, batch_size=10)
    np.testing.assert_allclose(tiled, expected, rtol=1e-5, atol=1e-5)


def test_a_mask_needs_candidate_rows(small_data):
    model = build("two_tower", small_data.schema)
    table = item_table(model, small_data.items.to_tensors())
    with pytest.raises(ValueError, match="no mask|has none"):
        score_requests(model, table, small_data.test.subset(np.arange(3)).to_tensors(), mask=np.ones((3, 60), dtype=bool))


def test_per_request_ranking_metrics_match_sklearn_with_grades_and_a_mask():
    rng = np.random.default_rng(5)
    scores = rng.random((40, 30))
    relevance = rng.integers(0, 4, (40, 30)) * (rng.random((40, 30)) < 0.2)
    relevance[:, 0] = np.maximum(relevance[:, 0], 1)  # every request has a relevant item
    mask = rng.random((40, 30)) < 0.8
    mask[:, 0] = True
    found = ranking_metrics(scores, relevance, (3, 10), mask)
    for r in range(40):
        kept = mask[r]
        # scikit-learn's NDCG takes linear gains: ours are 2^rel - 1.
        gains, row_scores = (2.0 ** relevance[r][kept] - 1)[None], scores[r][kept][None]
        top = np.argsort(-row_scores[0])
        for k in (3, 10):
            assert found[f"ndcg@{k}"][r] == pytest.approx(ndcg_score(gains, row_scores, k=k))
            relevant = relevance[r][kept] > 0
            assert found[f"recall@{k}"][r] == pytest.approx(relevant[top[:k]].sum() / relevant.sum())


def test_sampled_candidates_are_never_items_the_user_touched():
    rng = np.random.default_rng(0)
    n_items = 12
    request = np.repeat(np.arange(5), 10)
    item = rng.integers(0, n_items, 50)
    touched = _Pairs.of(request, item, n_items)
    drawn = _draw_unseen(rng, 5, 200, touched)
    assert drawn.shape == (5, 200)
    for r in range(5):
        assert not set(drawn[r]) & set(item[request == r])
    every = _Pairs.of(np.zeros(n_items, dtype=int), np.arange(n_items), n_items)
    with pytest.raises(ValueError, match="whole catalogue"):
        _draw_unseen(rng, 1, 3, every)


def test_candidate_choice_resolves_and_bad_choices_fail():
    dataset = ["full", 50]
    assert ranking_candidates("dataset", dataset) == ["full", 50]
    assert ranking_candidates("full", dataset) == ["full"]
    assert ranking_candidates("sampled", dataset) == [50]
    assert ranking_candidates("sampled", ["full"]) == [100]
    assert ranking_candidates("sampled:7", dataset) == [7]
    assert ranking_candidates("none", dataset) == []
    with pytest.raises(ValueError, match="eval_candidates"):
        TrainConfig(eval_candidates="sampled:0")
    with pytest.raises(ValueError, match="eval_candidates"):
        TrainConfig(eval_candidates="everything")


def test_a_two_level_list_model_ranks_the_catalogue_through_its_two_stages(ranked_lttd):
    data, model = ranked_lttd
    report = ranking_report(model, data, "test", ks=(3,), candidates="full", rerank=5)
    assert report["reranked"] == 5 and 0 <= report["recall@3"] <= 1
    with pytest.raises(ValueError, match="rerank"):
        ranking_report(model, data, "test", ks=(10,), candidates="full", rerank=5)
    # Sampled lists are scored as lists, padding masked out of the list context.
    sampled = ranking_report(model, data, "test", ks=(3,), candidates=4)
    assert "reranked" not in sampled and sampled["candidates"] == "relevant + 4 sampled"


def test_a_list_model_that_is_not_two_level_is_refused_the_whole_catalogue(ranked_lttd, monkeypatch):
    data, model = ranked_lttd
    monkeypatch.setattr(type(model), "two_level", False)
    with pytest.raises(ValueError, match="sampled candidates"):
        ranking_report(model, data, "test", ks=(3,), candidates="full")


@pytest.fixture(scope="module")
def ranked_lttd():
    log, users, items = implicit_log(n_users=25, n_items=30, events=6, seed=2)
    data = build_samples(log, users, items, synthetic_features(4), ProtocolConfig(seq_len=3, negatives=2), "implicit")
    assert REGISTRY["lttd"].listwise and REGISTRY["lttd"].two_level
    return data, build("lttd", data.schema).eval()


@pytest.mark.parametrize("choice, expected", [("none", None), ("sampled:5", {"5"}), ("full", {"full"})])
def test_eval_candidates_flag_picks_the_test_ranking(tmp_path, choice, expected):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--dataset", str(EXAMPLE / "implicit.yaml"), "--protocol", "leave_last_out",
                                      "--epochs", "1", "--batch-size", "512", "--set", "hidden=[16]", "--no-progress",
                                      "--eval-candidates", choice, "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    if expected is None:
        assert "test_ranking" not in metrics and "ranking" not in result.output
    else:
        assert set(metrics["test_ranking"]) == expected and "test ranking of 150 users" in result.output
    bad = CliRunner().invoke(app, ["train", "--dataset", str(EXAMPLE / "implicit.yaml"), "--eval-candidates", "most",
                                   "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "eval_candidates" in bad.output and "Traceback" not in bad.output


@pytest.mark.parametrize("name", MODELS)
def test_score_shared_equals_score_over_copies_of_the_list(name, small_data):
    model = build(name, small_data.schema).eval()
    table = item_table(model, small_data.items.to_tensors())
    users = small_data.test.subset(np.arange(5)).to_tensors()
    with torch.no_grad():
        user_state = model.encode_user({f.name: users[f.name] for f in model.schema.user_features})
        chunk = {k: v[3:20] for k, v in table.items()}
        shared = model.score_shared(user_state, chunk)
        copies = model.score(user_state, {k: v.unsqueeze(0).expand(5, *v.shape) for k, v in chunk.items()})
    if name not in ("two_tower", "dat", "inttower"):
        assert shared is None  # the default: no faster path than `score`
        return
    assert shared.shape == copies.shape == (5, 17)
    torch.testing.assert_close(shared, copies, rtol=1e-5, atol=1e-5)
