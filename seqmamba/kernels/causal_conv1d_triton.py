"""Triton depthwise causal conv1d (forward and backward), :func:`causal_conv1d_ref`'s math.

Scan order: position j is time j, or l-1-j when ``reverse`` (addresses only; nothing is flipped in memory).
With xs the input in scan order and xpad = cat(h0, xs):

    y[j] = act(bias + sum_k w[k] xpad[j + k])          k = 0..w-1, xpad index j+k = scan position j+k-(w-1)

Tiles always cover ascending addresses: at address a, tap k reads address a - (w-1-k) (forward) or
a + (w-1-k) (reverse, an anti-causal filter in address order); addresses outside [0, l) are scan positions
before the first (h0) or past the last (masked). Descending tiles read element by element in a layout Triton
cannot vectorise: the reverse conv took 4.6x the forward's time (H100, b1 d512 l131072 bf16).

Backward, with dpre = dy * act'(pre): dx[p] = sum_k w[k] dpre[p + w-1-k]; dw[k] = sum dpre[j] xpad[j+k];
dbias = sum dpre; dh0 from the first w-1 columns of dpre (torch, tiny). The final state, the last w-1
columns of xpad, is sliced by the caller with ordinary (differentiable) torch ops. Accumulation in fp32;
64-bit offsets; dw/dbias are reduced through per-tile partials (no atomics: deterministic).

Lengths that are not a multiple of 16 (l-contiguous x) run on copies of x (and dy) in rows padded with zeros to
one, as the selective scan does; y and dx are views of such rows (``_row_len``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqmamba.kernels._dispatch import EagerCustomOp, kernel_module

BLOCK_D = 16
BLOCK_T = 256

_common = kernel_module("seqmamba.kernels._triton_common", __name__)


@triton.jit
def _tap(t, k, W: tl.constexpr, REVERSE: tl.constexpr):
    """Address read by tap k of the output at address t."""
    if REVERSE:
        return t + (W - 1 - k)
    else:
        return t - (W - 1 - k)


@triton.jit
def _load_xpad(x_ptr, h0_ptr, x_row, h0_row, a, dmask, seqlen, sx_l,
               W: tl.constexpr, HAS_H0: tl.constexpr, REVERSE: tl.constexpr):
    """xpad at addresses a (BT,) for rows (BD,): x where 0 <= a < l, else h0[w-1+p] at scan position p < 0."""
    inx = (a >= 0) & (a < seqlen)
    v = tl.load(x_ptr + x_row[:, None] + a[None, :] * sx_l, mask=dmask[:, None] & inx[None, :],
                other=0.0).to(tl.float32)
    if HAS_H0:
        if REVERSE:
            p = seqlen - 1 - a
        else:
            p = a
        inh = (p < 0) & (p >= -(W - 1))
        hv = tl.load(h0_ptr + h0_row[:, None] + (W - 1 + p)[None, :], mask=dmask[:, None] & inh[None, :],
                     other=0.0).to(tl.float32)
        v += hv
    return v


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, h0_ptr, y_ptr, sx_b, sx_d, sx_l, dim, seqlen,
                     W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr, SILU: tl.constexpr,
                     REVERSE: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
    pid = tl.program_id(0)
    ndb = tl.cdiv(dim, BD)
    pb = (pid // ndb).to(tl.int64)
    d_off = ((pid % ndb) * BD + tl.arange(0, BD)).to(tl.int64)
    dmask = d_off < dim
    t = tl.program_id(1).to(tl.int64) * BT + tl.arange(0, BT)     # addresses
    x_row = pb * sx_b + d_off * sx_d
    h0_row = (pb * dim + d_off) * (W - 1)
    acc = tl.zeros([BD, BT], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d_off, mask=dmask, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(W):
        wk = tl.load(w_ptr + d_off * W + k, mask=dmask, other=0.0).to(tl.float32)
        acc += wk[:, None] * _load_xpad(x_ptr, h0_ptr, x_row, h0_row, _tap(t, k, W, REVERSE), dmask, seqlen, sx_l,
                                        W, HAS_H0, REVERSE)
    if SILU:
        acc = acc * _common.sigmoid(acc)
    tl.store(y_ptr + (pb * dim + d_off)[:, None] * seqlen + t[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=dmask[:, None] & (t < seqlen)[None, :])


@triton.jit
def _conv_bwd_dpre_kernel(x_ptr, w_ptr, bias_ptr, h0_ptr, dy_ptr, dpre_ptr, dw_ptr, db_ptr,
                          sx_b, sx_d, sx_l, sdy_b, sdy_d, sdy_l, dim, seqlen, n_tb,
                          W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr, SILU: tl.constexpr,
                          REVERSE: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
    """dpre = dy * act'(pre) (fp32, time order) and this tile's partial dw (d, w) and dbias (d)."""
    pid = tl.program_id(0)
    tb = tl.program_id(1)
    ndb = tl.cdiv(dim, BD)
    pb = (pid // ndb).to(tl.int64)
    d_off = ((pid % ndb) * BD + tl.arange(0, BD)).to(tl.int64)
    dmask = d_off < dim
    t = tb.to(tl.int64) * BT + tl.arange(0, BT)                    # addresses
    jmask = dmask[:, None] & (t < seqlen)[None, :]
    x_row = pb * sx_b + d_off * sx_d
    h0_row = (pb * dim + d_off) * (W - 1)
    dy = tl.load(dy_ptr + (pb * sdy_b + d_off * sdy_d)[:, None] + t[None, :] * sdy_l, mask=jmask,
                 other=0.0).to(tl.float32)
    if SILU:
        pre = tl.zeros([BD, BT], dtype=tl.float32)
        if HAS_BIAS:
            pre += tl.load(bias_ptr + d_off, mask=dmask, other=0.0).to(tl.float32)[:, None]
        for k in tl.static_range(W):
            wk = tl.load(w_ptr + d_off * W + k, mask=dmask, other=0.0).to(tl.float32)
            pre += wk[:, None] * _load_xpad(x_ptr, h0_ptr, x_row, h0_row, _tap(t, k, W, REVERSE), dmask, seqlen,
                                            sx_l, W, HAS_H0, REVERSE)
        sg = _common.sigmoid(pre)
        dpre = dy * sg * (1.0 + pre * (1.0 - sg))
    else:
        dpre = dy
    dpre = tl.where(jmask, dpre, 0.0)
    tl.store(dpre_ptr + (pb * dim + d_off)[:, None] * seqlen + t[None, :], dpre, mask=jmask)
    slot = (pb * n_tb + tb) * dim + d_off
    for k in tl.static_range(W):
        xv = _load_xpad(x_ptr, h0_ptr, x_row, h0_row, _tap(t, k, W, REVERSE), dmask, seqlen, sx_l, W, HAS_H0,
                        REVERSE)
        tl.store(dw_ptr + slot * W + k, tl.sum(dpre * xv, axis=1), mask=dmask)
    if HAS_BIAS:
        tl.store(db_ptr + slot, tl.sum(dpre, axis=1), mask=dmask)


@triton.jit
def _conv_bwd_dx_kernel(dpre_ptr, w_ptr, dx_ptr, dim, seqlen,
                        W: tl.constexpr, REVERSE: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
    """dx[p] = sum_k w[k] dpre[p + w-1-k] over output positions inside [0, l) (scan order); in addresses
    dx[a] = sum_k w[k] dpre[a -/+ (w-1-k)] (the taps mirrored: the outputs that read a)."""
    pid = tl.program_id(0)
    ndb = tl.cdiv(dim, BD)
    pb = (pid // ndb).to(tl.int64)
    d_off = ((pid % ndb) * BD + tl.arange(0, BD)).to(tl.int64)
    dmask = d_off < dim
    t = tl.program_id(1).to(tl.int64) * BT + tl.arange(0, BT)      # addresses
    row = (pb * dim + d_off)[:, None] * seqlen
    acc = tl.zeros([BD, BT], dtype=tl.float32)
    for k in tl.static_range(W):
        wk = tl.load(w_ptr + d_off * W + k, mask=dmask, other=0.0).to(tl.float32)
        a = _tap(t, k, W, not REVERSE)                               # the output whose tap k reads t
        acc += wk[:, None] * tl.load(dpre_ptr + row + a[None, :],
                                     mask=dmask[:, None] & ((a >= 0) & (a < seqlen))[None, :], other=0.0)
    tl.store(dx_ptr + row + t[None, :], acc.to(dx_ptr.dtype.element_ty), mask=dmask[:, None] & (t < seqlen)[None, :])


def _grid(b, d, l, bd, bt):
    return (b * triton.cdiv(d, bd), max(triton.cdiv(l, bt), 1))


# The backward pads only from this many elements b * d * l: it copies x and dy first, which costs more than it
# saves at small sizes (H100 bf16 fwd+bwd, unpadded / padded: b8 d1536 l2047 0.658 / 0.719 ms, b4 d1536 l131071
# 16.2 / 10.8, b1 d1536 l1,000,003 30.5 / 21.1); the forward copies x only and gains at every size measured
BWD_PAD_MIN = 1 << 26


def _row_len(x, h0, reverse, min_elements=0) -> int:
    """The row length the kernels run on: l, or ``padded_len(l)`` where l is not a multiple of ROW_ALIGN and x
    is l-contiguous. Rows that start unaligned make every load and store scalar (2.4x slower at b1 d1536 l~1M);
    on padded rows the pad is zeros after the data, which no output inside [0, l) reads differently: causal taps
    look back, and reverse taps past the end read zeros, as past l. Not with an initial state in reverse, which
    sits right after position l - 1 (the unpadded rows are used there)."""
    l = x.shape[-1]
    if x.stride(-1) != 1 or (reverse and h0 is not None) or x.numel() < min_elements:
        return l
    return _common.padded_len(l)


def _out_like(x, h0, reverse, min_elements=0):
    """An empty output like x (b, d, l): rows of ``_row_len`` (a view of them), which the kernels write whole.
    Also the fake implementations' layout."""
    factory = dict(device=x.device, dtype=x.dtype)
    if _row_len(x, h0, reverse, min_elements) == x.shape[-1]:
        return torch.empty(x.shape, **factory)
    return _common.new_rows(x.shape, **factory)


