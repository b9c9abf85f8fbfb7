"""SeparationModule: the LightningModule around ``MambaSeparator`` (loss, metrics, optimiser, plots).

Training: negative SI-SNR under the best permutation (utterance-level PIT) on fixed-length crops.
Validation and test: each mixture at its full length, one at a time (so padding never enters a score):
``si_snri`` and ``sdri`` (dB, best permutation by SI-SNR) and ``si_snr``; logged as ``val/...`` and
``test/...`` so Lightning's CSVLogger writes them. Optimiser: Adam (AdamW with weight decay 0 is Adam) with
linear warmup then cosine decay (``seqmamba.tasks.common.adamw_warmup_cosine``); gradient clipping (5 in the
configs) is a Trainer setting.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch

from seqmamba.tasks.common import adamw_warmup_cosine
from seqmamba.tasks.separation.metrics import (pit_si_snr, pit_si_snr_loss, reorder, sdr_improvement,
                                               si_snr_improvement)
from seqmamba.tasks.separation.model import MambaSeparator, SeparatorConfig


class SeparationModule(L.LightningModule):
    """Mamba-TasNet / dual-path Mamba speech separation.

    Args:
        n_src: speakers per mixture; must match the DataModule's ``n_src``.
        masker: "mamba" (Mamba-TasNet) or "dual_path" (DPMamba).
        n_filters, kernel_size, stride, d_model, n_layers, d_state, expand, chunk_size, mask_activation:
            see ``SeparatorConfig`` (defaults: Mamba-TasNet S, 256 filters x 16 layers).
        sample_rate: training sample rate (checked against the DataModule; stored for the separation API).
        lr, weight_decay, betas, warmup_ratio, min_lr_ratio: Adam(W) with warmup + cosine decay.
        sdr_metric: also compute SDRi (BSS-eval, slower) on validation and test mixtures.
        plot_every_n_val: draw the first validation mixture's spectrograms every n validation runs (0: never).
        backend: Mamba kernels ("auto": Triton on CUDA, reference on CPU).
    """

    def __init__(self, n_src: int = 2, masker: Literal["mamba", "dual_path"] = "mamba", n_filters: int = 256,
                 kernel_size: int = 16, stride: int = 8, d_model: int | None = None, n_layers: int = 16,
                 d_state: int = 16, expand: int = 2, chunk_size: int = 250,
                 mask_activation: Literal["relu", "sigmoid", "softmax"] = "relu", sample_rate: int = 8000,
                 lr: float = 1e-3, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 warmup_ratio: float = 0.02, min_lr_ratio: float = 0.01, sdr_metric: bool = True,
                 plot_every_n_val: int = 1, backend: str = "auto"):
        super().__init__()
        self.save_hyperparameters()
        self.config = SeparatorConfig(n_src=n_src, masker=masker, n_filters=n_filters, kernel_size=kernel_size,
                                      stride=stride, d_model=d_model, n_layers=n_layers, d_state=d_state,
                                      expand=expand, chunk_size=chunk_size, mask_activation=mask_activation,
                                      sample_rate=sample_rate)
        self.model = MambaSeparator(self.config, backend=backend)
        self._val_runs, self._plot_now = 0, False

    def forward(self, mixture: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """mixture ``(b, t)`` -> estimates ``(b, n_src, t)``."""
        return self.model(mixture, lengths)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        for name in ("n_src", "sample_rate"):
            theirs = getattr(dm, name, None)
            if theirs is not None and theirs != getattr(self.hparams, name):
                raise ValueError(f"SeparationModule.{name}={getattr(self.hparams, name)} but the data has "
                                 f"{name}={theirs}: set both to the same value")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        estimates = self(batch["mixture"], batch["lengths"])
        loss = pit_si_snr_loss(estimates, batch["sources"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(estimates))
        return loss

    def _evaluate(self, batch: dict, prefix: str) -> None:
        for k in range(len(batch["mixture"])):  # full length, one mixture at a time: no padding in any score
            n = int(batch["lengths"][k])
            mixture, sources = batch["mixture"][k: k + 1, :n], batch["sources"][k: k + 1, :, :n]
            estimates = self(mixture)
            best, perm = pit_si_snr(estimates, sources)
            ordered = reorder(estimates, perm)
            self.log(f"{prefix}/loss", -best.mean(), batch_size=1)
            self.log(f"{prefix}/si_snr", best.mean(), batch_size=1)
            self.log(f"{prefix}/si_snri", si_snr_improvement(ordered, sources, mixture).mean(), prog_bar=True,
                     batch_size=1)
            if self.hparams.sdr_metric:
                self.log(f"{prefix}/sdri", sdr_improvement(ordered, sources, mixture).mean(), batch_size=1)
            if prefix == "val" and self._plot_now and k == 0:
                self._plot(mixture[0], ordered[0], sources[0])
                self._plot_now = False

    def on_validation_epoch_start(self) -> None:
        every = self.hparams.plot_every_n_val
        self._plot_now = bool(every) and self._val_runs % every == 0 and not self.trainer.sanity_checking
        self._val_runs += 0 if self.trainer.sanity_checking else 1

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self(batch["mixture"], batch.get("lengths"))

    def _plot(self, mixture: torch.Tensor, estimates: torch.Tensor, references: torch.Tensor) -> None:
        if not self.trainer.is_global_zero or self.logger is None or self.logger.log_dir is None:
            return
        from seqmamba.tasks.separation.plots import plot_spectrograms

        out = Path(self.logger.log_dir) / "spectrograms" / f"val_step{self.global_step:07d}.png"
        plot_spectrograms(mixture, estimates, references, self.hparams.sample_rate, out)

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_warmup_cosine(self, hp.lr, hp.weight_decay, betas=tuple(hp.betas),
                                   warmup_ratio=hp.warmup_ratio, min_lr_ratio=hp.min_lr_ratio)
