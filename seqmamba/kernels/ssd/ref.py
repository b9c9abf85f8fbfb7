"""PyTorch reference of the Mamba-2 SSD scan (state space duality): a selective scan with a scalar decay per head.

    dt'  = softplus(dt + dt_bias)   (softplus only if dt_softplus; dt_bias optional)
    h_t  = exp(dt'_t A) h_{t-1} + dt'_t x_t B_t^T        h_{-1} = initial_state or 0
    y_t  = h_t C_t + D x_t,   then y_t *= silu(z_t) if z is given

Shapes: b batch, l length, h heads, p head dim, g groups of B/C (head i reads group i // (h // g)),
n state. x, z, y (b, l, h, p); dt (b, l, h); A, dt_bias (h); D (h) or (h, p); B, C (b, l, g, n);
states (b, h, p, n) (state[p, n] += dt x[p] B[n]).

The reference cuts the length into chunks of ``chunk_size`` and carries h across them in a Python loop.
Inside a chunk it uses the quadratic (dual) form: y = (C B^T ∘ L) (dt x) + exp(cumsum dA) C h_prev with
L[t, s] = exp(dA_{s+1} + ... + dA_t) for s <= t. Every exponent is a sum of dA = dt' A <= 0 (A < 0), so
nothing positive is exponentiated and fp32 stays finite under strong decay. Peak memory is
O(b l h p + b h chunk (p n + chunk)); under autograd each chunk is checkpointed, so backward keeps only the
inputs and one state per chunk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from seqmamba.kernels._dispatch import compute_dtype


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_ssd_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state, seq_idx) -> None:
    """Raise one ValueError naming the first bad argument and the shapes involved."""
    op = "ssd_scan"
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be (b, l, h, p), got {_shape(x)}")
    b, l, h, p = x.shape
    if _shape(dt) != (b, l, h):
        raise ValueError(f"{op}: dt must be (b, l, h) = {(b, l, h)} for x {_shape(x)}, got {_shape(dt)}")
    if _shape(A) != (h,):
        raise ValueError(f"{op}: A must be (h,) = ({h},) for x {_shape(x)}, got {_shape(A)}")
    if B.dim() != 4 or _shape(B)[:2] != (b, l):
        raise ValueError(f"{op}: B must be (b, l, g, n) with (b, l) = {(b, l)}, got {_shape(B)}")
    if _shape(C) != _shape(B):
        raise ValueError(f"{op}: C must have B's shape {_shape(B)}, got {_shape(C)}")
    g = B.shape[2]
    if g < 1 or h % g:
        raise ValueError(f"{op}: the groups g={g} of B {_shape(B)} must divide the heads h={h} of x {_shape(x)}")
    if D is not None and _shape(D) not in ((h,), (h, p)):
        raise ValueError(f"{op}: D must be (h,) = ({h},) or (h, p) = {(h, p)}, got {_shape(D)}")
    if z is not None and _shape(z) != _shape(x):
        raise ValueError(f"{op}: z must have x's shape {_shape(x)}, got {_shape(z)}")
    if dt_bias is not None and _shape(dt_bias) != (h,):
        raise ValueError(f"{op}: dt_bias must be (h,) = ({h},), got {_shape(dt_bias)}")
    n = B.shape[3]
    if initial_state is not None and _shape(initial_state) != (b, h, p, n):
        raise ValueError(f"{op}: initial_state must be (b, h, p, n) = {(b, h, p, n)}, "
                         f"got {_shape(initial_state)}")
    if seq_idx is not None:
        if _shape(seq_idx) != (b, l):
            raise ValueError(f"{op}: seq_idx must be (b, l) = {(b, l)}, got {_shape(seq_idx)}")
        if seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex or seq_idx.dtype == torch.bool:
            raise ValueError(f"{op}: seq_idx must be an integer tensor, got {seq_idx.dtype}")


def _segsum(dA: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T): out[t, s] = dA[s+1] + ... + dA[t] for s <= t, -inf for s > t.

    Summed directly (a masked cumsum) rather than as cumsum[t] - cumsum[s], which cancels badly in fp32
    once the cumulative decay is large.
    """
    T = dA.shape[-1]
    i = torch.arange(T, device=dA.device)
    seg = dA[..., :, None].expand(*dA.shape, T).masked_fill(i[:, None] <= i, 0).cumsum(-2)  # [k, s]: k > s
    return seg.masked_fill(i[:, None] < i, float("-inf"))  # [t, s]: s > t


