import gzip
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from prerank.data.movielens import load_movielens, read_double_colon
from prerank.data.pipeline import ProtocolConfig, behaviour_sequences, build_samples, split_temporal
from prerank.data.schema import OOV_INDEX, PAD_INDEX, DenseScaler, Feature, Kind, Schema
from prerank.data.synthetic import generate_log, load_synthetic, synthetic_features
from prerank.data.table import ITEM_ROW, LABEL, TIMESTAMP, DataError, load_prepared

ML_USERS = "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n"
ML_MOVIES = "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Jumanji (1995)::Adventure|Children's|Fantasy\n" \
            "3::Heat: The Sequel (1995)::Action|Crime\n4::Unknown Film::Drama\n"


def write_ml(folder: Path, ratings_lines: list[str], gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "users.dat").write_text(ML_USERS, encoding="latin-1")
    (folder / "movies.dat").write_text(ML_MOVIES, encoding="latin-1")
    body = "".join(line + "\n" for line in ratings_lines)
    if gz:
        with gzip.open(folder / "ratings.dat.gz", "wt", encoding="latin-1") as fh:
            fh.write(body)
    else:
        (folder / "ratings.dat").write_text(body, encoding="latin-1")
    return folder


def ml_ratings() -> list[str]:
    rows = []
    for user in (1, 2, 3):
        for t, (movie, rating) in enumerate([(1, 5), (2, 3), (3, 4), (4, 1), (1, 2), (2, 5), (3, 5), (4, 4), (2, 2), (3, 1), (1, 4), (4, 5)]):
            rows.append(f"{user}::{movie}::{rating}::{1000 + 10 * t + user}")
    return rows


def test_movielens_loader_labels_features_and_gzip(tmp_path):
    for gz in (False, True):
        folder = write_ml(tmp_path / f"ml{gz}", ml_ratings(), gz=gz)
        data = load_movielens(folder, ProtocolConfig(seq_len=5))
        total = sum(len(t) for t in data.splits.values())
        assert total == 3 * 11  # the one rating of 3 per user is dropped
        names = {side: [f.name for f in data.schema.side(side)] for side in ("user", "item")}
        assert names["user"] == ["user_id", "gender", "age", "occupation", "hist_items"]
        assert names["item"] == ["movie_id", "genres", "year"]
        assert data.schema["genres"].max_len == 3
        assert data.meta["dataset_label"] == "ML-1M (users 1–3)"
        # Labels: rating > 3 positive.
        for t in data.splits.values():
            assert set(np.unique(t[LABEL])) <= {0.0, 1.0}
            assert ((t["grade"] > 3) == (t[LABEL] == 1)).all()
        # "Heat: The Sequel" keeps its colon-containing title parsed; "Unknown Film" has no year.
        assert len(data.item_raw_ids) == 4


def test_malformed_lines_name_file_line_and_problem(tmp_path):
    lines = ml_ratings()
    lines[4] = "1::2::five::1004"
    folder = write_ml(tmp_path / "bad", lines)
    with pytest.raises(DataError, match=r"ratings.dat, line 5: field 'rating' is not an integer: 'five'"):
        load_movielens(folder)
    lines = ml_ratings()
    lines[3] = "1::2::4.7::1003"  # not a star rating: it must not train as a 4
    folder = write_ml(tmp_path / "fraction", lines)
    with pytest.raises(DataError, match=r"ratings.dat, line 4: field 'rating' is not an integer: '4.7'"):
        load_movielens(folder)
    lines = ml_ratings()
    lines[2] = "1::2::5"
    folder = write_ml(tmp_path / "short", lines)
    with pytest.raises(DataError, match=r"ratings.dat.*line 3"):
        load_movielens(folder)
    lines = ml_ratings() + ["1::99::4::5000"]
    folder = write_ml(tmp_path / "unknown", lines)
    with pytest.raises(DataError, match=r"line 37: item id 99 is not in movies.dat"):
        load_movielens(folder)
    with pytest.raises(DataError, match="no ratings.dat"):
        load_movielens(tmp_path / "nowhere")
    (tmp_path / "users_bad").mkdir()
    folder = write_ml(tmp_path / "users_bad", ml_ratings())
    (folder / "users.dat").write_text("1::F::1::10\n")
    with pytest.raises(DataError, match=r"users.dat, line 1: expected 5"):
        load_movielens(folder)