def _conv_fwd(x, weight, bias, h0, silu, reverse):
    b, d, l = x.shape
    w = weight.shape[1]
    L = _row_len(x, h0, reverse)
    y = _out_like(x, h0, reverse)
    x = _common.aligned_rows(x, L) if L != l else x
    _conv_fwd_kernel[_grid(b, d, L, BLOCK_D, BLOCK_T)](
        x, weight, bias if bias is not None else weight, h0 if h0 is not None else weight, y,
        *x.stride(), d, L, W=w, HAS_BIAS=bias is not None, HAS_H0=h0 is not None, SILU=silu,
        REVERSE=reverse, BD=BLOCK_D, BT=BLOCK_T, num_warps=4)
    return y


def _conv_bwd(x, weight, bias, h0, dy, silu, reverse):
    """(dx, dweight, dbias or None, dh0 or None)."""
    b, d, l = x.shape
    w = weight.shape[1]
    L = _row_len(x, h0, reverse, BWD_PAD_MIN)
    dx = _out_like(x, h0, reverse, BWD_PAD_MIN)
    if L != l:  # padded rows (_row_len): dy's pad is zeros, so no pad position adds to dw, dbias or dx
        x, dy = _common.aligned_rows(x, L), _common.aligned_rows(dy, L)
    grid = _grid(b, d, L, BLOCK_D, BLOCK_T)
    n_tb = grid[1]
    f32 = dict(device=x.device, dtype=torch.float32)
    dpre = torch.empty(b, d, L, **f32)
    dwp = torch.empty(b, n_tb, d, w, **f32)
    dbp = torch.empty(b, n_tb, d, **f32) if bias is not None else None
    _conv_bwd_dpre_kernel[grid](
        x, weight, bias if bias is not None else weight, h0 if h0 is not None else weight, dy, dpre, dwp,
        dbp if dbp is not None else dwp, *x.stride(), *dy.stride(), d, L, n_tb, W=w,
        HAS_BIAS=bias is not None, HAS_H0=h0 is not None, SILU=silu, REVERSE=reverse,
        BD=BLOCK_D, BT=BLOCK_T, num_warps=4)
    _conv_bwd_dx_kernel[grid](dpre, weight, dx, d, L, W=w, REVERSE=reverse, BD=BLOCK_D, BT=BLOCK_T, num_warps=4)
    dweight = dwp.sum((0, 1)).to(weight.dtype)
    dbias = dbp.sum((0, 1)).to(bias.dtype) if bias is not None else None
    dh0 = None
    if h0 is not None:
        # h0[i] is scan position i-(w-1): dh0[i] = sum_{k<=i, i-k < l} w[k] dpre[i-k]
        m = min(w - 1, l)
        head = (dpre[..., l - m:].flip(-1) if reverse else dpre[..., :m])  # scan order
        head = torch.nn.functional.pad(head, (0, w - 1 - m))
        wf = weight.float()
        dh0 = torch.zeros(b, d, w - 1, **f32)
        for i in range(w - 1):
            for k in range(i + 1):
                dh0[..., i] += wf[:, k] * head[..., i - k]
        dh0 = dh0.to(h0.dtype)
    return dx, dweight, dbias, dh0


