"""Gated RMSNorm, the Mamba-2 output norm.

    norm_before_gate=False:  y = rms(x * silu(z)) * weight
    norm_before_gate=True:   y = rms(x) * weight * silu(z)
    rms(v) = v / sqrt(mean(v^2 over each group) + eps)

Shapes: x, z, y (..., d); weight (d); groups are contiguous blocks of ``group_size`` channels
(None = d, one group). Math runs in fp32 (float64 if any input is float64); y comes back in x's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from seqmamba.kernels._dispatch import compute_dtype, load_triton_impl, resolve_backend


def _check(x, weight, z, group_size) -> int:
    """Validate shapes; return the group size."""
    if x.dim() < 1:
        raise ValueError(f"rms_norm_gated: x must be (..., d), got {tuple(x.shape)}")
    d = x.shape[-1]
    if tuple(weight.shape) != (d,):
        raise ValueError(f"rms_norm_gated: weight must be (d,) = ({d},), got {tuple(weight.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"rms_norm_gated: z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    group_size = d if group_size is None else group_size
    if group_size < 1 or d % group_size != 0:
        raise ValueError(f"rms_norm_gated: group_size={group_size} must divide d={d}")
    return group_size


def _rms_norm_groups(x: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    xg = x.unflatten(-1, (-1, group_size))  # (..., d/group_size, group_size)
    xg = xg * torch.rsqrt(xg.square().mean(-1, keepdim=True) + eps)
    return xg.flatten(-2)  # (..., d)


def rms_norm_gated_ref(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=False):
    """PyTorch reference. x, z (..., d), weight (d) -> y (..., d) in x's dtype."""
    group_size = _check(x, weight, z, group_size)
    dtype = compute_dtype(x, weight, z)
    v = x.to(dtype)
    gate = F.silu(z.to(dtype)) if z is not None else None
    if gate is not None and not norm_before_gate:
        v = v * gate
    y = _rms_norm_groups(v, group_size, eps) * weight.to(dtype)
    if gate is not None and norm_before_gate:
        y = y * gate
    return y.to(x.dtype)


_rms_norm_gated_triton = load_triton_impl("seqmamba.kernels.layernorm_gated_triton", "rms_norm_gated_triton")


def rms_norm_gated(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=False, *, backend="auto"):
    """Gated RMSNorm; see the module docstring. x, z (..., d), weight (d) -> y (..., d). CUDA fp32/bf16/fp16
    inputs run the Triton kernels (``layernorm_gated_triton.py``); float64 and CPU inputs the reference."""
    _check(x, weight, z, group_size)
    which = resolve_backend("rms_norm_gated", backend, x, has_triton_impl=_rms_norm_gated_triton is not None,
                            inputs=(x, weight, z))
    if which == "triton":
        return _rms_norm_gated_triton(x, weight, z, eps, group_size, norm_before_gate)
    return rms_norm_gated_ref(x, weight, z, eps, group_size, norm_before_gate)
