"""What the Triton kernel files share: the jit math they all call and two launch helpers.

Kernel files bind it through :func:`seqmamba.kernels._dispatch.kernel_module`, never with a plain import: the
tests run each kernel file again under the Triton interpreter, and its jit callees must then be interpreted
copies too.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqmamba.kernels._dispatch import ROW_ALIGN


@triton.jit
def softplus(x):
    """log(1 + exp(x)) in fp32 from two MUFU ops and FMA-pipe arithmetic (sm_90: 17 SASS instructions an element,
    against 43 for libdevice's log and an IEEE division; relative error under 1e-6 * max(1, |x|) on the GPU, the
    growth of any fp32 exp of the rounded x log2(e): tests/kernels/test_triton_math.py).

    softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1]. Above sqrt(2) - 1, 1 + e is halved first
    (log1p(e) = ln 2 + log1p(f), f = (e - 1) / 2), so f is in [-0.293, 0.415]; then log1p(f) = 2 atanh(s) with
    s = f / (2 + f), |s| <= 0.172, summed as its odd series to s^7 (the next term is under 1e-7 of the sum).
    The quotient is f * rsqrt(2 + f)^2: no division and its range fix-ups. Nothing cancels: for x << 0 the
    result is e's own series, accurate relative to itself."""
    e = tl.exp2(tl.abs(x) * -1.4426950408889634)
    halve = e > 0.41421356237309503
    f = tl.where(halve, e * 0.5 - 0.5, e)
    r = tl.rsqrt(f + 2.0)
    s = f * r * r
    s2 = s * s
    q = s2 * (2.0 / 7.0) + 2.0 / 5.0
    q = q * s2 + 2.0 / 3.0
    q = q * s2 + 2.0
    return tl.maximum(x, 0.0) + (s * q + tl.where(halve, 0.6931471805599453, 0.0))


@triton.jit
def sigmoid(x):
    """1 / (1 + exp(-x)) as rsqrt(1 + exp(-x))^2: two MUFU ops and no division fix-ups (sm_90: 5 SASS
    instructions an element, 12 for ``tl.sigmoid``); 0 for x below about -88 (exp overflows: rsqrt(inf) = 0)."""
    r = tl.rsqrt(1.0 + tl.exp2(x * -1.4426950408889634))
    return r * r


@triton.jit
def affine_combine(a1, b1, a2, b2):
    # x -> a1 x + b1, then x -> a2 x + b2: the scan of h_t = a_t h_{t-1} + b_t. For a reverse scan Triton passes
    # the element nearer the scan's start (the right) first, so the same function composes in scan order.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def delta_to_dt(dl, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(BD, T) raw delta (fp32) -> (dl = delta + bias, dt = softplus(dl) or dl); dt is 0 where masked (an
    identity step: decay 1, input 0)."""
    if HAS_BIAS:
        dl += bias[:, None]
    if SOFTPLUS:
        dt = softplus(dl)
    else:
        dt = dl
    return dl, tl.where(mask, dt, 0.0)


@triton.jit
def continues_sequence(seq_ptr, row, t, tp, ok, ss_l):
    """True where position t continues the sequence of its scan predecessor tp (always where not ok)."""
    s_t = tl.load(seq_ptr + row + t * ss_l, mask=ok, other=0)
    s_p = tl.load(seq_ptr + row + tp * ss_l, mask=ok, other=0)
    return s_t == s_p


@triton.jit
def neg_zeros(shape: tl.constexpr):
    """-0.0 everywhere: x + (-0.0) folds to x at compile time, x + 0.0 does not (tl.full turns -0.0 into +0.0,
    hence the bit pattern). The identity of a sum that should cost nothing."""
    return tl.full(shape, -2147483648, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def pick(x, sel, axis: tl.constexpr):
    """The element of ``x`` where ``sel`` holds along ``axis`` (one per slice), for an axis within each thread's
    registers: a sum with -0.0 elsewhere, which folds to a register pick (a max with -inf leaves an FMNMX)."""
    return tl.sum(tl.where(sel, x, neg_zeros(x.shape)), axis)


@triton.jit
def prefetch_l2(ptrs):
    """Asks L2 for the lines holding ``ptrs`` (one prefetch per element; no registers wait for the data): a
    later load of them then costs an L2 hit instead of a DRAM round trip. Returns a dummy int32 tensor (the
    asm needs an output); the asm is marked impure, so it is kept."""
    return tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                     is_pure=False, pack=1)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (an H100's 132 off the GPU: the interpreted kernels of the tests)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def warps_per_sm(regs_per_thread: int) -> int:
    """Warps whose threads' registers an SM's 64K-register file holds (one-warp programs an SM)."""
    return 65536 // (32 * regs_per_thread)


def pow2_divisor(x: int, cap: int) -> int:
    """Largest power of two dividing x, at most cap (a channel block that tiles a group exactly)."""
    p = 1
    while p * 2 <= cap and x % (p * 2) == 0:
        p *= 2
    return p


def unit_l(t: torch.Tensor | None) -> torch.Tensor | None:
    """t with unit stride along its last (length) dim, a copy only when it has not: a program reading one
    channel's positions from channel-last storage would touch one sector per element."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def padded_len(l: int) -> int:
    """The row length of aligned storage for l positions: l rounded up to a multiple of ROW_ALIGN (see
    ``_dispatch.ROW_ALIGN``)."""
    return -(-l // ROW_ALIGN) * ROW_ALIGN


def aligned_rows(t: torch.Tensor | None, lp: int) -> torch.Tensor | None:
    """t (..., l) in storage of rows ``lp`` >= l long: t itself (l-contiguous) when lp == l, else a copy whose
    positions [l, lp) are zeros, returned whole, (..., lp)."""
    if t is None or t.shape[-1] == lp:
        return unit_l(t)
    l = t.shape[-1]
    out = t.new_empty(*t.shape[:-1], lp)
    if t.dim() == 3 and t.stride(-1) == 1 and t.numel() > 0:
        rows = t.shape[0] * t.shape[1]
        _pad_rows_kernel[(rows * triton.cdiv(lp, PAD_BLOCK),)](t, out, t.shape[1], t.stride(0), t.stride(1), l, lp,
                                                               BLOCK=PAD_BLOCK)
    else:
        out[..., l:].zero_()
        out[..., :l].copy_(t)
    return out


# positions a program of _pad_rows_kernel copies
PAD_BLOCK = 4096


@triton.jit
def _pad_rows_kernel(src_ptr, dst_ptr, m, s_b, s_m, l, lp, BLOCK: tl.constexpr):
    """dst (b, m, lp) contiguous <- src (b, m, l) with unit l-stride, zeros past l. torch's copy into the strided
    view dst[..., :l] runs its general (index-computing) loop; here the stores are whole aligned vectors and only
    the source loads are scalar."""
    n_blk = tl.cdiv(lp, BLOCK)
    pid = tl.program_id(0)
    row = (pid // n_blk).to(tl.int64)
    c = (pid % n_blk) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(src_ptr + (row // m) * s_b + (row % m) * s_m + c, mask=c < l, other=0)
    tl.store(dst_ptr + row * lp + c, x, mask=c < lp)


def new_rows(shape, **factory) -> torch.Tensor:
    """An empty output of ``shape`` (..., l): a view of rows ``padded_len(l)`` long (contiguous when l is a
    multiple of ROW_ALIGN), which a kernel may write whole. Also the fake implementations' layout."""
    l = shape[-1]
    return torch.empty(*shape[:-1], padded_len(l), **factory)[..., :l]
