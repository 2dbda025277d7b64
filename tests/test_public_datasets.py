"""Loaders of the public datasets on small generated fixtures, and on the staged real samples
in ../shared/data when they are there (skipped otherwise)."""

import json
from pathlib import Path

import numpy as np
import pytest

from prerank.data.amazon import load_amazon_beauty, load_din_csv
from prerank.data.datasets import load_dataset
from prerank.data.pipeline import ProtocolConfig
from prerank.data.readers import TruncatedLineWarning, read_frame
from prerank.data.schema import OOV_INDEX
from prerank.data.table import GRADE, ITEM_ROW, LABEL, DataError
from prerank.data.taobao import load_taobao_ad, load_taobao_userbehavior

# CI keeps ../shared/data beside the repository; the development machines keep /work/shared/data.
_CANDIDATES = [Path(__file__).resolve().parents[1].parent / "shared" / "data", Path("/work/shared/data")]
SHARED = next((c for c in _CANDIDATES if c.exists()), _CANDIDATES[0])

SMALL = dict(seq_len=4)


def userbehavior_lines(n_users=5, events=6):
    kinds = ["pv", "pv", "cart", "pv", "buy", "fav"]
    return [f"{u},{100 + (u * 7 + e) % 23},{(u * 7 + e) % 23 % 4},{kinds[e % 6]},{1511540000 + 60 * e + u}"
            for u in range(1, n_users + 1) for e in range(events)]


def test_userbehavior_drops_a_cut_last_line_with_a_warning_and_grades_behaviours(tmp_path):
    path = tmp_path / "UserBehavior.csv"
    path.write_text("\n".join(userbehavior_lines()) + "\n6,101,3,pv")
    with pytest.warns(TruncatedLineWarning, match="line 31: last line is cut mid-row"):
        data = load_taobao_userbehavior(path, ProtocolConfig(negatives=2, **SMALL))
    rows = {name: t for name, t in data.splits.items()}
    total_pos = sum(int((t[LABEL] == 1).sum()) for t in rows.values())
    assert total_pos == 30
    for t in rows.values():
        assert set(np.unique(t[GRADE][t[LABEL] == 1])) <= {1, 2, 3}
        assert (t[GRADE][t[LABEL] == 0] == 0).all()
    grades = np.concatenate([t[GRADE][t[LABEL] == 1] for t in rows.values()])
    assert sorted(np.unique(grades, return_counts=True)[1]) == [5, 10, 15]  # buy 5, cart+fav 10, pv 15
    assert [f.name for f in data.schema.item_features] == ["item_id", "category"]
    assert data.meta["ranking_eval"]["candidates"] == ["full", 100]


@pytest.mark.parametrize("bad_line, message", [
    ("3,101,1,click,1511540000", r"line 4: column 'behavior' has 'click'"),
    ("3,101,1,pv", r"line 4: column 'timestamp' is empty"),
    ("3,1x1,1,pv,1511540000", r"line 4: column 'item' is not an integer: '1x1'"),
    ("3,101,1,pv,1511540000,7", r"malformed line"),
])
def test_userbehavior_errors_name_file_line_and_column(tmp_path, bad_line, message):
    lines = userbehavior_lines()
    lines[3] = bad_line
    path = tmp_path / "UserBehavior.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        load_taobao_userbehavior(path, ProtocolConfig(**SMALL))


