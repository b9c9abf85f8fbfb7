"""One step of the selective scan, for recurrent decoding (mixers' ``step()``).

Shape letters: b batch, d channels, n state size, g groups (B/C shared by d // g channels).
Mamba-2 uses it by folding heads * head dim (h * p) into d.

    dt = softplus(delta + delta_bias)                 (softplus and delta_bias optional)
    h  = exp(dt * A) * state + dt * B * u
    y  = sum_n C * h + D * u
    y  = y * silu(z)                                  (when z is given)

Functional: returns (y, new_state) and never writes to its inputs.
"""
from __future__ import annotations

import torch

from seqmamba.kernels._dispatch import compute_dtype, resolve_backend
from seqmamba.kernels.selective_scan import _skip_and_gate, check_scan_args, delta_dt

# Seam for a fused kernel: a callable with selective_state_update_ref's signature. None until one exists.
_selective_state_update_triton = None


def selective_state_update(state, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           *, backend="auto"):
    """state: (b, d, n); u, delta, z: (b, d); A: (d, n); B, C: (b, n) or (b, g, n); D, delta_bias: (d,).

    Returns (y (b, d) in u's dtype, new_state (b, d, n) in the compute dtype).
    """
    which = resolve_backend("selective_state_update", backend, u,
                            has_triton_impl=_selective_state_update_triton is not None)
    impl = _selective_state_update_triton if which == "triton" else selective_state_update_ref
    return impl(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def selective_state_update_ref(state, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                               delta_softplus=False):
    """PyTorch reference of :func:`selective_state_update` (same arguments, minus ``backend``)."""
    if not isinstance(state, torch.Tensor):
        raise ValueError(f"selective_state_update: state must be a tensor, got {type(state).__name__}")
    b, d, _, n = check_scan_args(u, delta, A, B, C, D, z, delta_bias, state,
                                 op="selective_state_update", step=True)
    dtype = compute_dtype(state, u, delta, A, B, C, D, z, delta_bias)
    x = u.to(dtype)
    dt = delta_dt(delta, delta_bias, delta_softplus, dtype)                 # (b, d)
    B, C = _per_channel(B, d).to(dtype), _per_channel(C, d).to(dtype)        # (b, d, n)
    h = torch.exp(dt[..., None] * A.to(dtype)) * state.to(dtype) + (dt * x)[..., None] * B
    y = (h * C).sum(-1)
    y = _skip_and_gate(y, x, D, z, dtype)
    return y.to(u.dtype), h


def _per_channel(X, d):
    """(b, n) or (b, g, n) -> (b, d, n) view; channel i reads group i // (d // g)."""
    if X.dim() == 2:
        return X[:, None].expand(-1, d, -1)
    b, g, n = X.shape
    return X[:, :, None].expand(b, g, d // g, n).reshape(b, d, n)
