"""A kernel over blocked_fwd's B/C addressing, for test_scan_blocked_fwd.py (a module of its own so that
tests.kernels.interpret can load it interpreted, with its callees)."""
import torch
import triton
import triton.language as tl

from seqmamba.kernels._dispatch import kernel_module

_bf = kernel_module("seqmamba.kernels.selective_scan.blocked_fwd", __name__)


@triton.jit
def _bc_offsets_kernel(w_ptr, m_ptr, k, n_chunks, seqlen, T: tl.constexpr, NT: tl.constexpr, V: tl.constexpr,
                       REVERSE: tl.constexpr, PAIRS: tl.constexpr, FULL: tl.constexpr):
    w, m = _bf._bc_offsets(k, n_chunks, seqlen, T, NT, V, REVERSE, PAIRS, FULL)
    W: tl.constexpr = T // 2 if PAIRS else T
    ar = tl.arange(0, W)
    tl.store(w_ptr + ar, w)
    tl.store(m_ptr + ar, m.to(tl.int32))


def bc_offsets(k: int, n_chunks: int, seqlen: int, T: int, NT: int, V: int, reverse: bool, pairs: bool,
               full: bool):
    """(offsets, mask) that the forward's B/C loads of scan-order chunk k use, as int64 / bool CPU tensors."""
    W = T // 2 if pairs else T
    w, m = torch.empty(W, dtype=torch.int64), torch.empty(W, dtype=torch.int32)
    _bc_offsets_kernel[(1,)](w, m, k, n_chunks, seqlen, T=T, NT=NT, V=V, REVERSE=reverse, PAIRS=pairs, FULL=full)
    return w, m.bool()
