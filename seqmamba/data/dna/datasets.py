"""Datasets of DNA token ids: genome windows (for masked-LM pretraining) and labelled sequences, plus the
masking and padding collate functions.

Every sample is a dict of numpy arrays; ``collate`` pads a batch with [PAD] on the right and returns
``input_ids (b, l)``, ``mask (b, l)`` (True at real positions), ``lengths (b,)`` and, where present,
``labels`` (``(b, l)`` for masked LM with -100 where no loss counts, ``(b,)`` for sequence labels).
Randomness (window starts, strand, masking) is drawn from a generator seeded by (seed, epoch, index), so a
run that resumes at an epoch boundary sees the same samples.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from seqmamba.data.dna.fasta import Genome, Interval, iter_fasta, open_text, resolve_path
from seqmamba.data.dna.tokenizer import (BASE_IDS, COMPLEMENT_MAP, IGNORE_INDEX, MASK_ID, N_ID, PAD_ID, encode,
                                         reverse_complement_ids)

_COMPLEMENT = np.asarray(COMPLEMENT_MAP, dtype=np.int64)


def mlm_mask(ids: np.ndarray, rng: np.random.Generator, probability: float = 0.15,
             mask_fraction: float = 0.8, random_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """BERT/Caduceus masking of one sequence ``(l,)`` -> (inputs ``(l,)``, labels ``(l,)``).

    N becomes [PAD] in the inputs and is never a target. Each base is chosen with ``probability``; a chosen
    base becomes [MASK] (80%), a random base (10%) or stays (10%); labels hold the original id at chosen
    positions and -100 elsewhere.
    """
    ids = np.asarray(ids, dtype=np.int64)
    inputs = np.where(ids == N_ID, PAD_ID, ids)
    is_base = np.isin(ids, BASE_IDS)
    chosen = is_base & (rng.random(ids.shape) < probability)
    labels = np.where(chosen, ids, IGNORE_INDEX)
    action = rng.random(ids.shape)
    to_mask = chosen & (action < mask_fraction)
    to_random = chosen & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    inputs[to_mask] = MASK_ID
    inputs[to_random] = rng.choice(np.asarray(BASE_IDS), size=int(to_random.sum()))
    return inputs, labels


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Pad ``input_ids`` (and per-position ``labels``) on the right; add ``mask`` and ``lengths``."""
    lengths = torch.tensor([len(s["input_ids"]) for s in samples], dtype=torch.long)
    width = int(lengths.max())
    batch = {"input_ids": torch.full((len(samples), width), PAD_ID, dtype=torch.long)}
    for i, s in enumerate(samples):
        batch["input_ids"][i, : lengths[i]] = torch.as_tensor(s["input_ids"])
    batch["mask"] = torch.arange(width)[None, :] < lengths[:, None]
    batch["lengths"] = lengths
    if "labels" in samples[0]:
        first = np.asarray(samples[0]["labels"])
        if first.ndim == 1 and first.shape[0] == lengths[0] and samples[0].get("per_position", True):
            labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
            for i, s in enumerate(samples):
                labels[i, : lengths[i]] = torch.as_tensor(s["labels"])
            batch["labels"] = labels
        else:
            batch["labels"] = torch.as_tensor(np.stack([np.asarray(s["labels"]) for s in samples]))
    for key in ("record", "start", "strand", "index"):
        if key in samples[0]:
            batch[key] = [s[key] for s in samples]
    return batch