# torch.library registration: torch.compile sees one opaque node with a registered backward.
_OPS = "seqmamba::causal_conv1d" + ("_interp" if __name__.endswith("__interpreted") else "")
_T = torch.Tensor


def _conv_fwd_impl(x: _T, weight: _T, bias: _T | None, h0: _T | None, silu: bool, reverse: bool) -> _T:
    return _conv_fwd(x, weight, bias, h0, silu, reverse)


_conv_fwd_op = torch.library.custom_op(_OPS + "_fwd", _conv_fwd_impl, mutates_args=())


@_conv_fwd_op.register_fake
def _(x, weight, bias, h0, silu, reverse):
    return _out_like(x, h0, reverse)


def _conv_bwd_impl(x: _T, weight: _T, bias: _T | None, h0: _T | None, dy: _T, silu: bool,
                   reverse: bool) -> list[_T]:
    grads = _conv_bwd(x, weight, bias, h0, dy, silu, reverse)
    return [g if g is not None else x.new_empty(0) for g in grads]


_conv_bwd_op = torch.library.custom_op(_OPS + "_bwd", _conv_bwd_impl, mutates_args=())


@_conv_bwd_op.register_fake
def _(x, weight, bias, h0, dy, silu, reverse):
    return [_out_like(x, h0, reverse, BWD_PAD_MIN)] + [
        torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else x.new_empty(0)
        for t in (weight, bias, h0)]


