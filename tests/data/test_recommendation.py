"""Interaction logs: readers, errors, k-core, id maps, sequences, the split protocols, training windows."""
from __future__ import annotations

import importlib.util

import numpy as np
import polars as pl
import pytest
import torch

from seqmamba.data import recommendation as rec
from seqmamba.data.recommendation import (ColumnMap, EvalCollate, IdMap, LogFormatError, TrainCollate,
                                          UnknownIdError, build_sequences, k_core, leave_one_out, prepare,
                                          read_interactions, remap_ids, time_cutoff, training_windows)

# A hand-built log, rows deliberately out of time order. Users: "a" 5 events (a tie at t=30),
# "b" 3, "c" 2, "d" 1. Items are strings.
LOG = [  # user, item, timestamp
    ("b", "x", 20), ("a", "p", 30), ("a", "q", 10), ("c", "y", 5), ("a", "r", 30),
    ("b", "z", 10), ("d", "p", 1), ("a", "s", 40), ("c", "p", 7), ("b", "q", 30), ("a", "t", 20),
]


def log_frame(rows=LOG) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=["user", "item", "timestamp"], orient="row").with_row_index("row")


def raw_sequences(prepared) -> dict[str, list[str]]:
    seqs, ids = prepared.seqs, prepared.id_map
    return {ids.users[u]: ids.decode_items(seqs.user(u)).to_list() for u in range(seqs.n_users)}


def test_sequences_are_chronological_with_file_order_ties():
    prepared = prepare(log_frame())
    # a: t=10 q, 20 t, 30 p (row 1) before r (row 4), 40 s
    assert raw_sequences(prepared) == {"a": ["q", "t", "p", "r", "s"], "b": ["z", "x", "q"], "c": ["y", "p"],
                                       "d": ["p"]}


def test_leave_one_out_matches_recbole_ls_valid_and_test():
    prepared = prepare(log_frame())
    seqs, split, ids = prepared.seqs, prepared.split, prepared.id_map
    items = lambda pos: ids.decode_items(seqs.items[pos]).to_list()  # noqa: E731
    users = lambda u: ids.decode_users(u).to_list()  # noqa: E731
    train = {ids.users[u]: ids.decode_items(seqs.items[seqs.offsets[u]:split.train_end[u]]).to_list()
             for u in range(seqs.n_users)}
    assert train == {"a": ["q", "t", "p"], "b": ["z"], "c": ["y"], "d": ["p"]}
    assert users(split.valid_users) == ["a", "b"] and items(split.valid_pos) == ["r", "x"]
    assert users(split.test_users) == ["a", "b", "c"] and items(split.test_pos) == ["s", "q", "p"]


def test_time_cutoff_split():
    seqs = build_sequences(remap_ids(log_frame())[0])
    split = time_cutoff(seqs, valid_from=20, test_from=30)
    # a: q(10) | t(20) | p,r(30) s(40); b: z(10) | x(20) | q(30); c: y(5) p(7) all train; d: p(1)
    assert split.train_end.tolist() == [1, 6, 10, 11]  # a: 1 train item, b: 1, c: 2, d: 1
    assert split.valid_users.tolist() == [0, 1] and split.valid_pos.tolist() == [1, 6]
    assert split.test_users.tolist() == [0, 1] and split.test_pos.tolist() == [2, 7]


def test_time_cutoff_quantiles_and_cold_start_targets_left_out():
    table = log_frame([("u", "i", 1), ("u", "j", 2), ("v", "k", 9)])
    prepared = prepare(table, split="time", valid_from=2, test_from=5)
    assert prepared.split.valid_users.tolist() == [0]
    assert prepared.split.test_users.tolist() == []  # v's only event is after test_from: no history
    with pytest.raises(ValueError, match="valid_from and test_from"):
        prepare(table, split="time")


