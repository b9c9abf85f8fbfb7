"""Interaction logs for sequential recommendation: loading, filtering, id maps, sequences, splits, batches.

Everything is columnar: polars for the table work, then flat numpy arrays. A log becomes

* ``Sequences``: every user's items in chronological order, concatenated into one ``items`` array
  (``int32``, item index 1..n_items, 0 is padding) with ``offsets`` (``(n_users + 1,)``); user ``u``'s
  history is ``items[offsets[u]:offsets[u + 1]]``. No per-row Python objects are ever made, so a
  10-million-interaction log loads, filters and becomes sequences in seconds.
* ``Split``: where each user's training part ends (``train_end``, an absolute index into ``items``) and
  the validation / test targets (absolute positions; a target's history is everything before it).

Protocols
---------
``leave_one_out`` is RecBole's ``eval_args: {split: {LS: valid_and_test}, order: TO}``: a user's
interactions sorted by time; the last one is the test target, the second to last the validation
target, the rest is training. A user with two interactions has no validation target (first: train,
second: test); a user with one interaction only trains (and, having no earlier item, gives no
training target either). ``time_cutoff`` is a global temporal split: interactions before
``valid_from`` train; each user's first interaction in ``[valid_from, test_from)`` is a validation
target and their first interaction at or after ``test_from`` a test target, each with its whole
earlier history as input.

Ordering: within a user, interactions are sorted by timestamp; ties keep the order of the rows in the
file (a stable sort), so the same file always gives the same sequences.

Training windows
----------------
All positions of a window predict their next item in one pass (inputs ``s[a:e-1]``, targets
``s[a+1:e]``), rather than one sample per prefix. A user's training part of ``n`` items gives ``n - 1``
targets; ``train_windows="all"`` cuts them into consecutive windows of ``max_len`` targets, newest
first, so every target is trained once; each window starts from an empty state, so the j-th target of
a window sees the j items before it in that window (at most ``max_len``), as a causal model trained on
``max_len`` windows does. ``"last"`` keeps only the newest window (the most recent ``max_len`` targets;
older targets are not trained). ``window_stride`` < ``max_len`` makes ``all`` windows overlap: windows
end every ``window_stride`` items and each trains only its newest ``window_stride`` targets (the oldest
window trains all of its own), so every target is still trained once but sees at least
``max_len - window_stride`` items of context, closer to RecBole's one-sample-per-prefix training at
``max_len / window_stride`` times the compute. Batches are right-padded with item 0 and carry a boolean
``mask`` (False at padding) and ``loss_mask`` (the trained targets).
"""
from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import polars as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from seqmamba.hub import atomic_write

PAD = 0
"""Item index of padding; real items are 1..n_items."""

ATOMIC_TYPES = {"token": pl.String, "float": pl.Float64, "token_seq": pl.String, "float_seq": pl.String}
"""RecBole atomic-file field types (``name:type`` headers) and how they are read."""

FORMATS = ("auto", "csv", "tsv", "parquet", "atomic")


# ----------------------------------------------------------------------------------------------------
# Reading


@dataclass
class ColumnMap:
    """Which columns of a log hold the user, the item and the timestamp (``None``: file order)."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str | None = "timestamp"


class LogFormatError(ValueError):
    """A malformed interaction file; the message names the file, the line or row, and the column."""


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".inter":
        return "atomic"
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix == ".csv":
        return "csv"
    raise LogFormatError(f"{path}: cannot tell the format from the suffix {suffix!r}; set format to one of "
                         f"{FORMATS[1:]}")


def _atomic_header(path: Path) -> tuple[list[str], dict[str, pl.DataType]]:
    """Parse a RecBole atomic header ``name:type<TAB>name:type...`` into names and polars dtypes."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n")
    if not header:
        raise LogFormatError(f"{path}: line 1: empty file, expected a RecBole header 'name:type<TAB>...'")
    names, dtypes = [], {}
    for column, field in enumerate(header.split("\t"), start=1):
        name, sep, kind = field.rpartition(":")
        if not sep or not name:
            raise LogFormatError(f"{path}: line 1, column {column}: header field {field!r} is not 'name:type' "
                                 f"(RecBole atomic files name each field as e.g. 'user_id:token')")
        if kind not in ATOMIC_TYPES:
            raise LogFormatError(f"{path}: line 1, column {column} ({name!r}): unknown RecBole type {kind!r}; "
                                 f"known types are {sorted(ATOMIC_TYPES)}")
        names.append(name)
        dtypes[name] = ATOMIC_TYPES[kind]
    return names, dtypes


