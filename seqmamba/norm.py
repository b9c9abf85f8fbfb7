"""Normalisation layers of the core."""
from __future__ import annotations

import torch
from torch import nn

from seqmamba.kernels import rms_norm_gated


class RMSNormGated(nn.Module):
    """Mamba-2's output norm: ``rmsnorm(y * silu(z)) * weight``, normalised per group of ``group_size``
    channels (d_inner / ngroups, as mamba_ssm). y, z ``(..., d)``."""

    def __init__(self, d: int, eps: float = 1e-5, group_size: int | None = None, norm_before_gate: bool = False,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        self.eps, self.group_size, self.norm_before_gate, self.backend = eps, group_size, norm_before_gate, backend

    def forward(self, y: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm_gated(y, self.weight, z, eps=self.eps, group_size=self.group_size,
                              norm_before_gate=self.norm_before_gate, backend=self.backend)


def make_norm(kind: str, d: int, eps: float = 1e-5, device=None, dtype=None) -> nn.Module:
    """``"rmsnorm"`` -> torch.nn.RMSNorm, ``"layernorm"`` -> torch.nn.LayerNorm; parameter ``weight`` (+ ``bias``)."""
    if kind == "rmsnorm":
        return nn.RMSNorm(d, eps=eps, device=device, dtype=dtype)
    if kind == "layernorm":
        return nn.LayerNorm(d, eps=eps, device=device, dtype=dtype)
    raise ValueError(f"unknown norm {kind!r}: expected 'rmsnorm' or 'layernorm'")
