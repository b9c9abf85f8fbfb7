"""Residual block, pre-norm: Add -> Norm -> Mixer (mamba_ssm's order).

Each block receives the previous mixer output and the running residual, adds them, normalises and mixes;
the last residual add is done by the backbone's final norm. Keeping the residual separate lets it stay in
float32 (``residual_in_fp32``) while the mixers run in bf16.
"""
from __future__ import annotations

import torch
from torch import nn

from seqmamba.mamba import fp32
from seqmamba.rcps import RCPSAddNormWrapper


class Block(nn.Module):
    """``forward(hidden (b, l, c), residual (b, l, c) | None, mask (b, l) | None) -> (hidden, residual)``."""

    def __init__(self, mixer: nn.Module, norm: nn.Module, residual_in_fp32: bool = True):
        super().__init__()
        self.mixer, self.norm, self.residual_in_fp32 = mixer, norm, residual_in_fp32

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, **mixer_kwargs):
        hidden, residual = add_norm(self.norm, hidden, residual, self.residual_in_fp32)
        if mask is not None:
            mixer_kwargs["mask"] = mask
        return self.mixer(hidden, **mixer_kwargs), residual


def add_norm(norm: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool):
    """residual += hidden; return (norm(residual), residual)."""
    if residual_in_fp32:
        hidden = fp32(hidden)
    if isinstance(norm, RCPSAddNormWrapper):
        return norm(hidden, residual)
    residual = hidden if residual is None else residual + hidden
    return norm(residual.to(dtype=norm.weight.dtype)), residual
