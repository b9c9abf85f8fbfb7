"""Spectrogram figure of a separation: the mixture, then one row per speaker (estimate beside reference)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from seqmamba.hub import atomic_write


def _spectrogram_db(wave: torch.Tensor, n_fft: int) -> torch.Tensor:
    """Magnitude STFT in dB, ``(freq, frames)``, 80 dB below the peak clipped."""
    window = torch.hann_window(n_fft)
    spec = torch.stft(wave.detach().cpu().float(), n_fft, hop_length=n_fft // 4, window=window,
                      return_complex=True).abs()
    db = 20 * torch.log10(spec + 1e-8)
    return db.clamp(min=db.max() - 80)


def plot_spectrograms(mixture: torch.Tensor, estimates: torch.Tensor, references: torch.Tensor | None,
                      sample_rate: int, path: str | os.PathLike, n_fft: int = 256,
                      titles: tuple[str, str] = ("estimate", "reference")) -> Path:
    """Draw mixture ``(t,)``, estimates ``(n_src, t)`` and references ``(n_src, t)`` (optional, same order) to a
    PNG at ``path`` (written atomically); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_src = estimates.shape[0]
    cols = 1 if references is None else 2
    fig, axes = plt.subplots(n_src + 1, cols, figsize=(5 * cols, 2.2 * (n_src + 1)), squeeze=False)
    extent = None

    def show(ax, wave, title):
        nonlocal extent
        db = _spectrogram_db(wave, n_fft)
        extent = [0, wave.shape[-1] / sample_rate, 0, sample_rate / 2000]
        ax.imshow(db.numpy(), origin="lower", aspect="auto", extent=extent, cmap="magma")
        ax.set_title(title, fontsize="small")
        ax.set_ylabel("kHz")

    show(axes[0, 0], mixture, "mixture")
    for ax in axes[0, 1:]:
        ax.axis("off")
    for i in range(n_src):
        show(axes[i + 1, 0], estimates[i], f"{titles[0]} {i + 1}")
        if references is not None:
            show(axes[i + 1, 1], references[i], f"{titles[1]} {i + 1}")
    for ax in axes[-1]:
        ax.set_xlabel("s")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return path