def _chunk(x, dt, A, B, C, D, z, dt_bias, h_prev, seq, seq_prev, dt_softplus: bool, reverse: bool):
    """One chunk of the scan, in scan order. Returns y (b, T, h, p) in x's dtype and the state after it.

    x, z (b, T, h, p), dt (b, T, h), B, C (b, T, g, n), seq (b, T) or None: slices in storage order
    (flipped here when ``reverse``). h_prev (b, h, p, n) is the state before the chunk; seq_prev (b,) the
    seq_idx it belongs to: positions of another sequence do not see it.
    """
    dtype = h_prev.dtype
    if reverse:
        x, dt, B, C = (t.flip(1) for t in (x, dt, B, C))
        z = None if z is None else z.flip(1)
        seq = None if seq is None else seq.flip(1)
    b, T, h, p = x.shape
    g = B.shape[2]
    k = h // g  # heads per group; head (gi, ki) is head gi * k + ki
    xc, Bc, Cc = x.to(dtype), B.to(dtype), C.to(dtype)
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = dt.transpose(1, 2)  # (b, h, T)
    dA = dt * A.to(dtype)[:, None]

    seg = _segsum(dA)  # (b, h, T, T)
    decay = dA.cumsum(-1).exp()  # (b, h, T): exp(dA_0 + ... + dA_t), decay of h_prev up to t
    if seq is not None:
        seg = seg.masked_fill(seq[:, None, :, None] != seq[:, None, None, :], float("-inf"))
        decay = decay * (seq == seq_prev[:, None])[:, None, :]
    L = seg.exp()

    xg = xc.unflatten(2, (g, k))  # (b, T, g, k, p)
    Lw = (L * dt[:, :, None, :]).unflatten(1, (g, k))  # (b, g, k, T, T): L[t, s] dt_s
    CB = torch.einsum("btgn,bsgn->bgts", Cc, Bc)
    y = torch.einsum("bgkts,bsgkp->btgkp", Lw * CB[:, :, None], xg)
    h_prev = h_prev.unflatten(1, (g, k))  # (b, g, k, p, n)
    decay_t = decay.unflatten(1, (g, k)).permute(0, 3, 1, 2)[..., None]  # (b, T, g, k, 1)
    y = y + torch.einsum("btgn,bgkpn->btgkp", Cc, h_prev) * decay_t
    y = y.reshape(b, T, h, p)

    # The last row of L carries every position to the chunk end (seq_idx masking included).
    ws = Lw[..., -1, :]  # (b, g, k, T)
    h_new = torch.einsum("bgks,bsgkp,bsgn->bgkpn", ws, xg, Bc)
    h_new = h_new + decay[..., -1].unflatten(1, (g, k))[..., None, None] * h_prev

    if D is not None:
        y = y + xc * (D.to(dtype)[:, None] if D.dim() == 1 else D.to(dtype))
    if z is not None:
        y = y * F.silu(z.to(dtype))
    y = y.to(x.dtype)
    return (y.flip(1) if reverse else y), h_new.flatten(1, 2)


def ssd_scan_ref(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
                 initial_state=None, return_final_state=False, reverse=False, seq_idx=None):
    """Chunked PyTorch SSD scan; exact on CPU (float64 in, float64 math).

    Arguments (shapes as mamba_ssm's ``mamba_chunk_scan_combined``):
        x: (b, l, h, p)    dt: (b, l, h)    A: (h,), negative    B, C: (b, l, g, n), h % g == 0
        chunk_size: positive int, length of the chunks the scan is cut into (the result does not depend on it)
        D: (h,) or (h, p) skip    z: (b, l, h, p) gate, y *= silu(z)    dt_bias: (h,) added to dt
        dt_softplus: apply softplus to dt (+ dt_bias)
        initial_state: (b, h, p, n), the state before the first position (zeros if None)
        return_final_state: also return the state after the last position, (b, h, p, n)
        reverse: the anti-causal scan, from position l-1 down to 0. It equals flip∘op∘flip along length,
            states and seq_idx included: initial_state enters at position l-1 and the final state is the
            state after position 0.
        seq_idx: (b, l) integers, non-decreasing along l (not checked), marking sequences packed into one
            row. Where seq_idx[t] != seq_idx[t-1] the state is reset (h_{t-1} is taken as 0), so no
            information crosses sequences. initial_state feeds only the first sequence of each row (the
            last one when reverse), and the final state is the state after the last position, i.e. the
            final state of the row's last sequence (first when reverse).

    Math runs in fp32 (float64 if any input is float64). Returns y (b, l, h, p) in x's dtype, or
    (y, final_state) with final_state in the compute dtype.
    """
    check_ssd_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state, seq_idx)
    b, l, h, p = x.shape
    n = B.shape[3]
    dtype = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_state)
    state = (initial_state.to(dtype) if initial_state is not None
             else x.new_zeros(b, h, p, n, dtype=dtype))
    tensors = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    use_checkpoint = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

    # torch.split rather than slicing: the backward of a slice is a full-length tensor per chunk.
    sizes = [chunk_size] * (l // chunk_size) + ([l % chunk_size] if l % chunk_size else [])
    if reverse:  # chunks from the end: [..., [l - 2 cs, l - cs), [l - cs, l)]
        sizes.reverse()
    split = lambda t: [None] * len(sizes) if t is None else t.split(sizes, 1)
    chunks = list(zip(*map(split, (x, dt, B, C, z, seq_idx))))
    ys, seq_prev = [], None
    for xc, dtc, Bc, Cc, zc, seq in (reversed(chunks) if reverse else chunks):
        if seq is not None and seq_prev is None:  # at the start: the sequence of the first scanned position
            seq_prev = seq[:, -1 if reverse else 0]
        args = (xc, dtc, A, Bc, Cc, D, zc, dt_bias, state, seq, seq_prev, dt_softplus, reverse)
        if use_checkpoint:
            y, state = checkpoint(_chunk, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            y, state = _chunk(*args)
        ys.append(y)
        if seq is not None:  # the last scanned position; later positions of another sequence ignore state
            seq_prev = seq[:, 0 if reverse else -1]
    if reverse:
        ys.reverse()
    y = torch.cat(ys, 1) if ys else x.new_empty(b, 0, h, p)
    return (y, state) if return_final_state else y