class EpochSampler(DistributedSampler):
    """Yields ``epoch * n + i`` for i in 0..n-1, so a dataset can seed each sample by (epoch, index).

    ``position_fn`` returns (current epoch, samples of this epoch this process already trained on): the
    trainer's, so that a run resumed from a checkpoint (at an epoch boundary or mid-epoch) sees exactly the
    samples it would have seen; without it the sampler counts its own passes.

    Under ``torch.distributed`` (DDP) the sampler shards itself: rank r of W takes every W-th sample of the
    epoch's order, starting at r, after the ``W * done`` samples all ranks already trained on, and every rank
    gets the same count (the last ``< W`` samples of an epoch are left out). It is a ``DistributedSampler`` so
    that Lightning keeps it instead of wrapping it in one, whose padding would repeat samples on a mid-epoch
    resume.
    """

    def __init__(self, n: int, position_fn=None):  # no super().__init__: rank and world are read per pass
        self.n, self.position_fn, self._passes = n, position_fn, 0

    @staticmethod
    def _rank_world() -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        return self.n // self._rank_world()[1]

    def set_epoch(self, epoch: int) -> None:  # the epoch comes from position_fn (or the pass count)
        pass

    def _position(self) -> tuple[int, int]:
        return (self._passes, 0) if self.position_fn is None else self.position_fn()

    def order(self, epoch: int) -> np.ndarray:
        return np.arange(self.n)

    def __iter__(self):
        epoch, done = self._position()
        rank, world = self._rank_world()
        self._passes += 1
        skip = done * world if 0 < done * world < self.n else 0  # a finished epoch restarts at its next pass
        rest = self.order(epoch)[skip:]
        mine = rest[rank::world][: len(rest) // world]
        return iter((epoch * self.n + mine).tolist())


class GenomeWindows(Dataset):
    """Windows of ``length`` bases from a ``Genome``, for masked-LM pretraining or scoring.

    mode "random": ``samples`` windows a pass, an interval chosen with probability proportional to its length
    and a uniform start inside it; intervals shorter than ``length`` give the whole interval (padded in the
    batch). mode "tile": windows at ``stride`` (default ``length``) covering every interval; the last window of
    an interval ends at its end (it may overlap the previous one), so every base is covered and none dropped.
    ``rc_augment`` reverse-complements a sample with probability 1/2. ``mlm_probability`` > 0 adds masked-LM
    ``labels``; 0 returns plain ids.
    """

    def __init__(self, genome: Genome, length: int, intervals: list[Interval] | None = None,
                 mode: str = "random", samples: int = 1000, stride: int | None = None, rc_augment: bool = False,
                 mlm_probability: float = 0.15, seed: int = 0):
        if length < 1:
            raise ValueError(f"GenomeWindows: length must be >= 1, got {length}")
        if mode not in ("random", "tile"):
            raise ValueError(f"GenomeWindows: mode must be 'random' or 'tile', got {mode!r}")
        self.genome, self.length, self.mode, self.seed = genome, length, mode, seed
        self.rc_augment, self.mlm_probability = rc_augment, mlm_probability
        if intervals is None:
            intervals = [Interval(name, 0, n) for name, n in genome.lengths.items()]
        for iv in intervals:
            n = genome.lengths.get(iv.chrom)
            if n is None:
                raise KeyError(f"interval {iv.chrom}:{iv.start}-{iv.end}: record {iv.chrom!r} is not in the FASTA")
            if iv.end > n:
                raise ValueError(f"interval {iv.chrom}:{iv.start}-{iv.end} ends after the record (length {n})")
        if not intervals:
            raise ValueError("GenomeWindows: no intervals")
        self.intervals = intervals
        sizes = np.array([iv.end - iv.start for iv in intervals], dtype=np.float64)
        self._weights = sizes / sizes.sum()
        if mode == "tile":
            step = stride or length
            self.tiles = []
            for iv in intervals:
                starts = list(range(iv.start, max(iv.end - length, iv.start) + 1, step))
                if starts[-1] + length < iv.end:
                    starts.append(iv.end - length)
                self.tiles += [(iv.chrom, s, min(s + length, iv.end)) for s in starts]
            self.samples = len(self.tiles)
        else:
            self.samples = samples

    def __len__(self) -> int:
        return self.samples

    def locate(self, index: int, rng: np.random.Generator) -> tuple[str, int, int]:
        if self.mode == "tile":
            return self.tiles[index % self.samples]
        iv = self.intervals[rng.choice(len(self.intervals), p=self._weights)]
        span = iv.end - iv.start
        start = iv.start + (int(rng.integers(0, span - self.length + 1)) if span > self.length else 0)
        return iv.chrom, start, min(start + self.length, iv.end)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        chrom, start, end = self.locate(index, rng)
        ids = self.genome.window(chrom, start, end)
        strand = "+"
        if self.rc_augment and rng.random() < 0.5:
            ids, strand = reverse_complement_ids(ids), "-"
        sample = {"record": chrom, "start": start, "strand": strand}
        if self.mlm_probability > 0:
            sample["input_ids"], sample["labels"] = mlm_mask(ids, rng, self.mlm_probability)
        else:
            sample["input_ids"] = ids
        return sample


# ----------------------------------------------------------------------------------------------- labelled tables

def read_table(path: str | os.PathLike, sequence_column: str = "sequence", label_column: str | None = "label",
               genome: Genome | None = None, bed_label_column: int = 3, label_as_text: bool = False):
    """A labelled table as a polars DataFrame with columns ``sequence`` and (if asked) ``label``.

    CSV (``.csv``), TSV (``.tsv``, ``.txt``), parquet (``.parquet``), FASTA (``.fa``, ``.fasta``, ``.fna``,
    optionally ``.gz``) whose headers carry the label as ``label=VALUE`` or as the last word, or BED (``.bed``)
    intervals of ``genome`` with the label in column ``bed_label_column`` (0-based; 3 = the name column).
    """
    import polars as pl

    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table does not exist: {path}")
    suffixes = [s.lower() for s in path.suffixes]
    suffixes = suffixes[:-1] if suffixes and suffixes[-1] in (".gz", ".xz") else suffixes
    kind = suffixes[-1] if suffixes else ""
    if kind == ".bed":
        if genome is None:
            raise ValueError(f"{path}: a BED table needs the genome FASTA (--data.init_args.genome=PATH)")
        from seqmamba.data.dna.fasta import read_bed
        intervals = read_bed(path, label_column=bed_label_column if label_column is not None else None)
        rows = {"sequence": [], "id": []}
        for iv in intervals:
            if iv.chrom not in genome.records or iv.end > len(genome[iv.chrom]):
                raise ValueError(f"{path}: interval {iv.chrom}:{iv.start}-{iv.end} is not inside the genome")
            rows["sequence"].append(_decode_ids(genome.window(iv.chrom, iv.start, iv.end)))
            rows["id"].append(f"{iv.chrom}:{iv.start}-{iv.end}")
        if label_column is not None:
            rows["label"] = [iv.label for iv in intervals]
        return pl.DataFrame(rows)
    if kind in (".fa", ".fasta", ".fna", ".fas"):
        rows = {"sequence": [], "id": []}
        labels = []
        for record in iter_fasta(path):
            rows["sequence"].append(_decode_ids(record.ids))
            rows["id"].append(record.name)
            if label_column is not None:
                labels.append(_header_label(record.description, label_column, path, record.name))
        if label_column is not None:
            rows["label"] = labels
        return pl.DataFrame(rows)
    if kind == ".parquet":
        table = pl.read_parquet(path)
    elif kind in (".csv", ".tsv", ".txt"):
        with open_text(path) as handle:
            overrides = {label_column: pl.String} if label_as_text and label_column else None
            table = pl.read_csv(handle.read().encode(), separator="," if kind == ".csv" else "\t",
                                infer_schema_length=None, schema_overrides=overrides)
    else:
        raise ValueError(f"{path}: unknown table format {kind!r} (use .csv, .tsv, .parquet or FASTA)")
    needed = [sequence_column] + ([label_column] if label_column is not None else [])
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; columns are {table.columns}")
    renamed = table.rename({sequence_column: "sequence", **({label_column: "label"} if label_column else {})})
    return renamed


def _decode_ids(ids: np.ndarray) -> str:
    from seqmamba.data.dna.tokenizer import decode
    return decode(ids)


def _header_label(description: str, key: str, path: Path, name: str) -> str:
    words = description.split()
    for word in words[1:]:
        if word.startswith(f"{key}="):
            return word.split("=", 1)[1]
    if len(words) < 2:
        raise ValueError(f"{path}: record {name!r} has no label in its header (expected '{key}=VALUE' or a last "
                         "word)")
    return words[-1]


class LabelledSequences(Dataset):
    """Tokenised sequences with a class index or a regression target per sequence.

    ``classes``: the class names in index order (classification); None for regression. ``rc_augment`` flips
    the strand with probability 1/2 and maps the class through ``rc_label_map`` (for labels that change under
    reverse complement, e.g. ``[1, 0]`` swaps classes 0 and 1); None keeps the label.
    """

    def __init__(self, table, source: str, classes: list[str] | None = None, max_length: int | None = None,
                 rc_augment: bool = False, rc_label_map: list[int] | None = None, seed: int = 0,
                 level: str = "sequence"):
        import polars as pl

        self.source, self.classes, self.rc_augment, self.seed = source, classes, rc_augment, seed
        self.level = level
        self.rc_label_map = None if rc_label_map is None else np.asarray(rc_label_map)
        self.ids, self.n_ambiguous = [], 0
        for row, sequence in enumerate(table["sequence"].to_list(), 1):
            if sequence is None or not sequence:
                raise ValueError(f"{source}: row {row} has an empty sequence")
            ids, n_ambiguous = encode(sequence, source, f"row {row}")
            if max_length is not None and len(ids) > max_length:
                raise ValueError(f"{source}: row {row} is {len(ids)} bases long, longer than max_length="
                                 f"{max_length}")
            self.ids.append(ids)
            self.n_ambiguous += n_ambiguous
        self.labels = None
        if "label" in table.columns and level == "token":
            self.labels = [token_labels(v, len(ids), source, row)
                           for row, (v, ids) in enumerate(zip(table["label"].to_list(), self.ids), 1)]
            if classes is not None:
                high = max(int(lab.max()) for lab in self.labels)
                if high >= len(classes):
                    raise ValueError(f"{source}: per-position class {high} >= number of classes {len(classes)}")
        elif "label" in table.columns:
            values = table["label"]
            if values.null_count():
                raise ValueError(f"{source}: {values.null_count()} row(s) have no label")
            if classes is None:
                self.labels = values.cast(pl.Float32).to_numpy()
            else:
                index = {c: i for i, c in enumerate(classes)}
                texts = [str(v) for v in values.to_list()]
                unknown = sorted(set(texts) - set(index))
                if unknown:
                    raise ValueError(f"{source}: label(s) {unknown[:5]} are not among the classes {classes}")
                self.labels = np.array([index[t] for t in texts], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        """``index`` may run past the table (``EpochSampler``): the row is ``index % len``, the strand is drawn
        from (seed, index), so each pass draws new strands."""
        row = index % len(self.ids)
        ids = self.ids[row].astype(np.int64)
        sample = {"index": row, "strand": "+"}
        label = None if self.labels is None else self.labels[row]
        if self.rc_augment:
            rng = np.random.default_rng([self.seed, index])
            if rng.random() < 0.5:
                ids, sample["strand"] = reverse_complement_ids(ids), "-"
                if label is not None and self.level == "token":
                    label = label[::-1]
                if label is not None and self.rc_label_map is not None:
                    label = self.rc_label_map[label]
        sample["input_ids"] = ids
        if label is not None:
            sample["labels"] = np.asarray(label)
            sample["per_position"] = self.level == "token"
        return sample


def token_labels(value, length: int, source: str, row: int) -> np.ndarray:
    """Per-position class indices from a list of ints or a string of digits (one per base)."""
    if isinstance(value, str):
        if not value.isdigit():
            raise ValueError(f"{source}: row {row}: per-position labels must be digits, got {value[:20]!r}")
        labels = np.frombuffer(value.encode(), dtype=np.uint8).astype(np.int64) - ord("0")
    else:
        labels = np.asarray(value, dtype=np.int64)
    if labels.shape != (length,):
        raise ValueError(f"{source}: row {row}: {labels.size} per-position labels for {length} bases")
    if (labels < 0).any():
        raise ValueError(f"{source}: row {row}: negative per-position label")
    return labels


def class_names(tables: list, task: str, level: str = "sequence") -> list[str] | None:
    """Class names over all tables: integer labels 0..max (class index = label), other labels sorted as text.
    Per-position labels (``level="token"``) are integers 0..max."""
    if task == "regression":
        return None
    if level == "token":
        high = -1
        for table in tables:
            if table is not None and "label" in table.columns:
                for row, v in enumerate(table["label"].to_list(), 1):
                    if v is not None and len(v):
                        high = max(high, int(token_labels(v, len(v), "table", row).max()))
        return None if high < 0 else [str(i) for i in range(high + 1)]
    values = set()
    for table in tables:
        if table is not None and "label" in table.columns:
            values.update(str(v) for v in table["label"].drop_nulls().to_list())
    if not values:
        return None
    try:
        ints = {int(v) for v in values}
    except ValueError:
        return sorted(values)
    if min(ints) < 0:
        raise ValueError(f"integer class labels must be >= 0, got {min(ints)}")
    return [str(i) for i in range(max(ints) + 1)]


def shuffled_windows_table(fasta: str | os.PathLike, length: int, start_fraction: float, end_fraction: float,
                           n: int, seed: int = 0):
    """A labelled table from one genome: ``n`` windows of ``length`` bases from the part of each record
    between ``start_fraction`` and ``end_fraction`` of its length; half kept as they are (label 1: genome), half
    with their bases shuffled (label 0: shuffled, same base composition). Telling them apart needs the order
    of the bases (k-mers, codons), not their counts; the label does not change under reverse complement."""
    import polars as pl

    genome = Genome(fasta)
    rng = np.random.default_rng(seed)
    records = list(genome.records.items())
    sequences, labels, names, starts = [], [], [], []
    for i in range(n):
        name, ids = records[i % len(records)]
        lo, hi = int(start_fraction * len(ids)), int(end_fraction * len(ids)) - length
        if hi < lo:
            raise ValueError(f"{name}: the region {start_fraction}-{end_fraction} is shorter than {length} bases")
        start = int(rng.integers(lo, hi + 1))
        window = np.array(ids[start:start + length], dtype=np.int64)
        label = i % 2
        if label == 0:
            window = rng.permutation(window)
        sequences.append(_decode_ids(window))
        labels.append(label)
        names.append(name)
        starts.append(start)
    return pl.DataFrame({"sequence": sequences, "label": labels, "record": names, "start": starts})
