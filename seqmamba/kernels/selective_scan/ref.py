"""Mamba-1 selective scan: the PyTorch reference and its helpers.

Shape letters: b batch, d channels, l length, n state size, g groups (B/C shared by d // g channels).

    dt_t = softplus(delta_t + delta_bias)            (softplus and delta_bias optional)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t       h_{-1} = initial_state or 0
    y_t  = sum_n C_t * h_t + D * u_t
    y    = y * silu(z)                                (when z is given)

``reverse=True`` is the anti-causal scan: ``flip(op(flip(inputs)))`` along l, states included.

The reference walks the sequence in chunks of length T and carries the (b, d, n) state between
chunks; inside a chunk a Hillis-Steele prefix scan runs in log2(T) vectorised steps. The scan only
multiplies decays exp(dt * A) <= 1, so no positive cumulative sum is ever exponentiated; its
backward is the adjoint reverse scan. Under autograd every chunk is checkpointed, so backward keeps
the chunk-boundary states, not (b, d, n, l) intermediates: peak memory O(b*d*l + b*d*n*T).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from seqmamba.kernels._dispatch import compute_dtype

# Elements of one (b, d, n, T) chunk: about 2^20 stays in a CPU's caches (measured fastest on CPU); a GPU
# wants fewer, larger launches.
_TARGET_CHUNK_ELEMS = {"cpu": 2 ** 20, "cuda": 2 ** 23}
_MIN_CHUNK, _MAX_CHUNK = 16, 2048

def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, return_final_state=False, reverse=False, chunk_size=None,
                       seq_idx=None):
    """Chunked PyTorch reference of :func:`selective_scan` (same arguments, minus ``backend``)."""
    b, d, l, n = check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    keep = carry_mask(seq_idx, b, l, reverse, u.device)
    if chunk_size is None:
        chunk_size = auto_chunk_size(b, d, n, u.device.type)
    elif not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"selective_scan: chunk_size must be a positive int, got {chunk_size!r}")
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)

    A = A.to(dtype)
    if initial_state is None:
        h = u.new_zeros(b, d, n, dtype=dtype)
    else:
        h = initial_state.to(dtype)
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    use_ckpt = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*tensors, h))

    starts = range(0, l, chunk_size)
    ys = []
    for s in (reversed(starts) if reverse else starts):
        sl = slice(s, min(s + chunk_size, l))
        args = (h, u[..., sl], delta[..., sl], A, B[..., sl], C[..., sl], D,
                None if z is None else z[..., sl], delta_bias, delta_softplus, reverse, dtype,
                None if keep is None else keep[:, sl])
        if use_ckpt:
            y, h = checkpoint(_scan_chunk, *args, use_reentrant=False)
        else:
            y, h = _scan_chunk(*args)
        ys.append(y.to(u.dtype))
    if reverse:
        ys.reverse()
    y = torch.cat(ys, dim=-1) if ys else u.new_zeros(b, d, 0)
    return (y, h) if return_final_state else y


def auto_chunk_size(b: int, d: int, n: int, device_type: str = "cpu") -> int:
    """Power of two T with b*d*n*T near the device's target (2**20 on CPU, 2**23 on CUDA), clamped to [16, 2048]."""
    t = 2 ** round(math.log2(max(_TARGET_CHUNK_ELEMS.get(device_type, 2 ** 20) / max(b * d * n, 1), 1)))
    return min(max(t, _MIN_CHUNK), _MAX_CHUNK)


def carry_mask(seq_idx, b, l, reverse, device):
    """seq_idx (b, l) integers -> (b, l) bool, False where the state is reset before the position (its scan
    predecessor belongs to another sequence); None when seq_idx is None."""
    if seq_idx is None:
        return None
    if not isinstance(seq_idx, torch.Tensor) or tuple(seq_idx.shape) != (b, l):
        got = tuple(seq_idx.shape) if isinstance(seq_idx, torch.Tensor) else type(seq_idx).__name__
        raise ValueError(f"selective_scan: seq_idx must be a (b, l) = {(b, l)} integer tensor, got {got}")
    if seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex or seq_idx.dtype == torch.bool:
        raise ValueError(f"selective_scan: seq_idx must be an integer tensor, got {seq_idx.dtype}")
    keep = torch.ones(b, l, dtype=torch.bool, device=device)
    same = seq_idx[:, 1:] == seq_idx[:, :-1]          # (b, l-1): position t+1 continues position t
    if reverse:
        keep[:, :-1] = same
    else:
        keep[:, 1:] = same
    return keep


def _scan_chunk(h0, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, dtype, keep=None):
    """One chunk. h0: (b, d, n); u, delta, z: (b, d, T); B, C: (b, [g,] n, T); keep (b, T) bool or None
    (False: the state is reset before that position). Returns y (b, d, T) in ``dtype`` and the state after
    the chunk's last step (in scan order)."""
    u, dt = u.to(dtype), delta_dt(delta, delta_bias, delta_softplus, dtype)
    B, C = _grouped(B).to(dtype), _grouped(C).to(dtype)
    dtu = dt * u
    if reverse:  # chunk-local flips only: scan order is right to left
        dt, dtu, B, C = (t.flip(-1) for t in (dt, dtu, B, C))
        keep = None if keep is None else keep.flip(-1)
    dA = torch.exp(dt[:, :, None, :] * A[:, :, None])                       # (b, d, n, T)
    if keep is not None:  # a reset multiplies the carried state by 0
        dA = dA * keep[:, None, None, :].to(dtype)
    dBu = _per_channel_mul(B, dtu)                                          # (b, d, n, T)
    dBu[..., 0] += dA[..., 0] * h0                  # fold the carried state into the first step
    h = linear_scan(dA, dBu, overwrite=True)
    y = _contract_c(h, C)                                                  # (b, d, T)
    if reverse:
        y = y.flip(-1)
    y = _skip_and_gate(y, u, D, z, dtype)
    return y, h[..., -1].clone()  # a view would keep the whole (b, d, n, T) h alive


