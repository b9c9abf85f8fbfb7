"""Training plumbing shared by every task: optimiser parameter groups, the warmup + cosine schedule, and the
learning-curve plot drawn from Lightning's CSV log at the end of a run.

Not a task: tasks import from here, never from each other.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn

from seqmamba.hub import atomic_write


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and everything that must not decay.

    No decay for parameters flagged ``_no_weight_decay`` (A_log, D, dt_bias), biases, norm weights and any
    other 1-D parameter. Tied parameters appear once.
    """
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        skip = getattr(p, "_no_weight_decay", False) or p.ndim < 2 or name.endswith(".bias")
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_warmup_cosine(module: L.LightningModule, lr: float, weight_decay: float,
                        betas: tuple[float, float] = (0.9, 0.999), warmup_ratio: float = 0.1,
                        min_lr_ratio: float = 0.0, total_steps: int | None = None) -> dict:
    """What ``configure_optimizers`` returns: AdamW, linear warmup over ``warmup_ratio`` of the run, then
    cosine decay to ``min_lr_ratio * lr``; stepped every optimiser step.

    ``total_steps`` defaults to the trainer's estimate (max_steps, or epochs x batches).
    """
    optimizer = torch.optim.AdamW(param_groups(module, weight_decay), lr=lr, betas=tuple(betas))
    total = max(int(total_steps or module.trainer.estimated_stepping_batches), 1)
    warmup = min(max(int(round(warmup_ratio * total)), 1), total)
    schedulers = [torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup)]
    if total > warmup:
        schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup,
                                                                     eta_min=min_lr_ratio * lr))
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers, milestones=[warmup][:len(schedulers) - 1])
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def plot_learning_curves(metrics_csv: str | Path, out_png: str | Path | None = None) -> Path:
    """Draw every logged metric of a Lightning ``metrics.csv`` against the step, one panel per metric
    (train and val variants of a metric share a panel). Written atomically; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import polars as pl

    metrics_csv = Path(metrics_csv)
    out_png = Path(out_png) if out_png else metrics_csv.with_name("learning_curves.png")
    table = pl.read_csv(metrics_csv, infer_schema_length=None)
    columns = [c for c in table.columns if c not in ("step", "epoch") and table[c].null_count() < table.height]
    panels: dict[str, list[str]] = {}
    for column in columns:
        base = column.split("/", 1)[-1] if "/" in column else column.removeprefix("train_").removeprefix("val_") \
            .removeprefix("test_").removesuffix("_step").removesuffix("_epoch")
        panels.setdefault(base, []).append(column)
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.5), squeeze=False)
    for ax, (base, cols) in zip(axes[0], panels.items()):
        for column in cols:
            rows = table.select("step", column).drop_nulls()
            ax.plot(rows["step"].to_list(), rows[column].to_list(), marker="." if rows.height < 50 else None,
                    label=column)
        ax.set_xlabel("step")
        ax.set_title(base)
        ax.legend(fontsize="small")
        if base in ("loss", "lr") or "loss" in base:
            ax.set_yscale("log") if all(v > 0 for c in cols for v in table[c].drop_nulls().to_list()) else None
    fig.tight_layout()
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return out_png


class LearningCurves(L.Callback):
    """At the end of ``fit``, draw the CSV logger's metrics to ``learning_curves.png`` beside ``metrics.csv``."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, L.pytorch.loggers.CSVLogger):
                logger.save()
                metrics = Path(logger.log_dir) / "metrics.csv"
                if metrics.is_file():
                    print(f"learning curves: {plot_learning_curves(metrics)}")
