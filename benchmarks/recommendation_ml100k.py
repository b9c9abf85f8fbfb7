"""MovieLens-100k: Mamba4Rec against the in-package SASRec under the same budget, RecBole's protocol.

    python benchmarks/recommendation_ml100k.py [--max-epochs 60] [--patience 10] [--out DIR]

Protocol (as FIELD_NOTES section 3, RecBole 1.2.1): leave-one-out by time (LS valid_and_test, TO), full
ranking over all items without history exclusion, max length 200, cross-entropy over all items, hidden 64,
2 layers, dropout 0.2, Adam 1e-3, early stopping on validation NDCG@10 (patience 10), test on the best
checkpoint. Same budget for both models: same epochs cap, patience, batch and data. Each batch holds
``--batch-size`` user windows with every position a target (about 100 targets a window on ml-100k, so 32
windows is about 3,000 targets a step, near RecBole's 2,048 prefix samples a batch).
The data is read from the installed recbole wheel (`pip install --no-deps recbole`).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from seqmamba.data.recommendation import RecDataModule
from seqmamba.tasks.recommendation import SequentialRecModule

RECBOLE = {  # FIELD_NOTES section 3: RecBole 1.2.1 on ml-100k, same protocol, one H100
    "RecBole SASRec (dropout 0.2)": (0.1410, 0.0646, 0.0413),
    "RecBole SASRec (dropout 0.5)": (0.1304, 0.0607, 0.0398),
    "RecBole GRU4Rec (hidden 128)": (0.1283, 0.0613, 0.0415),
}


class EpochTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)


def run(model: str, ns, root: Path) -> dict:
    L.seed_everything(ns.seed, verbose=False)
    data = RecDataModule(dataset=ns.dataset, synthetic_users=50, synthetic_mean_len=20, max_len=200,
                         window_stride=ns.window_stride, batch_size=ns.batch_size, eval_batch_size=1024)
    module = SequentialRecModule(model=model, hidden_size=64, n_layers=2, dropout=0.2, max_positions=200,
                                 lr=1e-3, topk=[10, 20])
    timer = EpochTimer()
    ckpt = ModelCheckpoint(dirpath=root / model, monitor="val/ndcg@10", mode="max", filename="best")
    trainer = L.Trainer(max_epochs=ns.max_epochs, max_time=ns.max_time, logger=CSVLogger(root, name=model),
                        callbacks=[EarlyStopping("val/ndcg@10", mode="max", patience=ns.patience), ckpt, timer],
                        enable_progress_bar=False, enable_model_summary=False, deterministic=False)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    trainer.fit(module, data)
    fit_s = time.perf_counter() - t
    test = trainer.test(module, data, ckpt_path="best", verbose=False)[0]
    return {"model": model, "epochs": len(timer.times), "fit_s": fit_s,
            # the first epoch includes compilation and caching: left out unless it is the only one
            "s_per_epoch": (sum(timer.times[1:]) / (len(timer.times) - 1)) if len(timer.times) > 1
            else sum(timer.times),
            "best_val_ndcg@10": float(ckpt.best_model_score), "peak_gb": torch.cuda.max_memory_allocated() / 2**30
            if torch.cuda.is_available() else None,
            **{k.removeprefix("test/"): v for k, v in test.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=60)
    parser.add_argument("--max-time", default=None, help="Lightning max_time per model, e.g. 00:00:02:00")
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--window-stride", type=int, default=None,
                        help="overlapping training windows (see RecDataModule); default: max_len")
    parser.add_argument("--models", default="mamba4rec,sasrec")
    parser.add_argument("--dataset", default="ml-100k", help="'synthetic' for a quick check of this script")
    parser.add_argument("--out", default=None, help="directory for logs and a results JSON")
    ns = parser.parse_args()
    root = Path(ns.out or tempfile.mkdtemp(prefix="ml100k-"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    header = (f"\nml-100k, LS valid_and_test / TO, full ranking, seed {ns.seed}, window stride "
              f"{ns.window_stride or 200}; {device}; torch {torch.__version__}\n\n"
              "| model | HR@10 | NDCG@10 | MRR@10 | epochs | s/epoch | peak GB |\n|---|---|---|---|---|---|---|")
    results, rows = [], []
    for model in ns.models.split(","):
        r = run(model, ns, root)
        results.append(r)
        peak = f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else "-"
        rows.append(f"| seqmamba {r['model']} | {r['hit@10']:.4f} | {r['ndcg@10']:.4f} | {r['mrr@10']:.4f} | "
                    f"{r['epochs']} | {r['s_per_epoch']:.2f} | {peak} |")
        print(rows[-1], flush=True)  # each model's row as soon as it is known
        (root / "ml100k_results.json").write_text(json.dumps(results, indent=2))
    print(header)
    print("\n".join(rows))
    for name, (hr, ndcg, mrr) in RECBOLE.items():
        print(f"| {name} | {hr:.4f} | {ndcg:.4f} | {mrr:.4f} | | | |")


if __name__ == "__main__":
    main()
