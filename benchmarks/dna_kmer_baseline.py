"""k-mer context baseline for masked-base prediction, and the genome export used by ``dna_gpu.py``.

The baseline predicts a base from the counts of (k bases on its left, k bases on its right) over the training
genomes: the most frequent base in that context, the most frequent base overall for a context never seen.
k is chosen on validation positions (the last 10% of every training genome, excluded from the counts when
choosing), then the counts are rebuilt on the whole training genomes and scored on the held-out genomes.

    python benchmarks/dna_kmer_baseline.py --export DIR train_NAME=PATH.fa.gz ... heldout_NAME=PATH.fna.xz ...
    python benchmarks/dna_kmer_baseline.py --genomes DIR [--kmax 6] [--positions 200000]

The held-out positions are drawn with the same seed as in ``dna_gpu.py``'s evaluation only in distribution
(uniform positions of the held-out genome); the baseline sees clean neighbours, the masked LM sees 15% of its
context masked, which favours the baseline.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def export(out: Path, specs: list[str]) -> None:
    from seqmamba.data.dna import Genome
    out.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        name, path = spec.split("=", 1)
        genome = Genome(path)
        ids = np.concatenate([np.asarray(v) for v in genome.records.values()]).astype(np.uint8)
        np.save(out / f"{name}.npy", ids)
        print(f"{name}: {len(genome)} records, {len(ids):,} bases -> {out / name}.npy")


def codes(ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(context code, centre base 0..3, valid) for every position with k bases each side; N invalidates."""
    b = ids.astype(np.int64) - 7  # A C G T N -> 0 1 2 3 4
    n = len(b) - 2 * k
    code = np.zeros(n, dtype=np.int64)
    valid = b[k:k + n] < 4
    for offset in list(range(0, k)) + list(range(k + 1, 2 * k + 1)):
        part = b[offset:offset + n]
        valid &= part < 4
        code = code * 4 + np.minimum(part, 3)
    return code, b[k:k + n], valid


def fit(genomes: list[np.ndarray], k: int) -> np.ndarray:
    counts = np.zeros((4 ** (2 * k), 4), dtype=np.int64)
    for ids in genomes:
        code, centre, valid = codes(ids, k)
        counts += np.bincount(code[valid] * 4 + centre[valid], minlength=counts.size).reshape(counts.shape)
    return counts


def accuracy(counts: np.ndarray, ids: np.ndarray, k: int, positions: int, seed: int = 0) -> float:
    code, centre, valid = codes(ids, k)
    idx = np.flatnonzero(valid)
    idx = np.random.default_rng(seed).choice(idx, size=min(positions, len(idx)), replace=False)
    fallback = int(counts.sum(0).argmax())
    table = counts[code[idx]]
    pred = np.where(table.sum(1) > 0, table.argmax(1), fallback)
    return float((pred == centre[idx]).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--export", type=Path, default=None)
    parser.add_argument("specs", nargs="*")
    parser.add_argument("--genomes", type=Path, default=None)
    parser.add_argument("--kmax", type=int, default=6)
    parser.add_argument("--positions", type=int, default=200_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.export:
        export(args.export, args.specs)
        return
    train = {p.stem: np.load(p) for p in sorted(args.genomes.glob("train_*.npy"))}
    heldout = {p.stem: np.load(p) for p in sorted(args.genomes.glob("heldout_*.npy"))}
    fit_part = [g[: int(0.9 * len(g))] for g in train.values()]
    val_part = [g[int(0.9 * len(g)):] for g in train.values()]
    result = {"validation": {}}
    for k in range(1, args.kmax + 1):
        t = time.time()
        counts = fit(fit_part, k)
        acc = np.mean([accuracy(counts, g, k, args.positions // len(val_part)) for g in val_part])
        result["validation"][k] = round(float(acc), 4)
        print(f"k={k}: validation accuracy {acc:.4f} ({time.time() - t:.1f} s)", flush=True)
    best = max(result["validation"], key=result["validation"].get)
    counts = fit(list(train.values()), best)
    result["k"] = best
    for name, g in heldout.items():
        result[name] = round(accuracy(counts, g, best, args.positions), 4)
        print(f"held-out {name}: accuracy {result[name]:.4f} with k={best}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
