"""Depthwise causal convolution over length, as in the Mamba mixers' ``conv1d``.

    xpad = cat(h0, x)                       (b, d, w-1+l), h0 = initial_state or zeros
    y[t] = act(sum_k weight[k] xpad[t+k] + bias)     k = 0..w-1
    ht   = xpad[..., -(w-1):]               the last w-1 inputs in scan order

Shapes: x, y (b, d, l); weight (d, w) or (d, 1, w) as nn.Conv1d stores it; bias (d); state (b, d, w-1),
empty (b, d, 0) when w == 1. ``reverse=True`` is the anti-causal conv, exactly flip∘op∘flip along length
(states included), computed without flipping x: y = conv(cat(x, flip(h0)), flip(weight)),
ht = flip(first w-1 columns of that padded tensor).

Math runs in fp32 (float64 if any input is float64); y comes back in x's dtype, the final state in the
compute dtype. ``causal_conv1d_update`` is one decoding step: it shifts the state left and appends x.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from seqmamba.kernels._dispatch import compute_dtype, resolve_backend, triton_available

ACTIVATIONS = (None, "silu", "swish")


def _check_activation(op: str, activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _as_2d_weight(op: str, weight: torch.Tensor) -> torch.Tensor:
    """(d, w) or (d, 1, w) -> (d, w)."""
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight.squeeze(1)
    if weight.dim() != 2 or weight.shape[1] < 1:
        raise ValueError(f"{op}: weight must be (d, w) or (d, 1, w) with w >= 1, got {tuple(weight.shape)}")
    return weight


def _check(op: str, x, weight, bias, state, state_name: str, activation, x_dims: int) -> torch.Tensor:
    """Validate shapes; return weight as (d, w)."""
    _check_activation(op, activation)
    if x.dim() != x_dims:
        want = "(b, d, l)" if x_dims == 3 else "(b, d)"
        raise ValueError(f"{op}: x must be {want}, got {tuple(x.shape)}")
    weight = _as_2d_weight(op, weight)
    b, d = x.shape[:2]
    w = weight.shape[1]
    if weight.shape[0] != d:
        raise ValueError(f"{op}: weight has {weight.shape[0]} channels but x has d={d}")
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"{op}: bias must be (d,) = ({d},), got {tuple(bias.shape)}")
    if state is None and x_dims == 2:
        raise ValueError(f"{op}: {state_name} (b, d, w-1) is required")
    if state is not None and tuple(state.shape) != (b, d, w - 1):
        raise ValueError(f"{op}: {state_name} must be (b, d, w-1) = {(b, d, w - 1)}, got {tuple(state.shape)}")
    return weight


def _act(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(y) if activation in ("silu", "swish") else y


def causal_conv1d_ref(x, weight, bias=None, initial_state=None, return_final_state=False, activation=None,
                      reverse=False):
    """PyTorch reference. x (b, d, l), weight (d, w) | (d, 1, w), bias (d), initial_state (b, d, w-1).

    Returns y (b, d, l) in x's dtype, or (y, final_state (b, d, w-1)) in the compute dtype.
    """
    weight = _check("causal_conv1d", x, weight, bias, initial_state, "initial_state", activation, 3)
    dtype = compute_dtype(x, weight, bias, initial_state)
    b, d, l = x.shape
    w = weight.shape[1]
    h0 = (initial_state.to(dtype) if initial_state is not None
          else x.new_zeros(b, d, w - 1, dtype=dtype))
    bias = bias.to(dtype) if bias is not None else None
    if not reverse:
        xpad = torch.cat([h0, x.to(dtype)], dim=-1)  # (b, d, w-1+l)
        kernel = weight.to(dtype)
        ht = xpad[..., l:]  # last w-1 columns
    else:
        # flip∘op∘flip: the padded input of the flipped problem, flipped back, is cat(x, flip(h0)), and
        # its last w-1 columns (the flipped problem's final state) are the flip of our first w-1.
        xpad = torch.cat([x.to(dtype), h0.flip(-1)], dim=-1)  # (b, d, l+w-1)
        kernel = weight.to(dtype).flip(-1)
        ht = xpad[..., : w - 1].flip(-1)
    y = F.conv1d(xpad, kernel.unsqueeze(1), bias, groups=d)  # (b, d, l)
    y = _act(y, activation).to(x.dtype)
    return (y, ht) if return_final_state else y


def causal_conv1d(x, weight, bias=None, initial_state=None, return_final_state=False, activation=None,
                  reverse=False, *, backend="auto"):
    """Depthwise causal (or, with ``reverse``, anti-causal) conv over length; see the module docstring.

    x (b, d, l), weight (d, w) | (d, 1, w), bias (d), initial_state (b, d, w-1).
    Returns y (b, d, l), or (y, final_state (b, d, w-1)) when ``return_final_state``.
    """
    _check("causal_conv1d", x, weight, bias, initial_state, "initial_state", activation, 3)
    impl = _triton_impl()
    which = resolve_backend("causal_conv1d", backend, x, has_triton_impl=impl is not None)
    if which == "triton" and any(t is not None and t.dtype == torch.float64 for t in (x, weight, bias, initial_state)):
        if backend == "triton":
            raise RuntimeError("causal_conv1d: the Triton backend takes fp32/bf16/fp16; use backend='ref' for float64")
        which = "ref"
    if which == "triton":
        return impl(x, weight, bias, initial_state, return_final_state, activation, reverse)
    return causal_conv1d_ref(x, weight, bias, initial_state, return_final_state, activation, reverse)


def _triton_impl():
    """The Triton causal_conv1d (imported on first use), or None where Triton is missing."""
    global _TRITON_IMPL
    if _TRITON_IMPL is False:
        _TRITON_IMPL = None
        if triton_available():
            try:
                from seqmamba.kernels.causal_conv1d_triton import causal_conv1d_triton as _TRITON_IMPL
            except Exception:  # a broken Triton install: the reference still works  # pragma: no cover
                _TRITON_IMPL = None
    return _TRITON_IMPL


_TRITON_IMPL = False


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None):
    """One step. x (b, d), conv_state (b, d, w-1) -> y (b, d) in x's dtype, new_state (b, d, w-1).

    Functional: conv_state is not modified; new_state (compute dtype) is conv_state shifted left with x
    appended.
    """
    weight = _check("causal_conv1d_update", x, weight, bias, conv_state, "conv_state", activation, 2)
    dtype = compute_dtype(x, conv_state, weight, bias)
    window = torch.cat([conv_state.to(dtype), x.to(dtype).unsqueeze(-1)], dim=-1)  # (b, d, w)
    y = (window * weight.to(dtype)).sum(-1)  # (b, d)
    if bias is not None:
        y = y + bias.to(dtype)
    return _act(y, activation).to(x.dtype), window[..., 1:]


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, *, backend="auto"):
    """One decoding step of ``causal_conv1d``. x (b, d), conv_state (b, d, w-1) -> (y (b, d), new_state)."""
    _check("causal_conv1d_update", x, weight, bias, conv_state, "conv_state", activation, 2)
    if resolve_backend("causal_conv1d_update", backend, x, has_triton_impl=False) == "triton":
        raise NotImplementedError("causal_conv1d_update: Triton kernel not written yet")
    return causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