def _find_ragged_line(path: Path, separator: str, n_fields: int, skip: int = 1) -> str:
    """Only on the error path: the first line whose field count differs from the header's."""
    with open(path, newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter=separator), start=1):
            if line_no > skip and row and len(row) != n_fields:
                return f"line {line_no}: {len(row)} fields, the header has {n_fields}"
    return "a line with a different number of fields than the header"


def _where(fmt: str, row: int, skip: int) -> str:
    return f"row {row}" if fmt == "parquet" else f"line {row + skip + 1}"


def read_interactions(path: str | Path, columns: ColumnMap | None = None, format: str = "auto",
                      separator: str | None = None) -> pl.DataFrame:
    """Read a log into a DataFrame with columns ``user``, ``item``, ``timestamp`` (if mapped) and ``row``
    (the record's 0-based position in the file, which breaks timestamp ties).

    Formats: CSV, TSV, parquet and RecBole atomic ``.inter`` files (tab-separated, ``name:type`` header;
    give column names without the type). Only the mapped columns are read (lazily). User and item ids keep
    their type (ints or strings); timestamps must be numeric or datetimes (then microseconds since epoch).
    Missing columns, missing values, lines with the wrong number of fields and non-numeric timestamps raise
    :class:`LogFormatError` naming the file, the line (row for parquet) and the column.
    """
    path = Path(path)
    columns = columns or ColumnMap()
    if not path.is_file():
        raise FileNotFoundError(f"interaction log {path} does not exist")
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in FORMATS[1:]:
        raise LogFormatError(f"{path}: unknown format {format!r}; use one of {FORMATS}")
    wanted = {"user": columns.user, "item": columns.item}
    if columns.timestamp is not None:
        wanted["timestamp"] = columns.timestamp

    skip = 1  # header lines before the first record
    if fmt == "parquet":
        scan = pl.scan_parquet(path)
        available = scan.collect_schema().names()
        overrides: dict = {}
    else:
        if fmt == "atomic":
            available, overrides = _atomic_header(path)
            separator = "\t"
        else:
            separator = separator or ("\t" if fmt == "tsv" else ",")
            with open(path, encoding="utf-8") as f:
                first = f.readline().rstrip("\r\n")
            available = next(csv.reader([first], delimiter=separator)) if first else []
            overrides = {}
    missing = [f"{role} column {name!r}" for role, name in wanted.items() if name not in available]
    if missing:
        raise LogFormatError(f"{path}: no {', '.join(missing)}; the file has columns {available}")

    if fmt != "parquet":
        # Atomic files: tokens are strings (RecBole's own reading); a fresh header replaces "name:type".
        if fmt == "atomic":
            schema = {name: overrides.get(name, pl.String) for name in available}
            scan = pl.scan_csv(path, separator=separator, has_header=False, skip_rows=1, schema=schema,
                               quote_char='"')
        else:
            scan = pl.scan_csv(path, separator=separator, has_header=True, infer_schema_length=10_000,
                               quote_char='"')
    select = [pl.col(name).alias(role) for role, name in wanted.items()]
    try:
        table = scan.select(select).with_row_index("row").collect()
    except pl.exceptions.PolarsError as err:
        table = _diagnose(path, fmt, separator, available, wanted, err)

    for role, name in wanted.items():
        nulls = table[role].is_null()
        if nulls.any():
            row = int(nulls.arg_max())
            raise LogFormatError(f"{path}: {_where(fmt, row, skip)}, column {name!r}: missing {role} value")
    if "timestamp" in table.columns:
        table = table.with_columns(_timestamp_expr(table["timestamp"], path, fmt, wanted["timestamp"], skip))
    return table