def _conv_setup(ctx, inputs, output):
    x, weight, bias, h0, silu, reverse = inputs
    ctx.save_for_backward(x, weight, bias, h0)
    ctx.silu, ctx.reverse = silu, reverse


def _conv_backward(ctx, dy):
    x, weight, bias, h0 = ctx.saved_tensors
    grads = _conv_bwd_call(x, weight, bias, h0, dy, ctx.silu, ctx.reverse)
    return (*[g if t is not None else None for g, t in zip(grads, (x, weight, bias, h0))], None, None)


_conv_fwd_op.register_autograd(_conv_backward, setup_context=_conv_setup)
_conv_fwd_call = EagerCustomOp(_conv_fwd_op, _conv_fwd_impl, _conv_setup, _conv_backward)
_conv_bwd_call = EagerCustomOp(_conv_bwd_op, _conv_bwd_impl)


def causal_conv1d_triton(x, weight, bias=None, initial_state=None, return_final_state=False, activation=None,
                         reverse=False):
    """Triton :func:`causal_conv1d_ref` (same signature; inputs validated by the caller, weight (d, w))."""
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    b, d, l = x.shape
    w = weight.shape[1]
    h0 = initial_state.contiguous() if (initial_state is not None and w > 1) else None
    y = _conv_fwd_call(x, weight.contiguous(), bias, h0, activation in ("silu", "swish"), bool(reverse))
    if not return_final_state:
        return y
    # the last w-1 columns of cat(h0, x in scan order), in fp32, through autograd
    tail = x[..., :w - 1].flip(-1) if reverse else x[..., max(l - (w - 1), 0):]
    head = initial_state if initial_state is not None else x.new_zeros(b, d, w - 1)
    ht = torch.cat([head.float(), tail.float()], dim=-1)[..., -(w - 1):] if w > 1 else x.new_zeros(b, d, 0,
                                                                                                    dtype=torch.float32)
    return y, ht