def test_cache_is_reused_and_written_atomically(tmp_path):
    folder = write_ml(tmp_path / "ml", ml_ratings())
    first = load_movielens(folder, cache_dir=tmp_path / "cache")
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")
    again = load_prepared(entries[0])
    for split in ("train", "valid", "test"):
        for col, values in first.splits[split].columns.items():
            np.testing.assert_array_equal(values, again.splits[split][col])
    assert again.schema == first.schema


def test_dense_scaler_maps_the_fitted_range_to_unit_and_missing_to_its_value():
    scaler = DenseScaler.fit(np.array([4.0, np.nan, 10.0, 6.0]))
    assert (scaler.lo, scaler.hi, scaler.missing) == (4.0, 10.0, 0.0)
    np.testing.assert_allclose(scaler.apply([4.0, 7.0, 10.0, 13.0, np.nan]), [0.0, 0.5, 1.0, 1.5, 0.0])
    assert scaler.apply(np.zeros((2, 3))).shape == (2, 3) and scaler.apply([1.0]).dtype == np.float32
    np.testing.assert_allclose(DenseScaler.fit(np.array([3.0, 3.0])).apply([3.0, 5.0]), [0.0, 2.0])  # constant: shift only
    assert DenseScaler.fit(np.array([np.nan])) == DenseScaler()  # nothing to fit: the identity
    with pytest.raises(ValueError, match="finite"):
        DenseScaler(0.0, float("inf"))
    with pytest.raises(ValueError, match="below lo"):
        DenseScaler(2.0, 1.0)


def test_dense_features_carry_their_scaler_through_schema_cache_and_dicts(tmp_path):
    data = load_synthetic(ProtocolConfig(seq_len=0), n_users=60, n_items=30, events_per_user=10, embed_dim=4)
    log, users, items = generate_log(60, 30, 10, seed=0)
    scaler = data.schema["popularity"].scaler
    # Fitted on the items of train rows, and the catalogue column is that scaler over the raw values.
    train_items = items.index[np.unique(data.train[ITEM_ROW])]
    raw_train = items.loc[train_items, "popularity"].to_numpy()
    assert (scaler.lo, scaler.hi) == (raw_train.min(), raw_train.max())
    np.testing.assert_array_equal(data.items["popularity"], scaler.apply(items["popularity"].to_numpy()))
    assert Schema.from_dict(data.schema.to_dict()) == data.schema
    # A schema written before dense features had scalers does not load silently.
    old = data.schema.to_dict()
    for f in old["features"]:
        f.pop("scaler")
    with pytest.raises(ValueError, match="dense feature 'popularity' has no scaler"):
        Schema.from_dict(old)
    with pytest.raises(ValueError, match="only dense features take a scaler"):
        Feature("x", "user", "categorical", 10, 4, scaler=DenseScaler())


def test_temporal_split_takes_each_users_latest_events():
    user = np.repeat([1, 2, 3], [20, 10, 2])
    split = split_temporal(user, 0.1, 0.1)
    assert list(split[:20]) == [0] * 16 + [1, 1, 2, 2]
    assert list(split[20:30]) == [0] * 8 + [1, 2]
    assert list(split[30:]) == [0, 0]  # too few events to split


def test_behaviour_sequence_holds_only_strictly_earlier_positives():
    user = np.array([1, 1, 1, 1, 1, 2, 2])
    time = np.array([10, 20, 20, 30, 40, 5, 6])
    positive = np.array([1, 1, 1, 0, 1, 1, 1], dtype=bool)
    item = np.array([11, 12, 13, 14, 15, 21, 22])
    seq = behaviour_sequences(user, time, positive, item, max_len=2)
    expected = [[0, 0], [0, 11], [0, 11], [12, 13], [12, 13], [0, 0], [0, 21]]
    np.testing.assert_array_equal(seq, expected)