def _diagnose(path, fmt, separator, available, wanted, err) -> pl.DataFrame:
    """The typed fast read failed: re-read everything as text and name the first bad line and column."""
    message = str(err).splitlines()[0]
    if fmt == "parquet":
        raise LogFormatError(f"{path}: cannot read parquet: {message}") from err
    if "more fields" in message or "ragged" in message:
        where = _find_ragged_line(path, separator, len(available))
        raise LogFormatError(f"{path}: {where}") from err
    try:
        table = (pl.scan_csv(path, separator=separator, has_header=fmt != "atomic", skip_rows=int(fmt == "atomic"),
                             quote_char='"', schema={name: pl.String for name in available})
                 .select([pl.col(name).alias(role) for role, name in wanted.items()])
                 .with_row_index("row").collect())
    except pl.exceptions.PolarsError as err2:
        raise LogFormatError(f"{path}: cannot parse: {str(err2).splitlines()[0]}") from err2
    if fmt == "atomic" and "timestamp" in table.columns:
        bad = table["timestamp"].is_not_null() & table["timestamp"].cast(pl.Float64, strict=False).is_null()
        if bad.any():
            row = int(bad.arg_max())
            raise LogFormatError(f"{path}: line {row + 2}, column {wanted['timestamp']!r}: "
                                 f"{table['timestamp'][row]!r} is not a float") from err
    return table


def _timestamp_expr(ts: pl.Series, path: Path, fmt: str, name: str, skip: int) -> pl.Series:
    if ts.dtype.is_numeric():
        return ts
    if isinstance(ts.dtype, (pl.Datetime, pl.Date)):
        return ts.cast(pl.Datetime("us")).dt.epoch("us")
    if ts.dtype == pl.String:
        as_num = ts.cast(pl.Int64, strict=False)
        if as_num.null_count() > ts.null_count():
            as_num = ts.cast(pl.Float64, strict=False)
        if as_num.null_count() == ts.null_count():
            return as_num
        try:
            as_dt = ts.str.to_datetime(strict=False)
        except pl.exceptions.PolarsError:  # no date-time format fits the first values
            as_dt = None
        if as_dt is not None and as_dt.null_count() == ts.null_count():
            return as_dt.dt.epoch("us")
        row = int((as_num.is_null() & ts.is_not_null()).arg_max())
        raise LogFormatError(f"{path}: {_where(fmt, row, skip)}, column {name!r}: timestamp {ts[row]!r} is "
                             f"neither a number nor a date-time")
    raise LogFormatError(f"{path}: column {name!r}: timestamps of type {ts.dtype} are not supported")


def recbole_example_path(name: str = "ml-100k") -> Path:
    """``<site-packages>/recbole/dataset_example/<name>/<name>.inter`` from the installed recbole wheel.

    The MovieLens licence forbids redistribution, so seqmamba never ships the file; install the wheel
    (no dependencies are needed: ``pip install --no-deps recbole``) to read it in place.
    """
    spec = importlib.util.find_spec("recbole")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name} is read from the recbole wheel, which is not installed. Install it with "
                                f"`pip install --no-deps recbole` (seqmamba does not redistribute MovieLens).")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / name / f"{name}.inter"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the installed recbole wheel does not ship {name!r}")
    return path


