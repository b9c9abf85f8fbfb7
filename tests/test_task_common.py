"""Shared training plumbing: no-decay groups, warmup + cosine schedule, learning-curve plot."""
import math

import lightning as L
import polars as pl
import torch

from seqmamba import Mamba
from seqmamba.tasks.common import adamw_warmup_cosine, param_groups, plot_learning_curves


def test_param_groups_keep_decay_off_ssm_parameters_biases_and_norms():
    model = torch.nn.Sequential(Mamba(16), torch.nn.LayerNorm(16))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        "0.in_proj.weight", "0.conv1d.weight", "0.x_proj.weight", "0.dt_proj.weight", "0.out_proj.weight"}
    assert {"0.A_log", "0.D", "0.dt_proj.bias", "0.conv1d.bias", "1.weight", "1.bias"} == \
        {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_warmup_then_cosine():
    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 2)

    config = adamw_warmup_cosine(Tiny(), lr=1.0, weight_decay=0.0, warmup_ratio=0.1, total_steps=100)
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert math.isclose(lrs[0], 0.1) and math.isclose(lrs[5], 0.55) and lrs[9] < 1.0  # linear warmup, 10 steps
    assert math.isclose(lrs[10], 1.0) and lrs[55] < 0.6 and lrs[99] < 1e-3  # then cosine to 0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_plot_learning_curves(tmp_path):
    csv = tmp_path / "metrics.csv"
    pl.DataFrame({"step": [0, 1, 2, 3], "epoch": [0, 0, 1, 1], "train_loss": [2.0, 1.5, None, 1.0],
                  "val_loss": [None, 1.7, None, 1.2], "val_acc": [None, 0.3, None, 0.5]}).write_csv(csv)
    png = plot_learning_curves(csv)
    assert png == tmp_path / "learning_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp"))
