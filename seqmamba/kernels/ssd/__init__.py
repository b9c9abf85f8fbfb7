"""Mamba-2 SSD scan (state space duality): the public op, its PyTorch reference (``ref.py``) and its Triton
kernels (``chunk.py``, imported only when Triton is installed).

    dt'  = softplus(dt + dt_bias)   (softplus only if dt_softplus; dt_bias optional)
    h_t  = exp(dt'_t A) h_{t-1} + dt'_t x_t B_t^T        h_{-1} = initial_state or 0
    y_t  = h_t C_t + D x_t,   then y_t *= silu(z_t) if z is given

Shapes: b batch, l length, h heads, p head dim, g groups of B/C (head i reads group i // (h // g)),
n state. x, z, y (b, l, h, p); dt (b, l, h); A, dt_bias (h); D (h) or (h, p); B, C (b, l, g, n);
states (b, h, p, n) (state[p, n] += dt x[p] B[n]).
"""
from __future__ import annotations

from seqmamba.kernels._dispatch import load_triton_impl, resolve_backend
from seqmamba.kernels.ssd.ref import check_ssd_args, ssd_scan_ref

# Implementations with ssd_scan_ref's positional signature; the Triton one registers itself as "triton".
_IMPLS = {"ref": ssd_scan_ref}
if (_triton_impl := load_triton_impl("seqmamba.kernels.ssd.chunk", "ssd_scan_triton")) is not None:
    _IMPLS["triton"] = _triton_impl


def ssd_scan(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
             initial_state=None, return_final_state=False, reverse=False, seq_idx=None, *, backend="auto"):
    """Mamba-2 SSD scan; see ``ssd_scan_ref`` for arguments, shapes and the seq_idx/reverse semantics.

    backend: "auto" (Triton for CUDA tensors of fp32/bf16/fp16 when Triton is installed, else the reference;
    float64 always goes to the reference, which is exact in float64), "triton" or "ref". ``chunk_size`` tunes
    the reference only: the Triton kernels pick their own chunking (the result does not depend on it). With fp32
    x, B or C the Triton products are 3xTF32 (fp32 accuracy) unless torch allows TF32 for fp32 matmuls
    (``torch.backends.cuda.matmul.fp32_precision = "tf32"`` or ``torch.set_float32_matmul_precision("high")``):
    then they are single TF32 products (2.5-3.4x faster, about 1e-3 relative error), as torch's own matmuls.
    """
    check_ssd_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state, seq_idx)
    impl = resolve_backend("ssd_scan", backend, x, has_triton_impl="triton" in _IMPLS,
                           inputs=(x, dt, A, B, C, D, z, dt_bias, initial_state))
    return _IMPLS[impl](x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_state,
                        return_final_state, reverse, seq_idx)


__all__ = ["ssd_scan", "ssd_scan_ref", "check_ssd_args"]