def synthetic_log(n_users: int = 500, n_items: int = 300, mean_len: float = 40.0, min_len: int = 3,
                  noise: float = 0.2, seed: int = 0) -> pl.DataFrame:
    """A learnable log made inside the package (no download): columns user_id, item_id, timestamp.

    Each user walks around a ring of items with a personal stride (1, 2 or 3) from a random start; with
    probability ``noise`` a step is a uniformly random item instead. Lengths are ``min_len`` plus a
    geometric number with mean ``mean_len - min_len``. Vectorised numpy: fine for millions of events.
    """
    rng = np.random.default_rng(seed)
    extra = max(mean_len - min_len, 1e-9)
    lengths = min_len + rng.geometric(1.0 / (1.0 + extra), size=n_users) - 1
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    user = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    t = np.arange(offsets[-1], dtype=np.int64) - offsets[:-1][user]  # position within the user
    stride = rng.integers(1, 4, size=n_users)[user]
    start = rng.integers(0, n_items, size=n_users)[user]
    item = (start + t * stride) % n_items
    random = rng.random(item.shape[0]) < noise
    item[random] = rng.integers(0, n_items, size=int(random.sum()))
    timestamp = 1_600_000_000 + rng.integers(0, 10 ** 6, size=n_users)[user] + 60 * t
    return pl.DataFrame({"user_id": user, "item_id": item + 1, "timestamp": timestamp})


# ----------------------------------------------------------------------------------------------------
# Filtering and id maps


def k_core(table: pl.DataFrame, user_min: int = 0, item_min: int = 0, max_rounds: int = 1000) -> pl.DataFrame:
    """Drop users with fewer than ``user_min`` and items with fewer than ``item_min`` interactions,
    repeatedly, until every remaining user and item passes (RecBole's ``user_inter_num_interval`` /
    ``item_inter_num_interval`` lower bounds)."""
    if user_min <= 1 and item_min <= 1:
        return table
    for _ in range(max_rounds):
        keep = (pl.len().over("user") >= user_min) & (pl.len().over("item") >= item_min)
        filtered = table.filter(keep)
        if filtered.height == table.height:
            return filtered
        table = filtered
    raise RuntimeError(f"k_core: not converged after {max_rounds} rounds")


class UnknownIdError(KeyError):
    """Ids that the model's id map does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass
class IdMap:
    """Raw user/item ids <-> contiguous indices: user ``u`` is ``users[u]``; item ``i`` (1-based, 0 is
    padding) is ``items[i - 1]``. Saved as ``users.parquet`` / ``items.parquet`` (written atomically)."""

    users: pl.Series
    items: pl.Series

    @property
    def n_users(self) -> int:
        return self.users.len()

    @property
    def n_items(self) -> int:
        return self.items.len()

    def encode_users(self, raw) -> np.ndarray:
        """Raw user ids -> indices 0..n_users-1 (``int64``); unknown ids raise :class:`UnknownIdError`."""
        return _encode(self.users, raw, "user", base=0)

    def encode_items(self, raw) -> np.ndarray:
        """Raw item ids -> indices 1..n_items (``int64``); unknown ids raise :class:`UnknownIdError`."""
        return _encode(self.items, raw, "item", base=1)

    def decode_users(self, index) -> pl.Series:
        return self.users.gather(np.asarray(index, dtype=np.int64))

    def decode_items(self, index) -> pl.Series:
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 1 or index.max() > self.n_items):
            raise IndexError(f"item indices must be in 1..{self.n_items}, got {index.min()}..{index.max()}")
        return self.items.gather(index - 1)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, series in (("users", self.users), ("items", self.items)):
            frame = pl.DataFrame({"index": np.arange(series.len()) + (name == "items"), "id": series})
            atomic_write(directory / f"{name}.parquet", lambda tmp, f=frame: f.write_parquet(tmp))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "IdMap":
        directory = Path(directory)
        series = {}
        for name in ("users", "items"):
            path = directory / f"{name}.parquet"
            if not path.is_file():
                raise FileNotFoundError(f"id map {path} does not exist (it is written beside the checkpoints)")
            frame = pl.read_parquet(path).sort("index")
            series[name] = frame["id"].alias(name)
        return cls(series["users"], series["items"])


def _encode(known: pl.Series, raw, what: str, base: int) -> np.ndarray:
    raw = raw if isinstance(raw, pl.Series) else pl.Series(list(raw) if not isinstance(raw, np.ndarray) else raw)
    if raw.null_count():
        raise UnknownIdError(f"{raw.null_count()} missing {what} id(s) (null)")
    cast = raw.cast(known.dtype, strict=False)  # ids that cannot even take the map's type are unknown too
    lookup = pl.DataFrame({"id": known, "index": pl.int_range(base, known.len() + base, eager=True)})
    found = pl.DataFrame({"id": cast}).join(lookup, on="id", how="left", maintain_order="left")["index"]
    if found.null_count():
        unknown = raw.filter(found.is_null()).unique(maintain_order=True)
        shown = ", ".join(repr(x) for x in unknown.head(5).to_list())
        raise UnknownIdError(f"{unknown.len()} unknown {what} id(s) (not in the training data's id map): "
                             f"{shown}{', ...' if unknown.len() > 5 else ''}")
    return found.to_numpy().astype(np.int64)


def remap_ids(table: pl.DataFrame) -> tuple[pl.DataFrame, IdMap]:
    """Replace raw ids by indices: users 0..U-1 and items 1..I in sorted order of the raw ids."""
    users = table["user"].unique().sort()
    items = table["item"].unique().sort()
    table = table.with_columns((pl.col("user").rank("dense") - 1).cast(pl.Int64).alias("user"),
                               pl.col("item").rank("dense").cast(pl.Int32).alias("item"))
    return table, IdMap(users.alias("users"), items.alias("items"))


# ----------------------------------------------------------------------------------------------------
# Sequences and splits


@dataclass
class Sequences:
    """All users' chronological item sequences, concatenated (see the module docstring)."""

    items: np.ndarray
    """(n_events,) int32 item indices (1..n_items)."""
    offsets: np.ndarray
    """(n_users + 1,) int64; user u owns items[offsets[u]:offsets[u + 1]]."""
    timestamps: np.ndarray | None = None
    """(n_events,) timestamps aligned with items, or None when the log has none."""

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def user(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u]:self.offsets[u + 1]]


