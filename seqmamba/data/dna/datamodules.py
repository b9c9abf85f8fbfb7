"""LightningDataModules for DNA: genome windows for masked-LM pretraining, labelled tables for fine-tuning."""
from __future__ import annotations

from typing import Literal

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from seqmamba.data.dna.datasets import (EpochSampler, GenomeWindows, LabelledSequences, class_names, collate,
                                        read_table)
from seqmamba.data.dna.fasta import Genome, Interval, read_bed
from seqmamba.data.dna.tokenizer import VOCAB_SIZE


def _as_list(value) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


class DNAPretrainData(L.LightningDataModule):
    """Masked-LM windows from FASTA files (plain, .gz, bgzip, .xz; ``builtin:lambda_phage`` is packaged).

    Splits, in order of precedence: ``val_fasta`` (whole held-out genomes for validation and test); a ``bed``
    file whose ``split_column`` (0-based) says train/val/test per interval; otherwise the last ``val_fraction``
    of every record (or BED interval) is held out for validation and test. Training draws ``train_samples``
    random windows a pass (new ones each epoch); validation and test use ``val_samples`` fixed windows with
    fixed masks, so their losses compare across epochs.
    """

    vocab_size = VOCAB_SIZE

    def __init__(self, fasta: str | list[str] = "builtin:lambda_phage", length: int = 1024, batch_size: int = 8,
                 val_fasta: str | list[str] | None = None, bed: str | None = None, split_column: int | None = None,
                 val_fraction: float = 0.1, train_samples: int = 10000, val_samples: int = 256,
                 rc_augment: bool = True, mlm_probability: float = 0.15, num_workers: int = 0, seed: int = 0,
                 cache_dir: str | None = None):
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"DNAPretrainData: val_fraction must be in (0, 1), got {val_fraction}")
        if batch_size < 1 or length < 1:
            raise ValueError(f"DNAPretrainData: batch_size and length must be >= 1, got {batch_size}, {length}")
        self.fasta, self.val_fasta = _as_list(fasta), _as_list(val_fasta)
        self.length, self.batch_size, self.bed, self.split_column = length, batch_size, bed, split_column
        self.val_fraction, self.train_samples, self.val_samples = val_fraction, train_samples, val_samples
        self.rc_augment, self.mlm_probability = rc_augment, mlm_probability
        self.num_workers, self.seed, self.cache_dir = num_workers, seed, cache_dir
        self.splits: dict[str, GenomeWindows] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        genome = Genome(self.fasta, self.cache_dir, verbose=True)
        if self.val_fasta:
            train = None
            held_out = Genome(self.val_fasta, self.cache_dir)
            val = test = None
        else:
            held_out = genome
            intervals = (read_bed(self.bed, self.split_column) if self.bed else
                         [Interval(name, 0, n) for name, n in genome.lengths.items()])
            if self.bed and self.split_column is not None:
                bad = sorted({iv.split for iv in intervals} - {"train", "val", "test"})
                if bad:
                    raise ValueError(f"{self.bed}: split column values must be train/val/test, got {bad}")
                train = [iv for iv in intervals if iv.split == "train"]
                val = [iv for iv in intervals if iv.split == "val"]
                test = [iv for iv in intervals if iv.split == "test"] or val
                if not train or not val:
                    raise ValueError(f"{self.bed}: need intervals with split 'train' and 'val'")
            else:
                train, val = [], []
                for iv in intervals:
                    cut = iv.end - max(int(round(self.val_fraction * (iv.end - iv.start))), 1)
                    if cut <= iv.start:
                        raise ValueError(f"interval {iv.chrom}:{iv.start}-{iv.end} is too short to hold out "
                                         f"val_fraction={self.val_fraction}")
                    train.append(Interval(iv.chrom, iv.start, cut))
                    val.append(Interval(iv.chrom, cut, iv.end))
                test = val
        common = {"length": self.length, "mlm_probability": self.mlm_probability}
        self.splits["train"] = GenomeWindows(genome, intervals=train, samples=self.train_samples,
                                             rc_augment=self.rc_augment, seed=self.seed, **common)
        for name, intervals, offset in (("val", val, 1), ("test", test, 2)):
            self.splits[name] = GenomeWindows(held_out, intervals=intervals, samples=self.val_samples,
                                              rc_augment=False, seed=self.seed + 1000 * offset, **common)

    def _position(self) -> tuple[int, int]:
        return _trainer_position(getattr(self, "trainer", None), self.batch_size)

    def train_dataloader(self) -> DataLoader:
        data = self.splits["train"]
        return DataLoader(data, batch_size=self.batch_size, sampler=EpochSampler(len(data), self._position),
                          collate_fn=collate, num_workers=self.num_workers, drop_last=True,
                          persistent_workers=self.num_workers > 0)

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=False, collate_fn=collate,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


