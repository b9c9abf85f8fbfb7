"""DNA benchmarks on one GPU: training throughput and peak memory of the released-size Caduceus-PS
(d_model 256 x 16 layers) at 131k and 1M tokens, the time and memory to score a whole bacterial genome, and a
short masked-LM pretraining of a small PS model with held-out-genome accuracy.

    python benchmarks/dna_gpu.py --genomes DIR --out results.json [--train-seconds 60]

DIR holds token-id arrays (``*.npy``, uint8 Caduceus ids, one per genome; records of a genome concatenated)
named ``train_*.npy`` and ``heldout_*.npy``, made on the CPU by ``benchmarks/dna_kmer_baseline.py --export``.
Each section writes its figures to the JSON as soon as it ends, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from seqmamba.tasks.common import param_groups
from seqmamba.tasks.dna.model import CaduceusConfig, CaduceusForMaskedLM, mlm_loss


def save(results: dict, out: Path) -> None:
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2)[-1500:], flush=True)


def throughput(length: int, steps: int, d_model=256, n_layer=16) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = CaduceusForMaskedLM(CaduceusConfig(d_model=d_model, n_layer=n_layer, rcps=True,
                                               checkpoint_activations=True)).cuda()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=8e-3, betas=(0.9, 0.95))
    ids = torch.randint(7, 11, (1, length), device="cuda")
    labels = torch.where(torch.rand(1, length, device="cuda") < 0.15, ids, -100)
    times = []
    for step in range(steps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = mlm_loss(model(ids), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    timed = times[1:]  # the first step compiles the kernels
    return {"length": length, "params": sum(p.numel() for p in model.parameters()),
            "step_s": [round(x, 3) for x in times], "tokens_per_s": round(length / (sum(timed) / len(timed))),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "loss": float(loss)}


@torch.no_grad()
def score_genome(ids: np.ndarray, mode: str = "whole", window: int = 1 << 20, overlap: int = 1 << 16,
                 d_model=256, n_layer=16) -> dict:
    """Time and peak memory of ``api.score_record`` (per-base log-likelihoods + mean features) on one genome."""
    from seqmamba.tasks.dna.api import score_record
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = CaduceusForMaskedLM(CaduceusConfig(d_model=d_model, n_layer=n_layer, rcps=True)).cuda().eval()
    times = []
    for _ in range(2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        result = score_record(model, ids, mode, window, overlap)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"bases": len(ids), "mode": mode, "window": window if mode == "windowed" else None,
            "overlap": overlap if mode == "windowed" else None, "seconds": [round(s, 2) for s in times],
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "mean_loglik": float(np.nanmean(result["loglik"]))}


def mlm_batch(genomes: list[np.ndarray], batch: int, length: int, rng: np.random.Generator):
    from seqmamba.data.dna.datasets import mlm_mask
    sizes = np.array([len(g) for g in genomes], dtype=float)
    inputs, labels = [], []
    for _ in range(batch):
        g = genomes[rng.choice(len(genomes), p=sizes / sizes.sum())]
        s = int(rng.integers(0, len(g) - length))
        x, y = mlm_mask(np.asarray(g[s:s + length]), rng)
        inputs.append(x)
        labels.append(y)
    return torch.as_tensor(np.stack(inputs)).cuda(), torch.as_tensor(np.stack(labels)).cuda()


def pretrain(train: list[np.ndarray], heldout: dict[str, np.ndarray], seconds: float, d_model=128, n_layer=4,
             length=1024, batch=64) -> dict:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = CaduceusForMaskedLM(CaduceusConfig(d_model=d_model, n_layer=n_layer, rcps=True)).cuda()
    est_steps = 600
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=8e-3, betas=(0.9, 0.95))
    warm = int(0.1 * est_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(
        math.pi * min(max(s - warm, 0) / (est_steps - warm), 1.0)))))
    start, step, curve = time.time(), 0, []
    while time.time() - start < seconds and step < est_steps:
        x, y = mlm_batch(train, batch, length, rng)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = mlm_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 25 == 0:
            curve.append((step, round(float(loss), 4)))
    elapsed = time.time() - start
    model.eval()
    out = {"steps": step, "seconds": round(elapsed, 1), "tokens_per_s": round(step * batch * length / elapsed),
           "d_model": d_model, "n_layer": n_layer, "length": length, "batch": batch, "curve": curve}
    eval_rng = np.random.default_rng(123)
    for name, genome in heldout.items():
        correct = total = 0
        nll = 0.0
        with torch.no_grad():
            for _ in range(8):
                x, y = mlm_batch([genome], 64, length, eval_rng)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = model(x).float()
                keep = y != -100
                pred = logits[..., 7:11].argmax(-1) + 7
                correct += int((pred == y)[keep].sum())
                total += int(keep.sum())
                nll += float(torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum"))
        out[f"heldout_{name}"] = {"mlm_acc": round(correct / total, 4), "loss": round(nll / total, 4),
                                  "masked_positions": total}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--genomes", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-seconds", type=float, default=60)
    parser.add_argument("--skip", nargs="*", default=[])
    parser.add_argument("--only", nargs="*", default=[])
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    train = [np.load(p) for p in sorted(args.genomes.glob("train_*.npy"))]
    heldout = {p.stem.removeprefix("heldout_"): np.load(p) for p in sorted(args.genomes.glob("heldout_*.npy"))}
    smallest, largest = min(heldout.values(), key=len), max(heldout.values(), key=len)
    sections = [("pretrain_small_ps", lambda: pretrain(train, heldout, args.train_seconds)),
                ("train_131k", lambda: throughput(131072, 3)),
                ("train_512k", lambda: throughput(1 << 19, 1)),
                ("train_1m", lambda: throughput(1 << 20, 1)),
                ("score_whole_smallest", lambda: score_genome(smallest, "whole")),
                ("score_windowed_largest", lambda: score_genome(largest, "windowed"))]
    if args.only:
        sections = [s for s in sections if s[0] in args.only]
    for name, fn in sections:
        if name in args.skip:
            continue
        t = time.time()
        try:
            results[name] = fn()
        except torch.cuda.OutOfMemoryError as err:
            results[name] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        results[name]["wall_s"] = round(time.time() - t, 1)
        save(results, args.out)


if __name__ == "__main__":
    main()
