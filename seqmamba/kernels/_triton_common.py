"""What the Triton kernel files share: the jit math they all call and two launch helpers.

Kernel files bind it through :func:`seqmamba.kernels._dispatch.kernel_module`, never with a plain import: the
tests run each kernel file again under the Triton interpreter, and its jit callees must then be interpreted
copies too.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def softplus(x):
    # log1p(exp(x)) with Kahan's trick (log(w) * e / (w - 1)), exact to fp32 rounding for x << 0; x above 20.
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    lp = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    return tl.where(x > 20.0, x, lp)


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