def test_k_core_iterates_until_stable():
    rows = [("u1", "i1", 1), ("u1", "i2", 2), ("u2", "i1", 1), ("u2", "i2", 2), ("u3", "i1", 1), ("u3", "i3", 2)]
    # item i3 has 1 interaction -> dropped; then u3 has 1 -> dropped; i1 then has 2: stable.
    out = k_core(log_frame(rows), user_min=2, item_min=2)
    assert sorted(out["user"].unique().to_list()) == ["u1", "u2"]
    assert sorted(out["item"].unique().to_list()) == ["i1", "i2"]
    with pytest.raises(ValueError, match="removed all"):
        prepare(log_frame(rows), user_min_count=5)


def test_id_map_round_trip(tmp_path):
    table, ids = remap_ids(log_frame())
    assert ids.decode_users(table["user"]).to_list() == log_frame()["user"].to_list()
    assert ids.decode_items(table["item"]).to_list() == log_frame()["item"].to_list()
    ids.save(tmp_path)
    loaded = IdMap.load(tmp_path)
    assert loaded.users.to_list() == ids.users.to_list() and loaded.items.to_list() == ids.items.to_list()
    raw = ["t", "p", "q"]
    assert loaded.decode_items(loaded.encode_items(raw)).to_list() == raw
    assert sorted(tmp_path.iterdir()) == [tmp_path / "items.parquet", tmp_path / "users.parquet"]
    assert loaded.encode_items(["p"]).tolist() == [1] and ids.n_items == 8  # index 0 is padding


def test_id_map_round_trip_integer_ids(tmp_path):
    rows = [(10, 500, 1), (3, 7, 2), (10, 7, 3)]
    table, ids = remap_ids(log_frame(rows))
    ids.save(tmp_path)
    loaded = IdMap.load(tmp_path)
    assert loaded.users.dtype == pl.Int64
    assert loaded.decode_users(loaded.encode_users([3, 10])).to_list() == [3, 10]
    assert loaded.encode_items([7, 500]).tolist() == [1, 2]


def test_unknown_ids_give_clear_errors():
    _, ids = remap_ids(log_frame())
    with pytest.raises(UnknownIdError, match=r"2 unknown item id\(s\).*'nope', 'zzz'"):
        ids.encode_items(["p", "nope", "zzz", "nope"])
    with pytest.raises(UnknownIdError, match="unknown user id.*'e'"):
        ids.encode_users(["a", "e"])
    with pytest.raises(IndexError, match="1..8"):
        ids.decode_items([0])


def write_all_formats(tmp_path, rows):
    frame = pl.DataFrame(rows, schema=["uid", "iid", "ts"], orient="row")
    frame.write_csv(tmp_path / "log.csv")
    frame.write_csv(tmp_path / "log.tsv", separator="\t")
    frame.write_parquet(tmp_path / "log.parquet")
    atomic = frame.rename({"uid": "uid:token", "iid": "iid:token", "ts": "ts:float"})
    atomic.write_csv(tmp_path / "log.inter", separator="\t")
    return ColumnMap("uid", "iid", "ts")


@pytest.mark.parametrize("name", ["log.csv", "log.tsv", "log.parquet", "log.inter"])
def test_readers_agree(tmp_path, name):
    columns = write_all_formats(tmp_path, LOG)
    table = read_interactions(tmp_path / name, columns)
    assert table.columns == ["row", "user", "item", "timestamp"]
    assert table["user"].to_list() == [r[0] for r in LOG] and table["item"].to_list() == [r[1] for r in LOG]
    assert [float(t) for t in table["timestamp"]] == [float(r[2]) for r in LOG]
    assert raw_sequences(prepare(table)) == raw_sequences(prepare(log_frame()))


def test_datetime_timestamps(tmp_path):
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\n1,2,2024-01-02 00:00:00\n1,3,2024-01-01 00:00:00\n")
    table = read_interactions(tmp_path / "log.csv")
    assert build_sequences(remap_ids(table)[0]).items.tolist() == [2, 1]  # item 3 (index 2) first