class DNATableData(L.LightningDataModule):
    """Labelled sequences from tables (CSV/TSV/parquet with ``sequence`` and ``label`` columns, FASTA with
    ``label=VALUE`` in the headers, or BED intervals of ``genome`` with the label in column
    ``bed_label_column``), padded per batch with a mask.

    ``task="classification"``: class names are the sorted union of the labels of all given tables (integers
    numerically), exposed as ``classes`` / ``num_classes`` after ``setup``. ``task="regression"``: float
    targets. ``rc_augment`` with ``rc_label_map`` (class index -> class index under reverse complement) trains
    strand-aware labels correctly. ``level="token"``: one class per base, given as a string of digits
    (CSV/TSV) or a list of integers (parquet) as long as the sequence; batches hold ``labels (b, l)`` with -100
    at padding.
    """

    vocab_size = VOCAB_SIZE

    def __init__(self, train: str | None = None, val: str | None = None, test: str | None = None,
                 predict: str | None = None, task: Literal["classification", "regression"] = "classification",
                 batch_size: int = 32, sequence_column: str = "sequence", label_column: str = "label",
                 max_length: int | None = None, rc_augment: bool = False, rc_label_map: list[int] | None = None,
                 genome: str | list[str] | None = None, bed_label_column: int = 3,
                 level: Literal["sequence", "token"] = "sequence", num_workers: int = 0, seed: int = 0):
        super().__init__()
        if task not in ("classification", "regression"):
            raise ValueError(f"DNATableData: task must be 'classification' or 'regression', got {task!r}")
        self.paths = {"train": train, "val": val, "test": test, "predict": predict}
        self.task, self.batch_size = task, batch_size
        self.sequence_column, self.label_column, self.max_length = sequence_column, label_column, max_length
        self.rc_augment, self.rc_label_map, self.num_workers, self.seed = rc_augment, rc_label_map, num_workers, seed
        self.genome, self.bed_label_column, self.level = genome, bed_label_column, level
        self.classes: list[str] | None = None
        self.splits: dict[str, LabelledSequences] = {}

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
        for split in needed.get(stage or "", []):
            if self.paths[split] is None and not (split == "val" and stage == "fit"):
                raise ValueError(f"DNATableData: stage {stage!r} needs --data.{split}=PATH (a CSV/TSV/parquet "
                                 f"table with columns {self.sequence_column!r}, {self.label_column!r})")
        tables = {}
        genome = None
        for split, path in self.paths.items():
            if path is not None and split not in self.splits:
                label = None if split == "predict" else self.label_column
                if str(path).lower().endswith(".bed") and genome is None and self.genome is not None:
                    genome = Genome(self.genome)
                tables[split] = read_table(path, self.sequence_column, label, genome, self.bed_label_column,
                                           label_as_text=self.level == "token")
        if self.classes is None:
            self.classes = class_names(list(tables.values()), self.task, self.level)
        for split, table in tables.items():
            self.splits[split] = LabelledSequences(
                table, str(self.paths[split]), self.classes, self.max_length,
                rc_augment=self.rc_augment and split == "train", rc_label_map=self.rc_label_map, seed=self.seed,
                level=self.level)

    def _position(self) -> tuple[int, int]:
        return _trainer_position(getattr(self, "trainer", None), self.batch_size)

    def train_dataloader(self) -> DataLoader:
        data = self.splits["train"]
        sampler = _ShuffledEpochSampler(len(data), self._position, self.seed)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=self.num_workers)

    def _eval_loader(self, split: str) -> DataLoader:
        if split not in self.splits:
            raise ValueError(f"DNATableData: no {split} table given (--data.{split}=PATH)")
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=False, collate_fn=collate,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val") if "val" in self.splits else []

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")


def _trainer_position(trainer, batch_size: int) -> tuple[int, int]:
    """(epoch, samples this process already trained on in it) from the trainer's loop progress (restored on
    resume); under DDP every rank has trained on as many."""
    if trainer is None:
        return 0, 0
    done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
    return trainer.current_epoch, done * batch_size


class _ShuffledEpochSampler(EpochSampler):
    """A fresh permutation per epoch (seeded by (seed, epoch)), yielding ``epoch * n + row``."""

    def __init__(self, n: int, position_fn, seed: int):
        super().__init__(n, position_fn)
        self.seed = seed

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)