def test_temporal_protocol_uses_no_information_from_at_or_after_an_evaluated_row():
    """Brute force over every evaluated row: its behaviour sequence equals the user's positive
    events strictly before its timestamp, and its ids are encoded with train-only vocabularies."""
    log, users, items = generate_log(n_users=60, n_items=40, events_per_user=15, seed=5)
    # Shared timestamps (two events a slot) make the strictness matter.
    log[TIMESTAMP] = log[TIMESTAMP] // 120
    data = build_samples(log, users, items, synthetic_features(4), ProtocolConfig(seq_len=6), "synthetic")
    log = log.sort_values(["user", TIMESTAMP], kind="stable")
    train_items = set(np.asarray(data.item_raw_ids)[np.unique(data.train[ITEM_ROW])])
    vocab = {raw: i + 2 for i, raw in enumerate(data.vocabs["item_id"])}
    assert set(data.vocabs["item_id"]) == train_items
    for split in ("valid", "test"):
        table = data.splits[split]
        for row in range(len(table)):
            uid = data.vocabs["user_id"][table["user_id"][row] - 2]
            t = table[TIMESTAMP][row]
            events = log[(log["user"] == uid) & (log[TIMESTAMP] < t) & (log[LABEL] > 0)]
            expected = [vocab.get(i, OOV_INDEX) for i in events["item"].to_numpy()[-6:]]
            got = [i for i in table["hist_items"][row] if i != PAD_INDEX]
            assert got == expected, (split, row)
            raw_item = data.item_raw_ids[table[ITEM_ROW][row]]
            assert table["item_id"][row] == vocab.get(raw_item, OOV_INDEX)
    # Every evaluated event comes after all of that user's training events.
    for split in ("valid", "test"):
        latest_train = pd.Series(data.train[TIMESTAMP]).groupby(data.train["user_id"]).max()
        ev = pd.Series(data.splits[split][TIMESTAMP]).groupby(data.splits[split]["user_id"]).min()
        assert (ev >= latest_train.reindex(ev.index)).all()


def test_global_time_split_is_one_cutoff_for_every_user_and_keeps_a_moment_together():
    from prerank.data.pipeline import split_global_time

    time = np.array([1, 2, 3, 4, 5, 6, 7, 8, 8, 8])
    # 10 events, 20% test: the cutoff is the time of the 9th event (8), and all three 8s are test;
    # the valid cutoff (the 8th event) is also an 8, so the tie leaves validation empty.
    assert list(split_global_time(time, 0.1, 0.2)) == [0] * 7 + [2] * 3
    assert list(split_global_time(time, 0.2, 0.1)) == [0] * 7 + [2] * 3
    assert list(split_global_time(np.arange(10), 0.2, 0.1)) == [0] * 7 + [1] * 2 + [2]
    assert list(split_global_time(time, 0.1, 0.2, valid_from=3, test_from=6)) == [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="cutoffs of protocol global_time"):
        ProtocolConfig(name="temporal", valid_from=1, test_from=2)
    with pytest.raises(ValueError, match="both valid_from and test_from"):
        ProtocolConfig(name="global_time", test_from=2)


def test_global_time_rows_before_a_cutoff_ignore_every_event_after_it():
    """Perturbing or removing the events at or after the test cutoff changes no train or valid row;
    the same for the valid cutoff and the train rows. No row is trained on after an evaluated one."""
    log, users, items = generate_log(n_users=60, n_items=40, events_per_user=15, seed=5)
    times = np.sort(log[TIMESTAMP].to_numpy())
    valid_from, test_from = int(times[int(len(times) * 0.8)]), int(times[int(len(times) * 0.9)])
    protocol = ProtocolConfig(name="global_time", seq_len=6, valid_from=valid_from, test_from=test_from)

    def rows(frame, split):
        data = build_samples(frame, users, items, synthetic_features(4), protocol, "synthetic")
        table = data.splits[split]
        raw_user = np.asarray(data.vocabs["user_id"], dtype=object)[table["user_id"] - 2]
        return {(u, t, data.item_raw_ids[i]): (lab, tuple(h)) for u, t, i, lab, h in
                zip(raw_user, table[TIMESTAMP], table[ITEM_ROW], table[LABEL], map(tuple, table["hist_items"]))}, data

    base_train, data = rows(log, "train")
    assert data.train[TIMESTAMP].max() < valid_from <= data.valid[TIMESTAMP].min()
    assert data.valid[TIMESTAMP].max() < test_from <= data.test[TIMESTAMP].min()
    base_valid, _ = rows(log, "valid")
    late = log[TIMESTAMP] >= test_from
    perturbed = log.copy()
    perturbed.loc[late, LABEL] = 1 - perturbed.loc[late, LABEL]
    perturbed.loc[late, "item"] = perturbed.loc[late, "item"].sample(frac=1, random_state=0).to_numpy()
    for changed in (perturbed, log[~late]):
        assert rows(changed, "train")[0] == base_train and rows(changed, "valid")[0] == base_valid
    assert rows(log[log[TIMESTAMP] < valid_from], "train")[0] == base_train


