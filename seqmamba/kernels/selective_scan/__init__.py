"""Mamba-1 selective scan: the public op, its PyTorch reference (``ref.py``) and its Triton kernels
(``chunk.py``, imported only when Triton is installed).

    dt_t = softplus(delta_t + delta_bias)            (softplus and delta_bias optional)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t       h_{-1} = initial_state or 0
    y_t  = sum_n C_t * h_t + D * u_t,  then y_t *= silu(z_t) when z is given

Shape letters: b batch, d channels, l length, n state size, g groups (B/C shared by d // g channels).
"""
from __future__ import annotations

from seqmamba.kernels._dispatch import load_triton_impl, resolve_backend
from seqmamba.kernels.selective_scan.ref import (_contract_c, _grouped, _per_channel_mul, _scan_,  # noqa: F401
                                                 _scan_chunk, _skip_and_gate, auto_chunk_size, carry_mask,
                                                 check_scan_args, delta_dt, linear_scan, selective_scan_ref)

# Seam for the fused kernel: a callable with selective_scan_ref's signature, or None without Triton.
_selective_scan_triton = load_triton_impl("seqmamba.kernels.selective_scan.chunk", "selective_scan_triton")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, reverse=False, *, seq_idx=None,
                   chunk_size=None, backend="auto"):
    """Selective scan. u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l);
    D, delta_bias: (d,); initial_state: (b, d, n).

    Returns y (b, d, l) in u's dtype, or (y, final_state (b, d, n), fp32) when return_final_state.
    ``backend="auto"`` runs the Triton kernels for CUDA tensors (fp32, bf16, fp16; float64 inputs go to the
    reference, which is exact in float64) and the chunked reference otherwise. ``chunk_size`` tunes the
    reference only.

    ``seq_idx`` (b, l) integers, non-decreasing along l, packs several sequences into one row: where it
    changes the state is reset (for ``reverse``, where it changes from right to left), so nothing crosses
    sequences. ``initial_state`` feeds the row's first sequence in scan order (the last one when ``reverse``);
    the final state is the state after the row's last position in scan order.
    """
    b, _, l, _ = check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    carry_mask(seq_idx, b, l, reverse, u.device)  # validates seq_idx (a cheap (b, l) comparison)
    which = resolve_backend("selective_scan", backend, u, has_triton_impl=_selective_scan_triton is not None,
                            inputs=(u, delta, A, B, C, D, z, delta_bias, initial_state))
    impl = _selective_scan_triton if which == "triton" else selective_scan_ref
    return impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state,
                reverse, chunk_size=chunk_size, seq_idx=seq_idx)


__all__ = ["selective_scan", "selective_scan_ref", "auto_chunk_size", "check_scan_args", "delta_dt",
           "linear_scan"]