@pytest.mark.parametrize("content, fmt, pattern", [
    ("user_id,item_id\n1,2\n", "csv", r"no timestamp column 'timestamp'; the file has columns \['user_id', 'item_id'\]"),
    ("user_id,item_id,timestamp\n1,2,3\n1,3,4\n2,4,5,6\n", "csv", r"line 4: 4 fields, the header has 3"),
    ("user_id,item_id,timestamp\n1,2,3\n1,,4\n", "csv", r"line 3, column 'item_id': missing item value"),
    ("user_id,item_id,timestamp\n1,2,3\n1,3,yesterday\n", "csv", r"line 3, column 'timestamp': timestamp 'yesterday'"),
    ("user_id:token\titem_id:tok\n1\t2\n", "inter", r"line 1, column 2 \('item_id'\): unknown RecBole type 'tok'"),
    ("user_id\titem_id:token\n1\t2\n", "inter", r"line 1, column 1: header field 'user_id' is not 'name:type'"),
    ("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t3\tnoon\n", "inter",
     r"line 3, column 'timestamp': 'noon' is not a float"),
])
def test_malformed_files_name_file_line_and_column(tmp_path, content, fmt, pattern):
    path = tmp_path / f"bad.{fmt}"
    path.write_text(content)
    with pytest.raises(LogFormatError, match=pattern) as err:
        read_interactions(path)
    assert str(path) in str(err.value)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_interactions(tmp_path / "nope.csv")
    (tmp_path / "log.json").write_text("{}")
    with pytest.raises(LogFormatError, match="cannot tell the format"):
        read_interactions(tmp_path / "log.json")


def test_training_windows_all_and_last():
    # one user, 8 training items at positions 10..17 (7 targets), max_len 3
    start, end = np.array([10]), np.array([18])
    starts, ends, first = training_windows(start, end, 3, "all")
    assert list(zip(starts.tolist(), ends.tolist())) == [(14, 18), (11, 15), (10, 12)]
    assert (first == starts + 1).all()
    targets = sorted(t for a, e in zip(starts, ends) for t in range(a + 1, e))
    assert targets == list(range(11, 18))  # every item but the first is a target exactly once
    starts, ends, first = training_windows(start, end, 3, "last")
    assert (starts.tolist(), ends.tolist(), first.tolist()) == ([14], [18], [15])
    assert training_windows(np.array([0]), np.array([1]), 3)[0].size == 0  # one item: nothing to predict


def test_overlapping_windows_train_each_target_once_with_context():
    # one user, 12 training items at positions 0..11 (11 targets), max_len 4, stride 2
    starts, ends, first = training_windows(np.array([0]), np.array([12]), 4, "all", stride=2)
    assert list(zip(starts.tolist(), ends.tolist(), first.tolist())) == [
        (7, 12, 10), (5, 10, 8), (3, 8, 6), (1, 6, 4), (0, 4, 2), (0, 2, 1)]
    trained = sorted(t for e, f in zip(ends, first) for t in range(f, e))
    assert trained == list(range(1, 12))
    batch = TrainCollate(np.arange(100, 112, dtype=np.int32), starts, ends, first)([0])
    assert batch["items"].tolist() == [[107, 108, 109, 110]] and batch["targets"].tolist() == [[108, 109, 110, 111]]
    assert batch["loss_mask"].tolist() == [[False, False, True, True]]  # 2 context-only positions
    with pytest.raises(ValueError, match="stride"):
        training_windows(np.array([0]), np.array([12]), 4, "all", stride=5)


def test_train_collate_shifts_and_pads():
    items = np.arange(100, 120, dtype=np.int32)
    collate = TrainCollate(items, np.array([0, 10]), np.array([4, 12]))
    batch = collate([0, 1])
    assert batch["items"].tolist() == [[100, 101, 102], [110, 0, 0]]
    assert batch["targets"].tolist() == [[101, 102, 103], [111, 0, 0]]
    assert batch["mask"].tolist() == [[True] * 3, [True, False, False]]


