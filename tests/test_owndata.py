"""Own data described by YAML: validation errors, the summary, and training on the shipped example."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from prerank.cli import app
from prerank.data.owndata import check_own_data, load_own_data
from prerank.data.pipeline import ProtocolConfig
from prerank.data.schema import OOV_INDEX
from prerank.data.table import DataError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own-data"
runner = CliRunner()
SMALL = dict(seq_len=4)


def write_own(folder: Path, log: pd.DataFrame, yaml_text: str, users=None, items=None, parquet=False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "parquet" if parquet else "csv"
    for name, frame in (("log", log), ("users", users), ("items", items)):
        if frame is not None:
            if parquet:
                frame.to_parquet(folder / f"{name}.{suffix}", index=False)
            else:
                frame.to_csv(folder / f"{name}.{suffix}", index=False)
    (folder / "d.yaml").write_text(yaml_text.replace("SUFFIX", suffix))
    return folder / "d.yaml"


def toy_log(n_users=6, events=6):
    rows = [{"u": f"u{u}", "i": f"i{(u + e) % 7}", "t": 1000 + 10 * e, "y": int((u + e) % 3 == 0), "dev": "ab"[e % 2],
             "hist": "|".join(f"i{k}" for k in range(e % 3))} for u in range(n_users) for e in range(events)]
    return pd.DataFrame(rows)


BASE = """
files: {log: log.SUFFIX, users: users.SUFFIX, items: items.SUFFIX}
columns: {user_id: u, item_id: i, timestamp: t, label: y}
features:
  - {name: age, side: user, kind: categorical}
  - {name: dev, side: context, kind: categorical}
  - {name: brand, side: item, kind: categorical}
  - {name: price, side: item, kind: dense}
