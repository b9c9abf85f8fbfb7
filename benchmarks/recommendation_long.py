"""Training time per epoch and peak GPU memory of Mamba4Rec and SASRec at max_len 200, 2,048 and 8,192.

    python benchmarks/recommendation_long.py [--users 128] [--steps 10]

A synthetic log with histories of about 8,300 events (every user longer than the longest window) is cut into
all-position training windows of each max_len; batches hold the same number of positions (``--tokens``) at
every max_len. Each configuration runs ``--warmup`` + ``--steps`` optimiser steps (hidden 64, 2 layers,
CE over all items, Adam, fp32); time per epoch = measured step time x steps in an epoch. Out-of-memory is
reported as such. Needs a CUDA device.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from seqmamba.data.recommendation import TrainCollate, build_sequences, remap_ids, synthetic_log, training_windows
from seqmamba.tasks.recommendation import build_model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(kind: str, max_len: int, seqs, ns) -> dict:
    starts, ends, _ = training_windows(seqs.offsets[:-1], seqs.offsets[1:], max_len, "all")
    batch = max(ns.tokens // max_len, 1)
    collate = TrainCollate(seqs.items, starts, ends)
    torch.manual_seed(0)
    model = build_model(kind, n_items=int(seqs.items.max()), n_layers=2, max_positions=max_len).to(ns.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    if ns.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        times = []
        for step in range(ns.warmup + ns.steps):
            b = {k: v.to(ns.device) for k, v in collate(rng.integers(0, len(starts), batch)).items()}
            sync(ns.device)
            t = time.perf_counter()
            mask = b["mask"]
            hidden = model(b["items"], mask)[mask]
            loss = F.cross_entropy(model.item_scores(hidden), b["targets"][mask])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync(ns.device)
            if step >= ns.warmup:
                times.append(time.perf_counter() - t)
        step_s = float(np.median(times))
        steps_per_epoch = -(-len(starts) // batch)
        return {"model": kind, "max_len": max_len, "batch": batch, "step_ms": 1e3 * step_s,
                "epoch_s": step_s * steps_per_epoch, "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if ns.device.startswith("cuda") else 0.0,
                "loss": loss.item()}
    except torch.OutOfMemoryError:
        return {"model": kind, "max_len": max_len, "batch": batch, "oom": True}
    finally:
        del model, opt
        if ns.device.startswith("cuda"):
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=128)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--tokens", type=int, default=16384, help="positions per batch")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lengths", default="200,2048,8192")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mean-len", type=int, default=8400)
    ns = parser.parse_args()
    table, _ = remap_ids(synthetic_log(ns.users, ns.items, mean_len=ns.mean_len, min_len=ns.mean_len - 100, seed=0)
                         .rename({"user_id": "user", "item_id": "item"}).with_row_index("row"))
    seqs = build_sequences(table)
    print(f"log: {len(seqs.items):,} events, {seqs.n_users} users; {torch.cuda.get_device_name() if ns.device.startswith('cuda') else 'cpu'}, "
          f"torch {torch.__version__}, {ns.tokens} positions a batch", flush=True)
    print("| model | max_len | batch | ms/step | s/epoch | peak GB |")
    print("|---|---|---|---|---|---|")
    for max_len in [int(x) for x in ns.lengths.split(",")]:
        for kind in ("mamba4rec", "sasrec"):
            r = measure(kind, max_len, seqs, ns)
            if r.get("oom"):
                print(f"| {kind} | {max_len} | {r['batch']} | out of memory | | |", flush=True)
            else:
                print(f"| {kind} | {max_len} | {r['batch']} | {r['step_ms']:.1f} | {r['epoch_s']:.2f} | "
                      f"{r['peak_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