def delta_dt(delta, delta_bias, delta_softplus, dtype):
    """dt = softplus(delta + delta_bias) in ``dtype`` (bias and softplus optional)."""
    dt = delta.to(dtype)
    if delta_bias is not None:
        bias = delta_bias.to(dtype)
        dt = dt + (bias[:, None] if dt.dim() == 3 else bias)
    return F.softplus(dt) if delta_softplus else dt


def _skip_and_gate(y, u, D, z, dtype):
    if D is not None:
        D = D.to(dtype)
        y = y + (D[:, None] if u.dim() == 3 else D) * u
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y


def _grouped(X):
    """(b, n, ...) -> (b, 1, n, ...); (b, g, n, ...) unchanged."""
    return X if X.dim() == 4 else X.unsqueeze(1)


def _per_channel_mul(B, x):
    """B (b, g, n, T) times x (b, d, T) -> (b, d, n, T); channel i reads group i // (d // g)."""
    b, g, n, T = B.shape
    d = x.shape[1]
    return (B[:, :, None] * x.reshape(b, g, d // g, 1, T)).reshape(b, d, n, T)


def _contract_c(h, C):
    """sum_n h (b, d, n, T) * C (b, g, n, T) -> (b, d, T) without expanding C over channels."""
    b, d, n, T = h.shape
    g = C.shape[1]
    return torch.einsum("bgknt,bgnt->bgkt", h.reshape(b, g, d // g, n, T), C).reshape(b, d, T)


def linear_scan(a, x, overwrite=False):
    """h_t = a_t * h_{t-1} + x_t along the last dim, h_{-1} = 0. a, x: (..., T), 0 <= a <= 1.

    Differentiable with a hand-written backward (itself a reverse scan), so autograd keeps two
    (..., T) tensors instead of every doubling step. ``overwrite``: outside autograd, a and x may be
    used as scratch, saving two copies.
    """
    if torch.is_grad_enabled() and (a.requires_grad or x.requires_grad):
        return _LinearScan.apply(a, x)
    return _scan_(a, x) if overwrite else _scan_(a.clone(), x.clone())


def _scan_(a, x):
    """In place: x becomes h (the scan above) and a is used as scratch. Returns x.

    Hillis-Steele doubling: after the step with offset k, (a_t, x_t) summarise the positions
    (t - 2k, t], so log2(T) vectorised steps. Only decays <= 1 are multiplied: no overflow.
    """
    T = x.shape[-1]
    k = 1
    while k < T:
        x[..., k:] += a[..., k:] * x[..., :-k]
        if 2 * k < T:
            a[..., k:] = a[..., k:] * a[..., :-k]
        k *= 2
    return x


class _LinearScan(torch.autograd.Function):
    """Adjoint of h_t = a_t h_{t-1} + x_t: g_t = dh_t + a_{t+1} g_{t+1} (a reverse scan);
    dx_t = g_t, da_t = g_t h_{t-1}."""

    @staticmethod
    def forward(ctx, a, x):
        h = _scan_(a.clone(), x.clone())
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        a, h = ctx.saved_tensors
        a_next = F.pad(a[..., 1:], (0, 1)).flip(-1)
        g = _scan_(a_next, dh.flip(-1)).flip(-1)
        da = g * F.pad(h[..., :-1], (1, 0))
        return da, g


def check_scan_args(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None,
                    op="selective_scan", step=False):
    """Validate shapes and dtypes; return (b, d, l, n) (l = 1 when ``step``). One ValueError naming
    the argument and the shapes on failure. ``step`` drops the trailing l dimension everywhere."""
    tail = "" if step else ", l"

    def fail(name, t, want):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must have shape {want}, got {got} "
                         f"(u: {tuple(u.shape) if isinstance(u, torch.Tensor) else u!r}, "
                         f"A: {tuple(A.shape) if isinstance(A, torch.Tensor) else A!r})")

    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias), ("initial_state" if not step else "state", initial_state)):
        if t is None and name in ("u", "delta", "A", "B", "C"):
            raise ValueError(f"{op}: {name} is required, got None")
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if u.dim() != (2 if step else 3):
        fail("u", u, f"(b, d{tail})")
    if A.dim() != 2:
        fail("A", A, "(d, n)")
    b, d, l = u.shape[0], u.shape[1], (1 if step else u.shape[2])
    n = A.shape[1]
    if A.shape[0] != d:
        fail("A", A, f"(d, n) with d={d}")
    if delta.shape != u.shape:
        fail("delta", delta, f"(b, d{tail}) = {tuple(u.shape)}")
    if z is not None and z.shape != u.shape:
        fail("z", z, f"(b, d{tail}) = {tuple(u.shape)}")
    bc_tail = (n,) if step else (n, l)
    for name, X in (("B", B), ("C", C)):
        ok = (X.dim() == 2 + (not step) and X.shape == (b, *bc_tail)) or (
            X.dim() == 3 + (not step) and X.shape[0] == b and X.shape[2:] == bc_tail
            and X.shape[1] > 0 and d % X.shape[1] == 0)
        if not ok:
            fail(name, X, f"(b, n{tail}) = {(b, *bc_tail)} or (b, g, n{tail}) with d % g == 0, d={d}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (d,):
            fail(name, t, f"(d,) = ({d},)")
    if initial_state is not None and initial_state.shape != (b, d, n):
        fail("state" if step else "initial_state", initial_state, f"(b, d, n) = {(b, d, n)}")
    return b, d, l, n
