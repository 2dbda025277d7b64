"""The pipeline's additive parts: leave-last-out, sampled negatives, context from the log,
pre-built sequences, vocabulary min_count, and top-K evaluation through the serving path."""

import numpy as np
import pandas as pd
import pytest
import torch

from prerank.data.pipeline import (
    ITEM, USER, FeatureSpec, ProtocolConfig, build_samples, implicit_protocol, split_leave_last_out,
)
from prerank.data.schema import OOV_INDEX, PAD_INDEX, Kind, Side
from prerank.data.synthetic import generate_log, synthetic_features
from prerank.data.table import GRADE, ITEM_ROW, LABEL, TIMESTAMP
from prerank.metrics import ndcg_at_k, recall_at_k
from prerank.models.base import create_model
from prerank.train.ranking import ranking_report


def test_leave_last_out_split():
    user = np.array([1, 1, 1, 1, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(split_leave_last_out(user), [0, 0, 1, 2, 0, 0, 0, 1, 2])


def implicit_log(n_users=30, n_items=25, events=8, seed=1):
    log, users, items = generate_log(n_users=n_users, n_items=n_items, events_per_user=events, seed=seed)
    log = log.drop(columns=[GRADE])
    log[LABEL] = np.float32(1.0)
    return log, users, items


def test_sampled_negatives_avoid_the_users_items_keep_their_positives_split_and_time():
    log, users, items = implicit_log()
    protocol = ProtocolConfig(name="leave_last_out", seq_len=4, negatives=3, seed=5)
    data = build_samples(log, users, items, synthetic_features(4), protocol, "implicit")
    touched = log.groupby(USER)[ITEM].agg(set)
    uid = {i + 2: raw for i, raw in enumerate(data.vocabs["user_id"])}
    for name, table in data.splits.items():
        frame = pd.DataFrame({"user": [uid[u] for u in table["user_id"]], "item": data.item_raw_ids[table[ITEM_ROW]],
                              "label": table[LABEL], "t": table[TIMESTAMP]})
        pos, neg = frame[frame.label == 1], frame[frame.label == 0]
        assert len(neg) == 3 * len(pos), name
        assert not any(item in touched[user] for user, item in zip(neg.user, neg.item))
        # Each negative shares user and timestamp with a positive of the same split.
        assert set(zip(neg.user, neg.t)) <= set(zip(pos.user, pos.t))
        if name != "train":
            assert (pos.groupby("user").size() == 1).all()  # leave-last-out: one positive per user
    # Negatives never enter the behaviour sequence: sequences only hold items the user touched.
    item_of = {i + 2: raw for i, raw in enumerate(data.vocabs["item_id"])}
    table = data.train
    for row in range(0, len(table), 37):
        user = uid[table["user_id"][row]]
        assert {item_of[i] for i in table["hist_items"][row] if i > OOV_INDEX} <= touched[user]
    again = build_samples(log, users, items, synthetic_features(), protocol, "implicit")
    np.testing.assert_array_equal(again.train[ITEM_ROW], data.train[ITEM_ROW])


def test_implicit_protocol_defaults_and_refuses_zero_negatives():
    assert implicit_protocol(None, "x").negatives == 4
    assert implicit_protocol(ProtocolConfig(negatives=2), "x").negatives == 2
    with pytest.raises(ValueError, match="implicit feedback.*negatives >= 1"):
        implicit_protocol(ProtocolConfig(negatives=0), "x")


def test_context_from_log_prebuilt_sequence_and_min_count():
    log = pd.DataFrame({USER: [1] * 5 + [2] * 5, ITEM: [10, 11, 12, 10, 11, 12, 10, 13, 11, 12],
                        TIMESTAMP: list(range(5)) * 2, LABEL: [1, 0, 1, 1, 0, 1, 1, 0, 1, 1],
                        "device": ["a", "b", "a", "c", "a", "b", "b", "a", "z", "a"],
                        "hist": [[], [10], [10, 99], [10, 12], [12], [], [12], [12, 10], [10], [11, 10]]})
    users = pd.DataFrame({"segment": ["x", "y"]}, index=pd.Index([1, 2], name=USER))
    items = pd.DataFrame({"brand": ["p", "p", "q", "r"]}, index=pd.Index([10, 11, 12, 13], name=ITEM))
    specs = [FeatureSpec("user_id", Side.USER, Kind.CATEGORICAL), FeatureSpec("segment", Side.USER, Kind.CATEGORICAL),
             FeatureSpec("device", Side.CONTEXT, Kind.CATEGORICAL, min_count=2),
             FeatureSpec("item_id", Side.ITEM, Kind.CATEGORICAL), FeatureSpec("brand", Side.ITEM, Kind.CATEGORICAL)]
    protocol = ProtocolConfig(name="leave_last_out", seq_len=2)
    data = build_samples(log, users, items, specs, protocol, "toy", sequence_column="hist")
    assert [f.name for f in data.schema.side("context")] == ["device"]
    # Train rows: device a,b,a (user 1) and b,b,a (user 2): a and b seen twice, c/z never -> OOV.
    assert data.vocabs["device"] == ["a", "b"]
    np.testing.assert_array_equal(data.train["device"], [2, 3, 2, 3, 3, 2])
    assert data.test["device"][0] == 2 and data.valid["device"][0] == OOV_INDEX  # user 1 valid row is 'c'
    assert data.valid["device"][1] == OOV_INDEX  # user 2 valid row is 'z'
    # The pre-built sequence: last 2 raw ids, left-padded; 99 is unknown (OOV).
    code = {raw: i + 2 for i, raw in enumerate(data.vocabs["item_id"])}
    np.testing.assert_array_equal(data.train["hist_items"][:3], [[PAD_INDEX, PAD_INDEX], [PAD_INDEX, code[10]],
                                                                [code[10], OOV_INDEX]])
    # User 2's item 13 appears only at train; the valid row's sequence [10] comes through.
    assert list(data.valid["hist_items"][1]) == [PAD_INDEX, code[10]]


def test_log_rows_naming_unknown_items_are_an_error():
    log, users, items = implicit_log()
    with pytest.raises(ValueError, match="missing from the item table"):
        build_samples(log, users, items.iloc[:-3], synthetic_features(4), ProtocolConfig(seq_len=0), "x")


@pytest.fixture(scope="module")
def ranked():
    log, users, items = implicit_log(n_users=25, n_items=30, events=6, seed=2)
    data = build_samples(log, users, items, synthetic_features(4), ProtocolConfig(seq_len=3, negatives=2),
                         "implicit")
    torch.manual_seed(0)
    model = create_model("two_tower", data.schema, {"hidden": [8]}).eval()
    return data, model


def test_full_ranking_matches_brute_force_forward(ranked):
    data, model = ranked
    report = ranking_report(model, data, "test", ks=(3, 5), candidates="full")
    test = data.test
    uid = test["user_id"]
    items = data.items.to_tensors()
    m = len(data.item_raw_ids)
    scores, relevance, mask = [], [], []
    for user in np.unique(uid[test[LABEL] > 0]):
        rows = np.flatnonzero((uid == user) & (test[LABEL] > 0))
        first = rows[0]
        batch = {f.name: torch.as_tensor(test[f.name][[first] * m]) for f in data.schema.user_features}
        batch.update({f.name: items[f.name] for f in data.schema.item_features})
        with torch.no_grad():
            scores.append(model(batch).logits.reshape(-1).numpy())
        rel = np.zeros(m)
        rel[test[ITEM_ROW][rows]] = 1
        keep = np.ones(m, dtype=bool)
        for other in (data.train, data.valid):
            seen = other[ITEM_ROW][(other["user_id"] == user) & (other[LABEL] > 0)]
            keep[seen] = False
        keep[rel > 0] = True
        relevance.append(rel)
        mask.append(keep)
    scores, relevance, mask = map(np.array, (scores, relevance, mask))
    assert report["requests"] == len(scores)
    for k in (3, 5):
        assert report[f"recall@{k}"] == pytest.approx(recall_at_k(scores, relevance, k, mask), abs=1e-6)
        assert report[f"ndcg@{k}"] == pytest.approx(ndcg_at_k(scores, relevance, k, mask), abs=1e-6)


def test_sampled_ranking_holds_every_relevant_item_and_is_seeded(ranked):
    data, model = ranked
    # With K >= relevant + sampled candidates, everything relevant is in the top K.
    assert ranking_report(model, data, "test", ks=(50,), candidates=4)["recall@50"] == 1.0
    a = ranking_report(model, data, "test", ks=(2,), candidates=4, seed=3)
    b = ranking_report(model, data, "test", ks=(2,), candidates=4, seed=3)
    assert a == b and a["candidates"] == "relevant + 4 sampled"
    with pytest.raises(ValueError, match="candidates"):
        ranking_report(model, data, "test", candidates=0)
