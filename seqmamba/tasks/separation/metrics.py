"""Separation losses and metrics on ``(batch, n_src, time)`` tensors, built on torchmetrics.

- ``pit_si_snr``: utterance-level permutation invariant training with SI-SNR (torchmetrics'
  ``permutation_invariant_training`` in speaker-wise mode: one SI-SNR per (estimate, reference) pair, then the
  best assignment -- exhaustive for up to 3 speakers, Hungarian through scipy above when scipy is installed).
- ``si_snr_improvement`` / ``sdr_improvement``: SI-SNRi and SDRi, the estimate's score minus the mixture's,
  per mixture, averaged over speakers, with the estimates already in the best order.
"""
from __future__ import annotations

import warnings

import torch
from torchmetrics.functional.audio import (permutation_invariant_training, scale_invariant_signal_noise_ratio,
                                           signal_distortion_ratio)
from torchmetrics.functional.audio.pit import pit_permutate


def _check(estimates: torch.Tensor, references: torch.Tensor) -> None:
    if estimates.ndim != 3 or estimates.shape != references.shape:
        raise ValueError("expected estimates and references of the same shape (batch, n_src, time), got "
                         f"{tuple(estimates.shape)} and {tuple(references.shape)}")


def si_snr(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Scale-invariant SNR in dB over the last axis (both zero-meaned): ``(..., t) -> (...)``."""
    return scale_invariant_signal_noise_ratio(estimate, reference)


def pit_si_snr(estimates: torch.Tensor, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best mean SI-SNR over speaker assignments.

    estimates, references: ``(b, n_src, t)``. Returns ``(best (b,), perm (b, n_src))`` where estimate
    ``perm[k, j]`` goes with reference ``j`` (so ``reorder(estimates, perm)`` lines them up).
    """
    _check(estimates, references)
    if estimates.shape[1] == 1:
        return si_snr(estimates[:, 0], references[:, 0]), torch.zeros(len(estimates), 1, dtype=torch.long,
                                                                        device=estimates.device)
    with warnings.catch_warnings():
        if estimates.shape[1] <= 4:  # exhaustive search is cheap here: torchmetrics' advice to install scipy is noise
            warnings.filterwarnings("ignore", message="In pit metric for speaker-num")
        return permutation_invariant_training(estimates, references, si_snr, mode="speaker-wise", eval_func="max")


def pit_si_snr_loss(estimates: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Negative SI-SNR under the best permutation, averaged over the batch (the training loss)."""
    best, _ = pit_si_snr(estimates, references)
    return -best.mean()


def reorder(estimates: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``estimates[k, perm[k]]``: estimates put in the references' order."""
    return pit_permutate(estimates, perm)


def si_snr_improvement(ordered: torch.Tensor, references: torch.Tensor, mixture: torch.Tensor) -> torch.Tensor:
    """SI-SNRi ``(b,)``: mean over speakers of SI-SNR(estimate, ref) - SI-SNR(mixture, ref).

    ordered: estimates in the references' order ``(b, n_src, t)``; mixture ``(b, t)``.
    """
    _check(ordered, references)
    mix = mixture[:, None, :].expand_as(references)
    return (si_snr(ordered, references) - si_snr(mix, references)).mean(-1)


def sdr_improvement(ordered: torch.Tensor, references: torch.Tensor, mixture: torch.Tensor) -> torch.Tensor:
    """SDRi ``(b,)`` with BSS-eval SDR (torchmetrics' ``signal_distortion_ratio``, 512-tap distortion filter)."""
    _check(ordered, references)
    mix = mixture[:, None, :].expand_as(references)
    ordered, references, mix = ordered.double(), references.double(), mix.double()
    return (signal_distortion_ratio(ordered, references) - signal_distortion_ratio(mix, references)).mean(-1).float()