"""


def toy_tables():
    users = pd.DataFrame({"u": [f"u{u}" for u in range(6)], "age": [20, 30, 40, 20, 30, 40]})
    items = pd.DataFrame({"i": [f"i{k}" for k in range(7)], "brand": list("aabbccd"), "price": np.arange(7) * 1.5})
    return users, items


@pytest.mark.parametrize("parquet", [False, True])
def test_own_data_csv_and_parquet_build_the_described_schema(tmp_path, parquet):
    users, items = toy_tables()
    path = write_own(tmp_path, toy_log(), BASE, users, items, parquet=parquet)
    data = load_own_data(path, ProtocolConfig(**SMALL))
    assert [f.name for f in data.schema.user_features] == ["user_id", "age", "dev", "hist_items"]
    assert [f.name for f in data.schema.item_features] == ["item_id", "brand", "price"]
    assert data.schema["dev"].side.value == "context"
    assert sum(len(t) for t in data.splits.values()) == 36
    summary = check_own_data(path)
    assert (summary["rows"], summary["users"], summary["items"], summary["positives"]) == (36, 6, 7, 12)


def test_sequence_column_and_inttower_protocol(tmp_path):
    users, items = toy_tables()
    yaml_text = BASE + "sequence: {source: column, column: hist, separator: '|'}\n"
    path = write_own(tmp_path, toy_log(), yaml_text, users, items)
    data = load_own_data(path, ProtocolConfig(name="inttower", **SMALL))
    assert data.meta["leaks_labels"] and "user_mean_rating" in data.schema
    lengths = (data.train["hist_items"] != 0).sum(1)
    assert set(lengths.tolist()) <= {0, 1, 2}
    assert check_own_data(path)["sequence_lengths"]["max"] == 2


@pytest.mark.parametrize("mutate, message", [
    (lambda log: log.assign(y=log["y"].astype(str).where(log.index != 4, "maybe")),
     r"log.csv, line 6: label column 'y' must be 0/1.*'maybe'"),
    (lambda log: log.assign(t=log["t"].astype(str).where(log.index != 2, "soon")),
     r"log.csv, line 4: column 't' is neither Unix seconds nor a date-time: 'soon'"),
    (lambda log: log.assign(u=log["u"].where(log.index != 7, None)), r"log.csv, line 9: column 'u' is empty"),
    (lambda log: log.assign(t=log["t"].where(log.index != 3, 1020.5)), r"log.csv, line 5: column 't' is not an integer: '1020.5'"),
    (lambda log: log.drop(columns=["dev"]), r"feature 'dev': context column 'dev' is not in log.csv"),
])
def test_bad_log_values_name_file_line_and_column(tmp_path, mutate, message):
    users, items = toy_tables()
    path = write_own(tmp_path, mutate(toy_log()), BASE, users, items)
    with pytest.raises(DataError, match=message):
        check_own_data(path)


def test_timestamps_are_only_ordered_positions_in_a_sequence_split_as_seconds_do(tmp_path):
    users, items = toy_tables()
    log = toy_log()
    as_seconds = load_own_data(write_own(tmp_path / "seconds", log, BASE, users, items), ProtocolConfig(**SMALL))
    positions = log.assign(t=log.groupby("u").cumcount() + 1)  # 1, 2, 3, ... within each user
    as_positions = load_own_data(write_own(tmp_path / "positions", positions, BASE, users, items), ProtocolConfig(**SMALL))
    for name in ("train", "valid", "test"):
        a, b = as_seconds.splits[name], as_positions.splits[name]
        assert len(a) == len(b)
        for column in ("user_id", "item_id", "label", "hist_items"):
            np.testing.assert_array_equal(a[column], b[column])


def test_an_infinite_dense_value_is_an_error_not_a_zeroed_feature(tmp_path):
    users, items = toy_tables()
    items = items.assign(price=items["price"].astype(str).where(items.index != 2, "inf"))
    path = write_own(tmp_path, toy_log(), BASE, users, items)
    with pytest.raises(DataError, match=r"items.csv, line 4: column 'price' \(dense feature 'price'\) is not a finite number: 'inf'"):
        check_own_data(path)
    result = runner.invoke(app, ["data", "check", str(path)])
    assert result.exit_code == 2 and "is not a finite number" in result.output and "Traceback" not in result.output


def test_a_file_in_another_encoding_names_its_line_and_reads_with_files_encoding(tmp_path):
    users, items = toy_tables()
    path = write_own(tmp_path, toy_log(), BASE, users, items)
    text = (tmp_path / "items.csv").read_text().replace("i3,b", "i3,bé")
    (tmp_path / "items.csv").write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=r"items.csv, line 5: byte b'\\xe9' at column \d+ is not utf-8 text.*files.encoding"):
        check_own_data(path)
    result = runner.invoke(app, ["data", "check", str(path)])
    assert result.exit_code == 2 and "items.csv, line 5" in result.output and "Traceback" not in result.output
    path.write_text(BASE.replace("items: items.SUFFIX}", "items: items.SUFFIX, encoding: latin-1}").replace("SUFFIX", "csv"))
    data = load_own_data(path, ProtocolConfig(**SMALL))
    assert "bé" in data.vocabs["brand"]
    path.write_text(BASE.replace("items: items.SUFFIX}", "items: items.SUFFIX, encoding: klingon}").replace("SUFFIX", "csv"))
    with pytest.raises(DataError, match="unknown text encoding 'klingon'"):
        check_own_data(path)


def test_duplicated_log_rows_warn_with_their_count_or_are_dropped(tmp_path):
    from prerank.data.owndata import DuplicateRowsWarning

    users, items = toy_tables()
    log = toy_log()
    doubled = pd.concat([log, log.iloc[[3, 3, 10]]], ignore_index=True)
    path = write_own(tmp_path, doubled, BASE, users, items)
    with pytest.warns(DuplicateRowsWarning, match=r"log.csv: 3 rows repeat an earlier row in every column \(first at line 38\)"):
        kept = load_own_data(path, ProtocolConfig(**SMALL), cache_dir=tmp_path / "cache")
    assert sum(len(t) for t in kept.splits.values()) == len(log) + 3
    path.write_text(BASE.replace("SUFFIX", "csv") + "duplicates: drop\n")
    dropped = load_own_data(path, ProtocolConfig(**SMALL), cache_dir=tmp_path / "cache")
    assert sum(len(t) for t in dropped.splits.values()) == len(log)
    assert any("dropped" in note for note in check_own_data(path)["notes"])


def test_a_last_line_cut_inside_an_optional_column_is_an_error(tmp_path):
    users, items = toy_tables()
    path = write_own(tmp_path, toy_log(), BASE, users, items)
    # The log's columns: u, i, t, y, dev, hist; the last row loses dev and hist (no final newline).
    lines = (tmp_path / "log.csv").read_text().rstrip("\n").split("\n")
    lines[-1] = ",".join(lines[-1].split(",")[:4])
    (tmp_path / "log.csv").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"log.csv, line 37: last line is cut mid-row \(4 of 6 fields, no final newline\)"):
        check_own_data(path)


def test_bad_attribute_tables_and_config(tmp_path):
    users, items = toy_tables()
    bad_items = items.assign(price=items["price"].astype(str).where(items.index != 3, "cheap"))
    path = write_own(tmp_path / "a", toy_log(), BASE, users, bad_items)
    with pytest.raises(DataError, match=r"items.csv, line 5: column 'price' \(dense feature 'price'\) is not a finite number: 'cheap'"):
        check_own_data(path)
    path = write_own(tmp_path / "b", toy_log(), BASE, pd.concat([users, users.iloc[:1]]), items)
    with pytest.raises(DataError, match=r"users.csv, line 8: user id 'u0' appears twice"):
        check_own_data(path)
    path = write_own(tmp_path / "c", toy_log(), BASE.replace("kind: dense", "kind: densest"), users, items)
    with pytest.raises(DataError, match=r"d.yaml: features.3.kind: Input should be"):
        check_own_data(path)
    path = write_own(tmp_path / "d", toy_log(), BASE.replace("{name: age, side: user, kind: categorical}",
                                                             "{name: age, side: user, kind: categorical, embed_dim: 3}"),
                     users, items)
    with pytest.raises(DataError, match="user/context features must share one embedding dim"):
        check_own_data(path)
    # A user feature taken from the log must be constant per user.
    no_users = BASE.replace("users: users.SUFFIX, ", "")
    log = toy_log().assign(age=[20 + (r == 9) for r in range(36)])
    path = write_own(tmp_path / "e", log, no_users, None, items)
    with pytest.raises(DataError, match=r"log.csv, line 11: column 'age' of user 'u1' is '21' here but '20'"):
        check_own_data(path)


def test_unknown_users_and_rare_values_map_to_oov(tmp_path):
    users, items = toy_tables()
    yaml_text = BASE.replace("{name: brand, side: item, kind: categorical}",
                             "{name: brand, side: item, kind: categorical, vocab: {min_count: 2}}")
    path = write_own(tmp_path, toy_log(), yaml_text, users.iloc[:4], items)
    summary = check_own_data(path)
    assert any("2 users of the log are not in users.csv" in n for n in summary["notes"])
    data = load_own_data(path, ProtocolConfig(**SMALL))
    # min_count counts items for an item attribute: brand d has one item.
    assert data.vocabs["brand"] == ["a", "b", "c"]
    assert data.items["brand"][list(data.item_raw_ids).index("i6")] == OOV_INDEX


def test_shipped_example_checks_and_trains_under_both_protocols(tmp_path):
    result = runner.invoke(app, ["data", "check", str(EXAMPLE / "dataset.yaml")])
    assert result.exit_code == 0, result.output
    log = pd.read_csv(EXAMPLE / "interactions.csv")
    assert f"rows             {len(log)}" in result.output and f"positives        {int(log['clicked'].sum())}" in result.output
    assert "context features 1: device" in result.output
    for protocol in ("temporal", "inttower"):
        out = tmp_path / protocol
        result = runner.invoke(app, ["train", "--dataset", str(EXAMPLE / "dataset.yaml"), "--protocol", protocol,
                                     "--epochs", "1", "--batch-size", "512", "--set", "hidden=[16]", "--no-progress",
                                     "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "metrics.json").read_text())["protocol"] == protocol


def test_implicit_example_trains_with_negatives_and_top_k(tmp_path):
    out = tmp_path / "implicit"
    result = runner.invoke(app, ["train", "--dataset", str(EXAMPLE / "implicit.yaml"), "--protocol", "leave_last_out",
                                 "--epochs", "1", "--batch-size", "512", "--set", "hidden=[16]", "--no-progress",
                                 "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test_ranking"]) == {"full", "50"}
    assert 0 <= metrics["test_ranking"]["full"]["recall@10"] <= 1
    assert metrics["test_ranking"]["full"]["requests"] == 150


def test_data_check_reports_errors_without_traceback(tmp_path):
    (tmp_path / "d.yaml").write_text("files: {log: nowhere.csv}\ncolumns: {user_id: u, item_id: i, timestamp: t}\n")
    result = runner.invoke(app, ["data", "check", str(tmp_path / "d.yaml")])
    assert result.exit_code == 2 and "nowhere.csv: file not found" in result.output


def test_set_embed_dim_changes_the_model_and_reuses_the_preprocessing_cache(tmp_path):
    import torch

    cache = tmp_path / "cache"
    common = ["train", "--dataset", str(EXAMPLE / "dataset.yaml"), "--epochs", "1", "--batch-size", "512",
              "--set", "hidden=[16]", "--no-progress", "--cache-dir", str(cache)]
    first = runner.invoke(app, [*common, "--out", str(tmp_path / "default")])
    assert first.exit_code == 0, first.output
    assert f"preprocessing (cached at {cache}" in first.output and "reusing" not in first.output
    [entry] = list(cache.iterdir())
    second = runner.invoke(app, [*common, "--set", "embed_dim=8", "--out", str(tmp_path / "dim8")])
    assert second.exit_code == 0, second.output
    assert f"reusing cached preprocessing at {entry}" in second.output
    assert list(cache.iterdir()) == [entry]  # no second preprocessing
    shapes = {}
    for run in ("default", "dim8"):
        state = torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["state_dict"]
        shapes[run] = {k: v.shape[1] for k, v in state.items() if ".tables." in k}
    assert shapes["default"] and set(shapes["default"].values()) == {16}  # the YAML's embed_dim: 16
    assert shapes["dim8"].keys() == shapes["default"].keys() and set(shapes["dim8"].values()) == {8}
    assert json.loads((tmp_path / "dim8" / "metrics.json").read_text())["model_config"]["embed_dim"] == 8
    # --embed-dim is the same option; disagreeing with --set is an error.
    third = runner.invoke(app, [*common, "--embed-dim", "8", "--out", str(tmp_path / "flag")])
    assert third.exit_code == 0, third.output
    state = torch.load(tmp_path / "flag" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert {k: v.shape[1] for k, v in state.items() if ".tables." in k} == shapes["dim8"]
    clash = runner.invoke(app, [*common, "--embed-dim", "8", "--set", "embed_dim=4", "--out", str(tmp_path / "clash")])
    assert clash.exit_code == 2 and "--embed-dim and --set embed_dim=... disagree" in clash.output
    # The checkpoint re-evaluates on the cached data with its own dims.
    evaluated = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "dim8" / "checkpoint.pt"), "--cache-dir", str(cache)])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["auc"] == json.loads((tmp_path / "dim8" / "metrics.json").read_text())["test"]["auc"]


def _sample_set(data) -> dict[str, set]:
    """Each split's rows as (raw user, raw item, label, timestamp), ids as text."""
    from prerank.data.schema import FIRST_KNOWN_INDEX
    from prerank.data.table import ITEM_ROW, LABEL, TIMESTAMP

    users = data.vocabs[data.schema[data.schema.user_id].vocab]
    out = {}
    for name, table in data.splits.items():
        user_index = table[data.schema.user_id] - FIRST_KNOWN_INDEX
        assert (user_index >= 0).all()  # every user of these logs is in the train split
        out[name] = set(zip((str(users[i]) for i in user_index), (str(data.item_raw_ids[r]) for r in table[ITEM_ROW]),
                            table[LABEL].tolist(), table[TIMESTAMP].tolist()))
    return out