def build_sequences(table: pl.DataFrame, n_users: int | None = None) -> Sequences:
    """Per-user chronological sequences from a remapped table (``user`` 0..U-1, ``item``, optional
    ``timestamp``, ``row``). Sorted by (user, timestamp, file row): ties in time keep file order."""
    keys = ["user", "timestamp", "row"] if "timestamp" in table.columns else ["user", "row"]
    table = table.sort(keys)
    user = table["user"].to_numpy()
    n_users = int(user.max()) + 1 if n_users is None and len(user) else (n_users or 0)
    counts = np.bincount(user, minlength=n_users)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    timestamps = table["timestamp"].to_numpy() if "timestamp" in table.columns else None
    return Sequences(table["item"].to_numpy().astype(np.int32), offsets, timestamps)


@dataclass
class Split:
    """Training parts and evaluation targets (absolute positions into ``Sequences.items``)."""

    train_end: np.ndarray
    """(n_users,) exclusive end of each user's training part."""
    valid_users: np.ndarray
    valid_pos: np.ndarray
    test_users: np.ndarray
    test_pos: np.ndarray


def leave_one_out(seqs: Sequences) -> Split:
    """RecBole's LS valid_and_test with TO ordering (see the module docstring)."""
    start, end = seqs.offsets[:-1], seqs.offsets[1:]
    n = end - start
    users = np.arange(seqs.n_users, dtype=np.int64)
    has_test, has_valid = n >= 2, n >= 3
    train_end = end - has_test.astype(np.int64) - has_valid.astype(np.int64)
    return Split(train_end, users[has_valid], (end - 2)[has_valid], users[has_test], (end - 1)[has_test])


