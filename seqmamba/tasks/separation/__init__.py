"""Speech separation: Mamba-TasNet and dual-path Mamba (model), SeparationModule (Lightning), Separator (API).

Data lives in ``seqmamba.data.separation`` (``SeparationData``); configs in ``configs/separation/``.
"""
from seqmamba.data.separation import SeparationData
from seqmamba.tasks.separation.api import Separator, align_permutation, separate_windows
from seqmamba.tasks.separation.metrics import (pit_si_snr, pit_si_snr_loss, reorder, sdr_improvement, si_snr,
                                               si_snr_improvement)
from seqmamba.tasks.separation.model import SIZES, DualPathMambaMasker, MambaMasker, MambaSeparator, SeparatorConfig
from seqmamba.tasks.separation.module import SeparationModule
from seqmamba.tasks.separation.plots import plot_spectrograms

__all__ = [
    "DualPathMambaMasker", "MambaMasker", "MambaSeparator", "SIZES", "SeparationData", "SeparationModule",
    "SeparatorConfig", "Separator", "align_permutation", "pit_si_snr", "pit_si_snr_loss", "plot_spectrograms",
    "reorder", "sdr_improvement", "separate_windows", "si_snr", "si_snr_improvement",
]