def write_beauty(folder: Path, lines: list[str], attributes: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Beauty.txt").write_text("\n".join(lines) + "\n")
    (folder / "Beauty_item2attributes.json").write_text(json.dumps(attributes))
    return folder


def test_beauty_leave_last_out_attributes_oov_and_cache(tmp_path):
    lines = ["1 1 2 3 4 5", "2 2 3 4 6", "3 1 3 5 2 4 7", "4 8 1 2"]
    folder = write_beauty(tmp_path / "beauty", lines, {"1": [1, 2], "2": [2], "3": [3, 4, 5], "8": [9]})
    protocol = ProtocolConfig(name="leave_last_out", negatives=1, **SMALL)
    data = load_amazon_beauty(folder, protocol, cache_dir=tmp_path / "cache")
    test_pos = data.test.subset(np.flatnonzero(data.test[LABEL] == 1))
    assert sorted(data.item_raw_ids[test_pos[ITEM_ROW]].tolist()) == [2, 5, 6, 7]  # each user's last item
    assert len(data.test) == 8 and len(data.valid) == 8
    # Items 6 and 7 occur only as test events: they are known only if drawn as a train negative.
    train_items = set(data.item_raw_ids[data.train[ITEM_ROW]].tolist())
    for code, raw in zip(test_pos["item_id"], data.item_raw_ids[test_pos[ITEM_ROW]]):
        assert (code == OOV_INDEX) == (raw not in train_items)
    assert {6, 7} - set(data.item_raw_ids[data.train[ITEM_ROW][data.train[LABEL] == 1]].tolist()) == {6, 7}
    assert data.schema["attributes"].max_len == 3
    assert (data.items["attributes"][list(data.item_raw_ids).index(4)] == 0).all()  # item 4: no attributes
    assert len(list((tmp_path / "cache").iterdir())) == 1
    again = load_amazon_beauty(folder, protocol, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.train[ITEM_ROW], data.train[ITEM_ROW])


def test_any_s3rec_pair_loads_under_its_own_name(tmp_path):
    lines = ["1 1 2 3 4 5", "2 2 3 4 6", "3 1 3 5 2 4 7", "4 8 1 2"]
    folder = write_beauty(tmp_path / "s3rec", lines, {"1": [1, 2]})
    for suffix in (".txt", "_item2attributes.json"):
        (folder / f"Beauty{suffix}").rename(folder / f"Sports{suffix}")
    protocol = ProtocolConfig(name="leave_last_out", negatives=1, **SMALL)
    data = load_dataset("s3rec", folder, protocol)
    assert data.meta["dataset"] == "s3rec:Sports" and "Sports" in data.meta["dataset_label"]
    assert "Beauty" not in json.dumps(data.meta)
    with pytest.raises(DataError, match="file not found"):  # the Beauty loader does not read a renamed copy
        load_amazon_beauty(folder, protocol)
    write_beauty(folder, lines[:2], {})
    with pytest.raises(DataError, match=r"several S3-Rec datasets \(Beauty, Sports\): name one as --dataset s3rec:NAME"):
        load_dataset("s3rec", folder, protocol)
    assert load_dataset("s3rec:Beauty", folder, protocol).meta["dataset"] == "s3rec:Beauty"
    with pytest.raises(DataError, match=r"Toys.txt: file not found"):
        load_dataset("s3rec:Toys", folder, protocol)
    with pytest.raises(DataError, match="no S3-Rec dataset"):
        load_dataset("s3rec", tmp_path, protocol)


@pytest.mark.parametrize("lines, attributes, message", [
    (["1 1 2 3", "2 2 x 3"], {}, r"Beauty.txt, line 2: item 2 is not an integer id: 'x'"),
    (["1 1 2 3", "1 2 3"], {}, r"line 2: user 1 appears on an earlier line"),
    (["1 1 2 3", "2"], {}, r"line 2: expected 'user item"),
    (["1 1 2 3"], {"1": "brand"}, r"item '1': expected an integer item id mapped to a list"),
])
def test_beauty_errors(tmp_path, lines, attributes, message):
    folder = write_beauty(tmp_path / "b", lines, attributes)
    with pytest.raises(DataError, match=message):
        load_amazon_beauty(folder, ProtocolConfig(**SMALL))


def test_din_csv_and_its_errors(tmp_path):
    path = tmp_path / "din.csv"
    rows = [f"{u},{i},{1400000000 + 86400 * i},{i % 3}" for u in range(3) for i in range(u, u + 5)]
    path.write_text("user_id,item_id,time,cate_id\n" + "\n".join(rows) + "\n")
    data = load_din_csv(path, ProtocolConfig(negatives=1, **SMALL))
    assert [f.name for f in data.schema.item_features] == ["item_id", "cate_id"]
    assert data.meta["implicit"] and len(data.item_raw_ids) == 7
    path.write_text("user_id,item_id,cate_id\n0,1,2\n")
    with pytest.raises(DataError, match=r"din.csv: missing column\(s\) \['time'\]"):
        load_din_csv(path, ProtocolConfig(**SMALL))


AD_HEADER = ("clk,time_stamp,userid,adgroup_id,pid,cate_id,campaign_id,customer,brand,price,cms_segid,cms_group_id,"
             "final_gender_code,age_level,pvalue_level,shopping_level,occupation,new_user_class_level,click_sequence")


def ad_rows(n=24, bad_clk_at=None):
    rows = []
    for r in range(n):
        u, a = 10 + r % 4, 500 + r % 6
        clk = "yes" if r == bad_clk_at else str(int(r % 3 == 0))
        rows.append(f"{clk},2017-05-06 0{r % 10}:00:00,{u},{a},430548_1007,{a % 3},{a},{a % 2},,{a / 10},0,{u % 3},"
                    f"{1 + u % 2},{u % 5},,3,0,,{a}^{a + 1}")
    return rows


def test_taobao_ad_joined_files_pool_skip_duplicates_and_use_click_sequence(tmp_path):
    folder = tmp_path / "ad"
    folder.mkdir()
    (folder / "train_sample.csv").write_text(AD_HEADER + "\n" + "\n".join(ad_rows()) + "\n")
    (folder / "valid_sample.csv").write_text(AD_HEADER + "\n" + "\n".join(ad_rows(8)[::-1]) + "\n")
    (folder / "test_sample.csv").write_text((folder / "valid_sample.csv").read_text())
    with pytest.warns(UserWarning, match="test_sample.csv: identical"):
        data = load_taobao_ad(folder, ProtocolConfig(**SMALL))
    assert sum(len(t) for t in data.splits.values()) == 32
    assert [f.name for f in data.schema.side("context")] == ["pid"]
    assert data.schema["price"].kind.value == "dense"
    assert data.meta["sequence"] == "click_sequence column"
    # click_sequence "a^a+1": two known-or-OOV ids, never padding.
    assert (data.train["hist_items"][:, -2:] != 0).all()


def test_taobao_ad_raw_files_are_joined(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    samples = [f"{10 + r % 3},{1494000000 + 60 * r},{500 + r % 5},430548_1007,{1 - r % 2},{r % 2}" for r in range(15)]
    (folder / "raw_sample.csv").write_text("user,time_stamp,adgroup_id,pid,nonclk,clk\n" + "\n".join(samples) + "\n")
    (folder / "ad_feature.csv").write_text("adgroup_id,cate_id,campaign_id,customer,brand,price\n"
                                           + "\n".join(f"{500 + a},{a},{a},{a},NULL,{a}.5" for a in range(4)) + "\n")
    (folder / "user_profile.csv").write_text("userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,"
                                             "shopping_level,occupation,new_user_class_level \n10,0,1,1,2,,3,0,2\n11,0,2,2,3,1,3,0,\n")
    data = load_taobao_ad(folder, ProtocolConfig(**SMALL))
    assert data.meta["sequence"] == "built from the log's clicks"
    assert 504 in data.item_raw_ids.tolist()  # an ad with no features still in the catalogue
    assert "new_user_class_level" in data.schema  # the raw header's trailing space is stripped
    (folder / "user_profile.csv").write_text("userid,cms_segid\n10,0\n10,1\n")
    with pytest.raises(DataError, match=r"user_profile.csv"):
        load_taobao_ad(folder, ProtocolConfig(**SMALL))


def test_taobao_ad_bad_label(tmp_path):
    folder = tmp_path / "ad"
    folder.mkdir()
    (folder / "train_sample.csv").write_text(AD_HEADER + "\n" + "\n".join(ad_rows(bad_clk_at=5)) + "\n")
    with pytest.raises(DataError, match=r"train_sample.csv, line 7: column 'clk' has 'yes'"):
        load_taobao_ad(folder, ProtocolConfig(**SMALL))


def test_registered_names_need_a_data_dir():
    with pytest.raises(ValueError, match="needs --data-dir"):
        load_dataset("amazon-beauty")


# -- the staged real samples ------------------------------------------------------------------
def needs(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def test_real_amazon_electronics_sample():
    data = load_din_csv(needs("amazon-electronics-sample"), ProtocolConfig(negatives=1, **SMALL))
    assert sum(int((t[LABEL] == 1).sum()) for t in data.splits.values()) == 100
    assert len(data.item_raw_ids) == 99 and len(data.vocabs["user_id"]) <= 17


def test_real_taobao_ad_sample():
    with pytest.warns(UserWarning, match="identical"):
        data = load_taobao_ad(needs("taobao-ad-sample"), ProtocolConfig(**SMALL))
    assert sum(len(t) for t in data.splits.values()) == 200  # train + valid; test is valid's copy
    assert sum(int(t[LABEL].sum()) for t in data.splits.values()) >= 4


def test_real_userbehavior_last_line_is_dropped():
    path = needs("taobao-userbehavior-sample/UserBehavior.csv")
    with pytest.warns(TruncatedLineWarning, match="line 84476"):
        located = read_frame(path, names=["user", "item", "category", "behavior", "timestamp"],
                             required=("user", "item", "category", "behavior", "timestamp"), drop_truncated_last=True)
    assert len(located.frame) == 84475
    assert located.frame["behavior"].value_counts().to_dict() == {"pv": 75872, "cart": 4497, "fav": 2356, "buy": 1750}