def time_cutoff(seqs: Sequences, valid_from: float, test_from: float) -> Split:
    """Global temporal split at two timestamps (see the module docstring). Targets with no earlier
    interaction of their user cannot be scored from a history; they are left out and reported."""
    if seqs.timestamps is None:
        raise ValueError("time_cutoff needs timestamps; the log was read without a timestamp column")
    if not valid_from <= test_from:
        raise ValueError(f"time_cutoff: need valid_from <= test_from, got {valid_from} > {test_from}")
    start, end = seqs.offsets[:-1], seqs.offsets[1:]
    user_of = np.repeat(np.arange(seqs.n_users), seqs.lengths)
    ts = seqs.timestamps
    before_valid = np.bincount(user_of, weights=ts < valid_from, minlength=seqs.n_users).astype(np.int64)
    before_test = np.bincount(user_of, weights=ts < test_from, minlength=seqs.n_users).astype(np.int64)
    train_end = start + before_valid
    users = np.arange(seqs.n_users, dtype=np.int64)
    valid_ok = (before_valid < before_test) & (before_valid > 0)
    test_ok = (start + before_test < end) & (before_test > 0)
    no_hist_valid = int(((before_valid < before_test) & (before_valid == 0)).sum())
    no_hist_test = int(((start + before_test < end) & (before_test == 0)).sum())
    if no_hist_valid or no_hist_test:
        rank_zero_info(f"time split: {no_hist_valid} validation and {no_hist_test} test targets have no earlier "
                       f"interaction of their user (cold start) and are not evaluated")
    return Split(train_end, users[valid_ok], train_end[valid_ok], users[test_ok], (start + before_test)[test_ok])


def training_windows(start: np.ndarray, train_end: np.ndarray, max_len: int,
                     mode: Literal["all", "last"] = "all",
                     stride: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows ``(a, e, f)``: inputs ``items[a:e-1]``, targets ``items[a+1:e]`` (at most ``max_len``), of
    which those at positions ``>= f`` are trained.

    ``all``: windows ending at ``train_end``, ``train_end - stride``, ... (``stride`` defaults to
    ``max_len``), so that each of a user's targets (every training item but the first) is trained in
    exactly one window. ``last``: the newest window only, all of its targets trained.
    """
    stride = max_len if stride is None else stride
    if not 1 <= stride <= max_len:
        raise ValueError(f"window stride must be in 1..max_len={max_len}, got {stride}")
    n_targets = np.maximum(train_end - start - 1, 0)
    if mode == "all":
        count = -(-n_targets // stride)
    elif mode == "last":
        count, stride = (n_targets > 0).astype(np.int64), max_len
    else:
        raise ValueError(f"train_windows must be 'all' or 'last', got {mode!r}")
    owner = np.repeat(np.arange(len(start)), count)
    k = np.arange(owner.size) - np.repeat(np.cumsum(count) - count, count)
    ends = train_end[owner] - k * stride
    starts = np.maximum(start[owner], ends - 1 - max_len)
    first = np.maximum(starts + 1, ends - stride)
    return starts.astype(np.int64), ends.astype(np.int64), first.astype(np.int64)


def gather_padded(items: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                  width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(b, width)`` int64 ids of ``items[starts[j]:ends[j]]`` and their bool mask."""
    lengths = ends - starts
    width = int(lengths.max()) if width is None else width
    cols = np.arange(width)
    mask = cols[None, :] < lengths[:, None]
    index = np.where(mask, starts[:, None] + cols[None, :], 0)
    ids = np.where(mask, items[index], PAD)
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask)


# ----------------------------------------------------------------------------------------------------
# Datasets


