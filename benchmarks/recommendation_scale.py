"""Time and peak memory of turning a 10-million-interaction log into training sequences.

    python benchmarks/recommendation_scale.py [--events 10000000] [--users 100000] [--items 50000]

Generates a log (Zipf-like item popularity, random timestamps with ties) as parquet and CSV in a temporary
directory (not timed), then, in a fresh process per format, times each step of the pipeline:
read -> 5-core filter -> id remap -> chronological sequences -> leave-one-out split -> training windows,
and reports the process's peak resident memory (ru_maxrss) and the increase over the interpreter with its
imports loaded. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl


def make_log(directory: Path, events: int, users: int, items: int, seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    user = rng.integers(0, users, size=events)
    item = (np.minimum(rng.zipf(1.3, size=events), items) * 7919 + rng.integers(0, 2, size=events)) % items  # skewed
    timestamp = rng.integers(1_500_000_000, 1_500_000_000 + 86_400 * 365, size=events) // 60 * 60  # ties
    frame = pl.DataFrame({"user_id": user, "item_id": item, "timestamp": timestamp})
    paths = {"parquet": directory / "log.parquet", "csv": directory / "log.csv"}
    frame.write_parquet(paths["parquet"])
    frame.write_csv(paths["csv"])
    return paths


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_pipeline(path: str, k: int, max_len: int) -> dict:
    from seqmamba.data.recommendation import (build_sequences, k_core, leave_one_out, read_interactions,
                                              remap_ids, training_windows)

    base = rss_mb()
    times = {}
    t = time.perf_counter()
    table = read_interactions(path)
    times["read"] = time.perf_counter() - t
    t2 = time.perf_counter()
    table = k_core(table, k, k)
    times["k-core"] = time.perf_counter() - t2
    t2 = time.perf_counter()
    table, ids = remap_ids(table)
    times["remap"] = time.perf_counter() - t2
    t2 = time.perf_counter()
    seqs = build_sequences(table, ids.n_users)
    times["sequences"] = time.perf_counter() - t2
    t2 = time.perf_counter()
    split = leave_one_out(seqs)
    starts, ends, _ = training_windows(seqs.offsets[:-1], split.train_end, max_len, "all")
    times["split+windows"] = time.perf_counter() - t2
    times["total"] = time.perf_counter() - t
    return {"times": times, "peak_rss_mb": rss_mb(), "import_rss_mb": base, "events_kept": int(len(seqs.items)),
            "users": ids.n_users, "items": ids.n_items, "windows": int(len(starts))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--k-core", type=int, default=5)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        print(json.dumps(run_pipeline(ns.child, ns.k_core, ns.max_len)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        paths = make_log(Path(tmp), ns.events, ns.users, ns.items)
        print(f"generated {ns.events:,} events in {time.perf_counter() - t:.1f} s "
              f"(parquet {paths['parquet'].stat().st_size / 2**20:.0f} MiB, csv {paths['csv'].stat().st_size / 2**20:.0f} MiB)",
              flush=True)
        rows = []
        for fmt, path in paths.items():
            out = subprocess.run([sys.executable, __file__, "--child", str(path), "--k-core", str(ns.k_core),
                                  "--max-len", str(ns.max_len)], capture_output=True, text=True, check=True)
            rows.append((fmt, json.loads(out.stdout.strip().splitlines()[-1])))
    steps = list(rows[0][1]["times"])
    print(f"\n{ns.events:,} events, {ns.users:,} users, {ns.items:,} items, {ns.k_core}-core, max_len {ns.max_len}; "
          f"{platform.processor() or platform.machine()}, polars {pl.__version__}, python {platform.python_version()}\n")
    print("| format | " + " | ".join(f"{s} s" for s in steps) + " | peak RSS MiB | over imports MiB | kept events | users | items | windows |")
    print("|---" * (len(steps) + 7) + "|")
    for fmt, r in rows:
        print(f"| {fmt} | " + " | ".join(f"{r['times'][s]:.2f}" for s in steps)
              + f" | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['import_rss_mb']:.0f} | {r['events_kept']:,} | "
              f"{r['users']:,} | {r['items']:,} | {r['windows']:,} |")


if __name__ == "__main__":
    main()
