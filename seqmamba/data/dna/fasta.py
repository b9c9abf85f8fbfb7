"""FASTA (plain, gzip, bgzip, xz) to token ids, with random access to windows of long records; BED intervals.

Each record is parsed once with Biopython and stored as one ``uint8`` id array (1 byte a base); a window is a
slice of that array, so no sample ever builds a Python string of a genome. With ``cache_dir`` the arrays are
written once as ``.npy`` files and memory-mapped afterwards (pages load on demand, shared between DataLoader
workers).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from Bio.SeqIO.FastaIO import SimpleFastaParser

from seqmamba.data.dna.tokenizer import InvalidSequenceError, encode

BUILTIN_GENOMES = {"lambda_phage": "lambda_phage.fa.gz"}
"""Genomes shipped inside the package, usable as ``builtin:<name>`` wherever a FASTA path is expected.
lambda_phage: Enterobacteria phage lambda, complete genome (NC_001416.1, 48,502 bp), from Debian's
bowtie2-examples."""


class FastaFormatError(ValueError):
    """A FASTA file that cannot be read: empty, truncated, no records, an empty record, duplicate names."""


def resolve_path(path: str | os.PathLike) -> Path:
    """``builtin:<name>`` -> the packaged file; anything else -> ``Path``."""
    text = str(path)
    if text.startswith("builtin:"):
        name = text.split(":", 1)[1]
        if name not in BUILTIN_GENOMES:
            raise FileNotFoundError(f"unknown built-in genome {name!r}; known: {sorted(BUILTIN_GENOMES)}")
        return Path(str(resources.files("seqmamba.data.dna") / BUILTIN_GENOMES[name]))
    return Path(text)


def open_text(path: Path) -> io.TextIOBase:
    """Open plain, gzip/bgzip (multi-member gzip) or xz text, chosen by the file's magic bytes."""
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic[:2] == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    if magic == b"\xfd7zXZ\x00":
        return io.TextIOWrapper(lzma.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


@dataclass
class FastaRecord:
    name: str
    """First word of the header."""
    description: str
    """The whole header line without '>'."""
    ids: np.ndarray
    """Token ids ``(length,)`` uint8."""
    n_ambiguous: int
    """IUPAC ambiguity codes (other than N) that were mapped to N."""


def iter_fasta(path: str | os.PathLike):
    """Yield a ``FastaRecord`` per record. Errors name the file and the record."""
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FASTA file does not exist: {path}")
    names: set[str] = set()
    count = 0
    last = None
    try:
        with open_text(path) as handle:
            for header, sequence in SimpleFastaParser(handle):
                name = header.split(None, 1)[0] if header.strip() else ""
                if not name:
                    raise FastaFormatError(f"{path}: record {count + 1} has an empty header line")
                if name in names:
                    raise FastaFormatError(f"{path}: record name {name!r} occurs twice")
                if not sequence:
                    raise FastaFormatError(f"{path}: record {name!r} is empty (a header with no sequence)")
                ids, n_ambiguous = encode(sequence, str(path), name)
                names.add(name)
                count += 1
                last = name
                yield FastaRecord(name, header, ids, n_ambiguous)
    except (EOFError, lzma.LZMAError, gzip.BadGzipFile, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        where = f"after record {last!r}" if last else "before the first record ended"
        raise FastaFormatError(f"{path}: file is truncated or corrupt ({where}): {err}") from err
    except ValueError as err:
        if isinstance(err, (FastaFormatError, InvalidSequenceError)):
            raise
        raise FastaFormatError(f"{path}: not a FASTA file: {err}") from err
    if count == 0:
        raise FastaFormatError(f"{path}: no FASTA records (expected lines starting with '>')")


def read_fasta(path: str | os.PathLike) -> list[FastaRecord]:
    return list(iter_fasta(path))


class Genome:
    """Named records of one or more FASTA files as uint8 id arrays, with window access.

    >>> g = Genome("builtin:lambda_phage"); g.window("gi|9626243|ref|NC_001416.1|", 0, 10)  # ids (10,)
    """

    def __init__(self, paths: str | os.PathLike | list, cache_dir: str | os.PathLike | None = None,
                 verbose: bool = False):
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise ValueError("Genome: no FASTA files given")
        self.records: dict[str, np.ndarray] = {}
        self.sources: dict[str, Path] = {}
        self.n_ambiguous = 0
        for path in paths:
            path = resolve_path(path)
            for name, ids, n_ambiguous in self._load(path, cache_dir):
                if name in self.records:
                    raise FastaFormatError(f"{path}: record name {name!r} also occurs in {self.sources[name]}")
                self.records[name], self.sources[name] = ids, path
                self.n_ambiguous += n_ambiguous
        if verbose and self.n_ambiguous:
            print(f"Genome: {self.n_ambiguous} IUPAC ambiguity code(s) mapped to N")

    @staticmethod
    def _load(path: Path, cache_dir):
        if cache_dir is None:
            return [(r.name, r.ids, r.n_ambiguous) for r in iter_fasta(path)]
        cache = Path(cache_dir)
        stat = path.stat()
        key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        folder = cache / f"{path.name}.{key}"
        index = folder / "index.tsv"
        if not index.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            rows = []
            for i, record in enumerate(iter_fasta(path)):
                np.save(folder / f"{i}.npy", record.ids)
                rows.append(f"{i}\t{record.name}\t{record.n_ambiguous}")
            tmp = index.with_suffix(".tmp")
            tmp.write_text("\n".join(rows) + "\n")
            os.replace(tmp, index)
        out = []
        for line in index.read_text().splitlines():
            i, name, n_ambiguous = line.split("\t")
            out.append((name, np.load(folder / f"{i}.npy", mmap_mode="r"), int(n_ambiguous)))
        return out

    @property
    def lengths(self) -> dict[str, int]:
        return {name: len(ids) for name, ids in self.records.items()}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.records[name]
        except KeyError:
            raise KeyError(f"record {name!r} is not in the genome; records: {list(self.records)[:10]}") from None

    def window(self, name: str, start: int, end: int) -> np.ndarray:
        """ids of ``record[start:end]`` (0-based, end exclusive) as a new int64 array."""
        ids = self[name]
        if not 0 <= start < end <= len(ids):
            raise IndexError(f"window {name}:{start}-{end} is outside the record (length {len(ids)})")
        return np.array(ids[start:end], dtype=np.int64)


@dataclass
class Interval:
    chrom: str
    start: int
    end: int
    split: str | None = None
    label: str | None = None


def read_bed(path: str | os.PathLike, split_column: int | None = None,
             label_column: int | None = None) -> list[Interval]:
    """BED intervals (0-based, end exclusive). ``split_column`` / ``label_column`` are 0-based column numbers
    (e.g. 3 for the name column) holding a split name (train/val/test) or a label. Comment, ``track`` and
    ``browser`` lines are skipped; a malformed line is an error naming the file and line."""
    path = Path(path)
    intervals = []
    with open_text(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip() or line.startswith(("#", "track", "browser")):
                continue
            fields = line.rstrip("\n").split("\t")
            try:
                chrom, start, end = fields[0], int(fields[1]), int(fields[2])
                split = fields[split_column] if split_column is not None else None
                label = fields[label_column] if label_column is not None else None
            except (IndexError, ValueError) as err:
                raise ValueError(f"{path}, line {number}: not a BED line with the needed columns "
                                 f"({err}): {line.strip()[:80]!r}") from err
            if not 0 <= start < end:
                raise ValueError(f"{path}, line {number}: need 0 <= start < end, got {start}, {end}")
            intervals.append(Interval(chrom, start, end, split, label))
    if not intervals:
        raise ValueError(f"{path}: no BED intervals")
    return intervals
