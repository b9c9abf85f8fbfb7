"""One elementwise kernel over the jit math of ``seqmamba.kernels._triton_common``, for test_triton_math.py
(a module of its own so that tests.kernels.interpret can load it interpreted, with its callees)."""
import triton
import triton.language as tl

from seqmamba.kernels._dispatch import kernel_module

_common = kernel_module("seqmamba.kernels._triton_common", __name__)


@triton.jit
def _kernel(x_ptr, y_ptr, n, FN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if FN == "softplus":
        y = _common.softplus(x)
    else:
        y = _common.sigmoid(x)
    tl.store(y_ptr + offs, y, mask=mask)


def apply(fn: str, x):
    """``fn`` ("softplus" or "sigmoid") of a contiguous fp32 tensor, elementwise."""
    y = x.new_empty(x.shape)
    block = 1024
    _kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), FN=fn, BLOCK=block)
    return y