def test_eval_collate_truncates_input_but_keeps_full_history():
    items = np.arange(1, 11, dtype=np.int32)  # one user, items 1..10
    collate = EvalCollate(items, np.array([0, 10]), users=np.array([0]), positions=np.array([9]), max_len=4)
    batch = collate([0])
    assert batch["items"].tolist() == [[6, 7, 8, 9]] and batch["target"].tolist() == [10]
    assert batch["history_item"].tolist() == list(range(1, 10)) and batch["history_row"].tolist() == [0] * 9


def test_datamodule_synthetic_sizes_and_batches(tmp_path):
    dm = rec.RecDataModule(dataset="synthetic", synthetic_users=20, synthetic_items=15, synthetic_mean_len=12,
                           max_len=5, batch_size=4)
    dm.setup("fit")
    assert dm.n_items == 15 and dm.n_users == 20
    batch = next(iter(dm.train_dataloader()))
    assert batch["items"].shape == batch["targets"].shape == batch["mask"].shape and batch["items"].shape[1] <= 5
    assert (batch["items"][~batch["mask"]] == 0).all() and (batch["targets"][batch["mask"]] > 0).all()
    val = next(iter(dm.val_dataloader()))
    assert val["target"].shape == (min(4, 20),) or val["target"].shape[0] <= 256
    out = dm.save_id_map(tmp_path)
    assert IdMap.load(out).n_items == 15
    with pytest.raises(ValueError, match="exactly one of path"):
        rec.RecDataModule()


def test_synthetic_log_is_deterministic():
    a, b = rec.synthetic_log(50, 30, 10, seed=3), rec.synthetic_log(50, 30, 10, seed=3)
    assert a.equals(b) and a["item_id"].min() >= 1 and a["item_id"].max() <= 30
    assert (a.group_by("user_id").len()["len"] >= 3).all()


def test_recbole_ml100k_missing_gives_install_hint(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps recbole"):
        rec.recbole_example_path("ml-100k")


@pytest.mark.skipif(importlib.util.find_spec("recbole") is None, reason="recbole wheel not installed")
def test_ml100k_from_recbole_wheel():
    table = read_interactions(rec.recbole_example_path("ml-100k"), ColumnMap("user_id", "item_id", "timestamp"))
    prepared = prepare(table)
    assert table.height == 100_000 and prepared.id_map.n_users == 943 and prepared.id_map.n_items == 1682
    assert len(prepared.split.test_users) == 943 and len(prepared.split.valid_users) == 943
    assert torch.is_tensor(torch.from_numpy(prepared.seqs.items))


def test_datamodule_reads_a_mapped_csv_with_time_split(tmp_path):
    rows = [(u, f"i{(u + t) % 7}", 100 * t + u) for u in range(6) for t in range(5)]
    pl.DataFrame(rows, schema=["uid", "sku", "ts"], orient="row").write_csv(tmp_path / "log.csv")
    dm = rec.RecDataModule(path=str(tmp_path / "log.csv"), user_col="uid", item_col="sku", time_col="ts",
                           split="time", valid_from=300, test_from=400, max_len=3, batch_size=64)
    dm.setup("fit")
    # every user: t=0,1,2 train (ts < 300), t=3 valid, t=4 test
    train = next(iter(dm.train_dataloader()))
    assert int(train["loss_mask"].sum()) == 6 * 2  # two targets a user (items 2 and 3 of the train part)
    val, test = next(iter(dm.val_dataloader())), next(iter(dm.test_dataloader()))
    ids = dm.id_map
    assert ids.decode_items(val["target"]).to_list() == [f"i{(u + 3) % 7}" for u in range(6)]
    assert ids.decode_items(test["target"]).to_list() == [f"i{(u + 4) % 7}" for u in range(6)]
    assert test["mask"].sum(1).tolist() == [3] * 6  # last max_len=3 of the 4 earlier items
