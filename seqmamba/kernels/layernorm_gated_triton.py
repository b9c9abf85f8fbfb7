"""Triton gated RMSNorm (the Mamba-2 output norm), forward and backward, one pass over the rows each.

Same math as :func:`seqmamba.kernels.layernorm_gated.rms_norm_gated_ref`, per row and group of G channels:

    norm_before_gate=False:  v = x * silu(z)    y = v * rstd * w              rstd = 1 / sqrt(mean(v^2) + eps)
    norm_before_gate=True:   v = x              y = v * rstd * w * silu(z)

Backward, with n = v * rstd and dn = dL/dn (dy * w, times silu(z) with norm_before_gate):

    dv = rstd * (dn - n * mean(dn * n))       dx = dv, times silu(z) without norm_before_gate
    dz = dv * x * silu'(z), or dy * w * n * silu'(z) with norm_before_gate
    dw = sum over rows of dy * n, times silu(z) with norm_before_gate

Rows are the flattened leading dims of (..., d); x, z and dy may have any row stride (z is usually a slice of
the in_proj output) but unit stride along d. The reference runs this as about ten fp32 elementwise passes and
keeps fp32 intermediates for autograd; here the forward reads x and z once, writes y and one fp32 rstd per
(row, group), and the backward recomputes v and n from x and z. Math is fp32; dw is summed per program and the
partials by torch in a fixed order (deterministic). All offsets are 64-bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqmamba.kernels._dispatch import EagerCustomOp, kernel_module

# rows per program: the forward holds BLOCK_M rows of a group; the backward spreads the rows over at most
# BWD_PROGRAMS programs per group, each walking its share in blocks of BLOCK_M and keeping one dw partial
BLOCK_M = 4
BWD_PROGRAMS = 1024

_common = kernel_module("seqmamba.kernels._triton_common", __name__)


@triton.jit
def _rows(ptr, rows, stride, cols, mask):
    return tl.load(ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _fwd_kernel(x_ptr, z_ptr, w_ptr, y_ptr, rstd_ptr, sx, sz, M, D, G, NG, eps,
                HAS_Z: tl.constexpr, BEFORE: tl.constexpr, BM: tl.constexpr, BG: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    grp = tl.program_id(1)
    k = tl.arange(0, BG)
    cols = grp * G + k
    rm = rows < M
    m = rm[:, None] & (k < G)[None, :]
    v = _rows(x_ptr, rows, sx, cols, m)
    if HAS_Z:
        z = _rows(z_ptr, rows, sz, cols, m)
        gate = z * _common.sigmoid(z)
        if not BEFORE:
            v = v * gate
    rstd = 1.0 / tl.sqrt_rn(tl.sum(v * v, 1) / G + eps)
    y = v * rstd[:, None] * tl.load(w_ptr + cols, mask=k < G, other=0.0).to(tl.float32)[None, :]
    if HAS_Z:
        if BEFORE:
            y = y * gate
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(rstd_ptr + rows.to(tl.int64) * NG + grp, rstd, mask=rm)


@triton.jit
def _bwd_kernel(x_ptr, z_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dz_ptr, dwp_ptr, sx, sz, sdy, M, D, G, NG, rows_per,
                HAS_Z: tl.constexpr, BEFORE: tl.constexpr, BM: tl.constexpr, BG: tl.constexpr):
    """Rows [pid * rows_per, + rows_per) of group program_id(1); dw partial to row pid of dwp (programs, D)."""
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    k = tl.arange(0, BG)
    cols = grp * G + k
    cm = k < G
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros([BG], dtype=tl.float32)
    for start in range(pid * rows_per, tl.minimum(pid * rows_per + rows_per, M), BM):
        rows = start + tl.arange(0, BM)
        rm = rows < M
        m = rm[:, None] & cm[None, :]
        x = _rows(x_ptr, rows, sx, cols, m)
        dy = _rows(dy_ptr, rows, sdy, cols, m)
        rstd = tl.load(rstd_ptr + rows.to(tl.int64) * NG + grp, mask=rm, other=0.0)[:, None]
        if HAS_Z:
            z = _rows(z_ptr, rows, sz, cols, m)
            sg = _common.sigmoid(z)
            gate = z * sg
            dgate = sg * (1.0 + z * (1.0 - sg))                  # silu'(z)
            if BEFORE:
                n = x * rstd
                dn = dy * w * gate
                dw += tl.sum(dy * n * gate, 0)
            else:
                n = x * gate * rstd
                dn = dy * w
                dw += tl.sum(dy * n, 0)
        else:
            n = x * rstd
            dn = dy * w
            dw += tl.sum(dy * n, 0)
        dv = rstd * (dn - n * (tl.sum(dn * n, 1) / G)[:, None])
        out = rows.to(tl.int64)[:, None] * D + cols[None, :]
        if HAS_Z:
            if BEFORE:
                tl.store(dx_ptr + out, dv.to(dx_ptr.dtype.element_ty), mask=m)
                tl.store(dz_ptr + out, (dy * w * n * dgate).to(dz_ptr.dtype.element_ty), mask=m)
            else:
                tl.store(dx_ptr + out, (dv * gate).to(dx_ptr.dtype.element_ty), mask=m)
                tl.store(dz_ptr + out, (dv * x * dgate).to(dz_ptr.dtype.element_ty), mask=m)
        else:
            tl.store(dx_ptr + out, dv.to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(dwp_ptr + pid.to(tl.int64) * D + cols, dw, mask=cm)


def _warps(BG: int) -> int:
    return min(max(BG // 256, 1), 8)


def _fwd(x, weight, z, eps, group_size, before):
    """x, z (M, d) with unit column stride; -> (y (M, d) in x's dtype, rstd (M, d / group_size) fp32)."""
    M, d = x.shape
    ng = d // group_size
    BG = triton.next_power_of_2(group_size)
    y = torch.empty(M, d, device=x.device, dtype=x.dtype)
    rstd = torch.empty(M, ng, device=x.device, dtype=torch.float32)
    if M > 0:
        _fwd_kernel[(triton.cdiv(M, BLOCK_M), ng)](
            x, z if z is not None else x, weight, y, rstd, x.stride(0), z.stride(0) if z is not None else 0,
            M, d, group_size, ng, eps, HAS_Z=z is not None, BEFORE=before, BM=BLOCK_M, BG=BG,
            num_warps=_warps(BG))
    return y, rstd


def _bwd(x, weight, z, rstd, dy, group_size, before):
    """(dx, dweight, dz or None) for _fwd's inputs and its rstd."""
    M, d = x.shape
    ng = d // group_size
    BG = triton.next_power_of_2(group_size)
    programs = max(min(BWD_PROGRAMS, triton.cdiv(M, BLOCK_M)), 1)
    rows_per = triton.cdiv(triton.cdiv(M, programs), BLOCK_M) * BLOCK_M
    programs = max(triton.cdiv(M, rows_per), 1)
    dx = torch.empty(M, d, device=x.device, dtype=x.dtype)
    dz = torch.empty(M, d, device=x.device, dtype=z.dtype) if z is not None else None
    dwp = torch.zeros(programs, d, device=x.device, dtype=torch.float32)
    if M > 0:
        _bwd_kernel[(programs, ng)](
            x, z if z is not None else x, weight, dy, rstd, dx, dz if dz is not None else dx, dwp,
            x.stride(0), z.stride(0) if z is not None else 0, dy.stride(0), M, d, group_size, ng, rows_per,
            HAS_Z=z is not None, BEFORE=before, BM=BLOCK_M, BG=BG, num_warps=_warps(BG))
    return dx, dwp.sum(0).to(weight.dtype), dz


# torch.library registration: torch.compile sees one opaque node with a registered backward.
_OPS = "seqmamba::rms_norm_gated" + ("_interp" if __name__.endswith("__interpreted") else "")
_T = torch.Tensor


def _norm_fwd_impl(x: _T, weight: _T, z: _T | None, eps: float, group_size: int, before: bool) -> list[_T]:
    return list(_fwd(x, weight, z, eps, group_size, before))


_norm_fwd_op = torch.library.custom_op(_OPS + "_fwd", _norm_fwd_impl, mutates_args=())


@_norm_fwd_op.register_fake
def _(x, weight, z, eps, group_size, before):
    return [x.new_empty(x.shape), x.new_empty(x.shape[0], x.shape[1] // group_size, dtype=torch.float32)]


def _norm_bwd_impl(x: _T, weight: _T, z: _T | None, rstd: _T, dy: _T, group_size: int, before: bool) -> list[_T]:
    dx, dw, dz = _bwd(x, weight, z, rstd, dy, group_size, before)
    return [dx, dw, dz if dz is not None else x.new_empty(0)]


_norm_bwd_op = torch.library.custom_op(_OPS + "_bwd", _norm_bwd_impl, mutates_args=())


@_norm_bwd_op.register_fake
def _(x, weight, z, rstd, dy, group_size, before):
    return [x.new_empty(x.shape), weight.new_empty(weight.shape),
            z.new_empty(z.shape) if z is not None else x.new_empty(0)]


def _norm_setup(ctx, inputs, output):
    x, weight, z, eps, group_size, before = inputs
    ctx.save_for_backward(x, weight, z, output[1])
    ctx.group_size, ctx.before = group_size, before


def _norm_backward(ctx, grads):
    x, weight, z, rstd = ctx.saved_tensors
    dx, dw, dz = _norm_bwd_call(x, weight, z, rstd, _rows2d(grads[0]), ctx.group_size, ctx.before)
    return dx, dw, (dz if z is not None else None), None, None, None


_norm_fwd_op.register_autograd(_norm_backward, setup_context=_norm_setup)
_norm_fwd_call = EagerCustomOp(_norm_fwd_op, _norm_fwd_impl, _norm_setup, _norm_backward, returns_list=True)
_norm_bwd_call = EagerCustomOp(_norm_bwd_op, _norm_bwd_impl)


def _rows2d(t):
    """(..., d) -> (M, d) with unit column stride (a view where possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def rms_norm_gated_triton(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=False):
    """Triton :func:`rms_norm_gated_ref` (same signature; inputs validated by the caller, fp32/bf16/fp16)."""
    d = x.shape[-1]
    y, _ = _norm_fwd_call(_rows2d(x), weight.contiguous(), _rows2d(z) if z is not None else None, float(eps),
                          int(group_size or d), bool(norm_before_gate))
    return y.reshape(x.shape)
