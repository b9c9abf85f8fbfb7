"""Residual block, pre-norm: Add -> Norm -> Mixer (mamba_ssm's order).

Each block receives the previous mixer output and the running residual, adds them, normalises and mixes;
the last residual add is done by the backbone's final norm. Keeping the residual separate lets it stay in
float32 (``residual_in_fp32``) while the mixers run in bf16.
"""
from __future__ import annotations

import torch
from torch import nn

from seqmamba.mamba import autocast_dtype, fp32
from seqmamba.rcps import RCPSAddNormWrapper


class Block(nn.Module):
    """``forward(hidden (b, l, c), residual (b, l, c) | None, mask (b, l) | None) -> (hidden, residual)``."""

    def __init__(self, mixer: nn.Module, norm: nn.Module, residual_in_fp32: bool = True):
        super().__init__()
        self.mixer, self.norm, self.residual_in_fp32 = mixer, norm, residual_in_fp32

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, **mixer_kwargs):
        residual = add_residual(hidden, residual, self.residual_in_fp32)
        return self.mix(residual, mask, **mixer_kwargs), residual

    def mix(self, residual: torch.Tensor, mask: torch.Tensor | None = None, **mixer_kwargs) -> torch.Tensor:
        """mixer(norm(residual)): the part activation checkpointing recomputes, so that it keeps only the
        residual of each block (the add before it saves nothing for the backward)."""
        if mask is not None:
            mixer_kwargs["mask"] = mask
        hidden = apply_norm(self.norm, residual)
        if not torch.is_grad_enabled():
            # in the dtype the mixer's in_proj casts it to anyway: without autograd the full-length normed
            # input then takes half the memory under autocast while the mixer runs
            hidden = hidden.to(autocast_dtype(hidden))
        return self.mixer(hidden, **mixer_kwargs)


def add_residual(hidden: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool) -> torch.Tensor:
    """residual + hidden (hidden alone for the first block), in float32 when ``residual_in_fp32``."""
    if residual_in_fp32:
        hidden = fp32(hidden)
    return hidden if residual is None else residual + hidden


def add_residual_(hidden: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool) -> torch.Tensor:
    """``add_residual`` without autograd, in place: one full-length residual instead of two at a time (a
    block's residual is its own tensor: the first one is copied when it would be the caller's ``hidden``)."""
    if residual is None:
        first = add_residual(hidden, None, residual_in_fp32)
        return first.clone() if first is hidden else first
    return residual.add_(hidden)


def apply_norm(norm: nn.Module, residual: torch.Tensor) -> torch.Tensor:
    if isinstance(norm, RCPSAddNormWrapper):
        return norm(residual)[0]
    return norm(residual.to(dtype=norm.weight.dtype))


def add_norm(norm: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool):
    """residual += hidden (in place without autograd); return (norm(residual), residual)."""
    add = add_residual if torch.is_grad_enabled() else add_residual_
    residual = add(hidden, residual, residual_in_fp32)
    return apply_norm(norm, residual), residual