class _IndexDataset(Dataset):
    """Yields indices; the collate function gathers a whole batch with numpy at once."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


class TrainCollate:
    """Batch of training windows: ``items`` (b, l) inputs, ``targets`` (b, l) next items, ``mask`` (b, l)
    real positions, ``loss_mask`` (b, l) the positions whose targets are trained (``first`` onwards)."""

    def __init__(self, items: np.ndarray, starts: np.ndarray, ends: np.ndarray, first: np.ndarray | None = None):
        self.items, self.starts, self.ends = items, starts, ends
        self.first = starts + 1 if first is None else first

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = np.asarray(indices)
        starts, ends = self.starts[index], self.ends[index]
        inputs, mask = gather_padded(self.items, starts, ends - 1)
        targets, _ = gather_padded(self.items, starts + 1, ends)
        target_pos = starts[:, None] + 1 + np.arange(inputs.shape[1])[None, :]
        loss_mask = mask & torch.from_numpy(target_pos >= self.first[index][:, None])
        return {"items": inputs, "targets": targets, "mask": mask, "loss_mask": loss_mask}


class EvalCollate:
    """Batch of evaluation targets: ``items`` (b, l) the last ``max_len`` items before the target,
    ``mask`` (b, l), ``target`` (b,), ``user`` (b,), and the whole history before the target as
    (``history_row``, ``history_item``) pairs for ``exclude_history``."""

    def __init__(self, items: np.ndarray, offsets: np.ndarray, users: np.ndarray, positions: np.ndarray,
                 max_len: int):
        self.items, self.offsets, self.users, self.positions, self.max_len = items, offsets, users, positions, max_len

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = np.asarray(indices)
        users, pos = self.users[index], self.positions[index]
        first = self.offsets[users]
        inputs, mask = gather_padded(self.items, np.maximum(first, pos - self.max_len), pos)
        history_len = pos - first
        row = np.repeat(np.arange(len(index)), history_len)
        flat = np.arange(row.size) - np.repeat(np.cumsum(history_len) - history_len, history_len) + first[row]
        return {"items": inputs, "mask": mask, "target": torch.from_numpy(self.items[pos].astype(np.int64)),
                "user": torch.from_numpy(users), "history_row": torch.from_numpy(row),
                "history_item": torch.from_numpy(self.items[flat].astype(np.int64))}


# ----------------------------------------------------------------------------------------------------
# DataModule


@dataclass
class Prepared:
    """Everything a run needs from a log."""

    seqs: Sequences
    split: Split
    id_map: IdMap


def prepare(table: pl.DataFrame, user_min_count: int = 0, item_min_count: int = 0,
            split: Literal["loo", "time"] = "loo", valid_from: float | None = None,
            test_from: float | None = None) -> Prepared:
    """k-core filter, remap ids, build sequences and split. ``valid_from``/``test_from`` in (0, 1) are
    quantiles of the timestamps; otherwise timestamps."""
    n_raw = table.height
    table = k_core(table, user_min_count, item_min_count)
    if table.height == 0:
        raise ValueError(f"k-core filtering (users >= {user_min_count}, items >= {item_min_count}) removed all "
                         f"{n_raw} interactions")
    table, id_map = remap_ids(table)
    seqs = build_sequences(table, id_map.n_users)
    rank_zero_info(f"interactions: {n_raw} read, {table.height} after k-core; {id_map.n_users} users, "
                   f"{id_map.n_items} items")
    if split == "loo":
        parts = leave_one_out(seqs)
    elif split == "time":
        if valid_from is None or test_from is None:
            raise ValueError("split='time' needs valid_from and test_from (timestamps, or quantiles in (0, 1))")
        cut = []
        for value in (valid_from, test_from):
            cut.append(float(np.quantile(seqs.timestamps, value)) if 0 < value < 1 else value)
        parts = time_cutoff(seqs, *cut)
    else:
        raise ValueError(f"split must be 'loo' or 'time', got {split!r}")
    return Prepared(seqs, parts, id_map)


class RecDataModule(L.LightningDataModule):
    """Interaction log -> training windows and leave-one-out (or time-cutoff) evaluation batches.

    The log is ``path`` (CSV/TSV/parquet/RecBole ``.inter``; columns named by ``user_col``, ``item_col``,
    ``time_col``), or ``dataset="ml-100k"`` (read from the installed recbole wheel) or
    ``dataset="synthetic"`` (generated in memory from the ``synthetic_*`` settings). ``n_items`` and
    ``n_users`` are known after ``setup()``; ``save_id_map(directory)`` writes the id map (the module does
    so beside the checkpoints when fitting).
    """

    def __init__(self, path: str | None = None, dataset: Literal["synthetic", "ml-100k"] | None = None,
                 format: Literal["auto", "csv", "tsv", "parquet", "atomic"] = "auto",
                 user_col: str = "user_id", item_col: str = "item_id", time_col: str | None = "timestamp",
                 separator: str | None = None, user_min_count: int = 0, item_min_count: int = 0,
                 split: Literal["loo", "time"] = "loo", valid_from: float | None = None,
                 test_from: float | None = None, max_len: int = 200,
                 train_windows: Literal["all", "last"] = "all", window_stride: int | None = None,
                 batch_size: int = 256,
                 eval_batch_size: int = 256, num_workers: int = 0, synthetic_users: int = 500,
                 synthetic_items: int = 300, synthetic_mean_len: float = 40.0, seed: int = 0):
        super().__init__()
        if (path is None) == (dataset is None):
            raise ValueError("RecDataModule: give exactly one of path (a log file) and dataset "
                             "('synthetic' or 'ml-100k')")
        if max_len < 1:
            raise ValueError(f"RecDataModule.max_len must be >= 1, got {max_len}")
        self.save_hyperparameters()
        self.prepared: Prepared | None = None
        self._train: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    # sizes for the model --------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return self._require().id_map.n_items

    @property
    def n_users(self) -> int:
        return self._require().id_map.n_users

    @property
    def id_map(self) -> IdMap:
        return self._require().id_map

    def _require(self) -> Prepared:
        if self.prepared is None:
            self.setup("fit")
        return self.prepared

    def read_table(self) -> pl.DataFrame:
        hp = self.hparams
        if hp.dataset == "synthetic":
            table = synthetic_log(hp.synthetic_users, hp.synthetic_items, hp.synthetic_mean_len, seed=hp.seed)
            return table.rename({"user_id": "user", "item_id": "item"}).with_row_index("row")
        if hp.dataset == "ml-100k":
            return read_interactions(recbole_example_path("ml-100k"), ColumnMap("user_id", "item_id", "timestamp"))
        return read_interactions(hp.path, ColumnMap(hp.user_col, hp.item_col, hp.time_col), hp.format,
                                 hp.separator)

    def setup(self, stage: str | None = None) -> None:
        if self.prepared is not None:
            return
        hp = self.hparams
        self.prepared = prepare(self.read_table(), hp.user_min_count, hp.item_min_count, hp.split,
                                hp.valid_from, hp.test_from)
        seqs, split = self.prepared.seqs, self.prepared.split
        self._train = training_windows(seqs.offsets[:-1], split.train_end, hp.max_len, hp.train_windows,
                                       hp.window_stride)
        rank_zero_info(f"training windows: {len(self._train[0])} (max_len {hp.max_len}, {hp.train_windows}, "
                       f"stride {hp.window_stride or hp.max_len}); "
                       f"validation targets {len(split.valid_users)}, test targets {len(split.test_users)}")

    def save_id_map(self, directory: str | Path) -> Path:
        """Write ``users.parquet`` and ``items.parquet`` into ``directory/id_map`` (atomically)."""
        return self.id_map.save(Path(directory) / "id_map")

    # loaders ----------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        self._require()
        starts, ends, first = self._train
        if len(starts) == 0:
            raise ValueError("no training windows: every user has fewer than two training interactions")
        return DataLoader(_IndexDataset(len(starts)), batch_size=self.hparams.batch_size, shuffle=True,
                          collate_fn=TrainCollate(self.prepared.seqs.items, starts, ends, first),
                          num_workers=self.hparams.num_workers)

    def _eval_loader(self, users: np.ndarray, positions: np.ndarray) -> DataLoader:
        seqs = self.prepared.seqs
        return DataLoader(_IndexDataset(len(users)), batch_size=self.hparams.eval_batch_size, shuffle=False,
                          collate_fn=EvalCollate(seqs.items, seqs.offsets, users, positions, self.hparams.max_len),
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        split = self._require().split
        return self._eval_loader(split.valid_users, split.valid_pos)

    def test_dataloader(self) -> DataLoader:
        split = self._require().split
        return self._eval_loader(split.test_users, split.test_pos)