def test_inttower_protocol_is_marked_leaky_and_reproduces_the_script():
    data = load_synthetic(ProtocolConfig(name="inttower", seq_len=0), n_users=80, n_items=30, events_per_user=20, embed_dim=4)
    assert data.meta["leaks_labels"] and "leaks labels" in data.meta["note"]
    n = sum(len(t) for t in data.splits.values())
    assert len(data.test) == math.ceil(0.2 * n)  # sklearn's train_test_split(test_size=0.2)
    n_train = n - len(data.test)
    assert len(data.valid) == n_train - int(n_train * 0.8)  # Keras validation_split=0.2
    assert "user_mean_rating" in data.schema and "item_mean_rating" in data.schema
    assert data.schema.sequence_feature is None
    # The leak: test-split mean ratings are computed from the test labels themselves.
    test = data.test
    rate = pd.Series(test[LABEL]).groupby(test["user_id"]).transform("mean").to_numpy()
    lo, hi = rate.min(), rate.max()
    np.testing.assert_allclose(test["user_mean_rating"], (rate - lo) / (hi - lo), atol=1e-6)


def test_inttower_behaviour_sequences_hold_no_test_label():
    data = load_synthetic(ProtocolConfig(name="inttower", seq_len=8), n_users=80, n_items=30, events_per_user=20, embed_dim=4)
    # Every item in a sequence is a positive of that user in the train split, strictly earlier.
    train = data.train
    positives = {(u, i) for u, i, lab in zip(train["user_id"], train["item_id"], train[LABEL]) if lab > 0}
    for split in data.splits.values():
        for user, history in zip(split["user_id"], split["hist_items"]):
            assert all((user, i) in positives for i in history if i != PAD_INDEX)
    test_positive = {(u, i) for u, i, lab in zip(data.test["user_id"], data.test["item_id"], data.test[LABEL]) if lab > 0}
    assert test_positive - positives  # the check has teeth: some test positives are not train positives


def test_schema_validates_and_round_trips():
    f = [Feature("u", "user", "categorical", 10, 4), Feature("i", "item", "categorical", 5, 4),
         Feature("s", "user", "sequence", 5, 4, 3, vocab="i")]
    schema = Schema(tuple(f), item_id="i", user_id="u")
    assert Schema.from_dict(schema.to_dict()) == schema
    with pytest.raises(ValueError, match="share vocab"):
        Schema((f[0], f[1], Feature("s", "user", "sequence", 6, 4, 3, vocab="i")), item_id="i", user_id="u")
    with pytest.raises(ValueError, match="embed_dim"):
        Feature("x", "user", "categorical", 10, 0)
    with pytest.raises(ValueError):
        Feature("x", "sideways", "categorical", 10, 4)
    with pytest.raises(ValueError, match="no such feature"):
        Schema(tuple(f), item_id="missing", user_id="u")
    with pytest.raises(KeyError, match="no feature"):
        schema["nope"]
    assert schema.sequence_feature.name == "s" and schema["s"].kind is Kind.SEQUENCE


def test_read_double_colon_reports_non_numbers(tmp_path):
    path = tmp_path / "x.dat"
    path.write_text("1::a\nb::c\n")
    with pytest.raises(DataError, match=r"x.dat, line 2: field 'id' is not an integer: 'b'"):
        read_double_colon(path, ["id", "name"], ["id"])


def test_cache_writes_clean_up_after_killed_writers_and_rebuild_a_damaged_entry(tmp_path):
    import os
    import time

    from prerank.data.table import STALE_PARTIAL_SECONDS, cached

    built = []

    def build():
        built.append(1)
        return load_synthetic(ProtocolConfig(seq_len=3), n_users=20, n_items=15, events_per_user=6, seed=1)

    stale, fresh = tmp_path / ".entry.killed", tmp_path / ".entry.running"
    for leftover in (stale, fresh):
        leftover.mkdir()
        (leftover / "arrays.npz").write_bytes(b"half")
    old = time.time() - STALE_PARTIAL_SECONDS - 60
    os.utime(stale, (old, old))
    first = cached(tmp_path, "entry", build)
    assert not stale.exists() and fresh.exists()  # a recent one may belong to a live writer
    assert len(cached(tmp_path, "entry", build).train) == len(first.train) and len(built) == 1
    (tmp_path / "entry" / "arrays.npz").write_bytes(b"truncated")
    assert len(cached(tmp_path, "entry", build).train) == len(first.train) and len(built) == 2