def test_negatives_do_not_depend_on_how_ids_are_read(tmp_path):
    """The S3-Rec loader reads integer ids; the same events through an own-data YAML are read as
    text ("10" sorts before "9"): the same seed gives the same sampled rows by either route."""
    from prerank.data.amazon import load_amazon_beauty

    rng = np.random.default_rng(0)
    lines, log_rows = [], []
    for user in range(1, 31):
        items = rng.choice(np.arange(1, 41), size=int(rng.integers(4, 9)), replace=False)
        lines.append(" ".join(map(str, [user, *items])))
        log_rows += [{"user": f"{user}", "item": f"{item}", "time": position} for position, item in enumerate(items)]
    (tmp_path / "Beauty.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "Beauty_item2attributes.json").write_text("{}")
    pd.DataFrame(log_rows).to_csv(tmp_path / "log.csv", index=False)
    (tmp_path / "d.yaml").write_text("name: same events\nfiles: {log: log.csv}\ncolumns: {user_id: user, item_id: item, timestamp: time}\n"
                                     "negatives: 4\n")
    protocol = ProtocolConfig(name="leave_last_out", seq_len=4, negatives=4, seed=11)
    by_loader = _sample_set(load_amazon_beauty(tmp_path, protocol))
    by_yaml = _sample_set(load_own_data(tmp_path / "d.yaml", protocol))
    assert by_loader == by_yaml
    assert sum(1 for row in by_loader["train"] if row[2] == 0) > 100  # the negatives are there
