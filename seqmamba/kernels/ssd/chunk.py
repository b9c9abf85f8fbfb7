"""Triton SSD (Mamba-2) scan, chunked over the length, forward and backward.

Same math as :func:`seqmamba.kernels.ssd.ref.ssd_scan_ref`. Positions are addressed in scan order j; the
storage index is t = j, or l-1-j when ``reverse`` (nothing is flipped in memory). The scan-ordered length is
cut into chunks of ``Q`` positions (the last one padded with identity steps: dt = 0, x = B = C = 0), each
chunk into blocks of ``BLK`` positions for the matrix products. With cs the cumulative sum of dA = dt A inside
a chunk, for positions s <= t of one chunk:

    y[t]  = sum_s exp(cs[t] - cs[s]) (C[t].B[s]) dt[s] x[s]  +  exp(cs[t]) H_in C[t]  +  D x[t]
    H_out = exp(cs[Q-1]) H_in  +  sum_s exp(cs[Q-1] - cs[s]) dt[s] x[s] B[s]^T

Every exponent is a difference of cumulative sums taken where it is <= 0 (clamped at 0 against rounding), so
nothing positive is exponentiated. ``seq_idx`` zeroes every term that crosses a change of sequence.

Forward: ``_dt_kernel`` (dt' = softplus(dt + bias) and cs, (b h, l) fp32, scan order) ->
``_chunk_state_kernel`` (each chunk's local end state, fp32, a tl.dot) -> ``_state_pass_kernel`` (sequential
over chunks, carried in fp32: the state entering every chunk, stored in bf16 for bf16 inputs, and the final
state) -> ``_chunk_out_pair_kernel`` (y; two heads a program, ``_chunk_out_kernel`` one). At long lengths the
length is cut into runs of chunks instead: ``_chunk_state_run_kernel`` (each run carried from zero to its end
state) -> ``_run_pass_kernel`` (sequential over runs, fp32: the state entering each run) ->
``_run_out_kernel`` (each run walked again block by block from its entering state, the state carried in
registers: y, and the states entering the chunks where the backward needs them).

Backward, with g = dy silu(z) and G_out[c] = dL/dH_out[c]:
  ``_bwd_gloc_kernel`` (g, and each chunk's local dL/dH_in, fp32) -> ``_bwd_state_pass_kernel`` (right to
  left: G_out per chunk, stored like the states, dinitial_state, and exp(cs[Q-1]) <G_out, H_in> per chunk) ->
  ``_bwd_dx_dB_kernel`` (per block of s: dx, dz, dB summed over the heads of a group, dD, and per-position
  scalars) -> ``_bwd_dC_kernel`` (per block of t: dC, and the pair sums of dA) -> ``_bwd_ddt_kernel`` (ddt, dA,
  ddt_bias).
The gradient in da[k] (a = dt A) is summed from terms that each belong to k, never as a difference of large
sums (which cancels to noise in bf16): the pairs s < k <= t of R[t,s] = P[t,s] (C[t].B[s]) dt[s] (g[t].x[s]),
the incoming state's terms at t >= k, the outgoing state's terms at s < k, and the chunk decay's term.
The backward recomputes from the inputs, y before the gate (saved only when z is given) and the chunk-entry
states;
nothing of size (b, l, h, p, n) is stored. No atomics: per-program partials are summed by torch in a fixed
order, so the backward is deterministic. Accumulation is fp32; tl.dot operands are bf16/fp16 for such inputs,
fp32 for fp32 inputs (3xTF32 products, or TF32 where torch allows it). All offsets are 64-bit (positions
themselves are 32-bit: l < 2^31).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from seqmamba.kernels._dispatch import EagerCustomOp, kernel_module
from seqmamba.kernels.ssd.ref import ssd_scan_ref

_common = kernel_module("seqmamba.kernels._triton_common", __name__)
_softplus, _sigmoid, _prefetch_l2 = _common.softplus, _common.sigmoid, _common.prefetch_l2

# Defaults: chunk length (mamba_ssm's), block of positions, warps. Swept on an H100 (benchmarks/kernels_ssd.py
# --sweep, b1 l2^20 24x64 n128, 2026-11-23): chunk 128, block 128 + 8 warps (forward), 8 warps or block 32
# (backward) were all slower; splitting each backward pair kernel in two launches (fewer spills) was no faster.
CHUNK = 256
BLOCK = 64
# fp32 operands (any of x, B, C fp32): products in 3xTF32 (FP32_PREC; each operand split into a TF32 part and
# a TF32 remainder, three tensor-core products), as accurate as IEEE fp32 (b1 l4096 8x64 n64 against float64:
# y 6.0e-6 vs 6.1e-6, gradients alike), or in one TF32 product where torch allows TF32 for fp32 matmuls (1.7e-3).
# H100, same runs, fp32 b1 l2^20 24x64 n128, forward / fwd+bwd ms (bf16: 11.7 / 64.2):
#   IEEE   block 32: 179 / 1061; block 16: 223 / 1265; block 64 (b2 l8192: 39.6 / 192 against 2.95 / 20.8 at
#          block 32: the (64, 64) fp32 products spill 6.6-24 KB a thread, each kernel compiles in 17-32 s)
#   3xTF32 block 64: 94.6 / 874; block 32: 105 / 5415 (a backward kernel collapses)
#   TF32   block 64: 43.6 / 273; block 32: 37.6 / 260
FP32_PREC = "tf32x3"  # or "ieee"
BLOCK_FP32 = {"ieee": 32, "tf32x3": 64, "tf32": 32}
WARPS = 4
BLOCK_BWD = 0  # 0: the forward's (the backward recomputes per block, so its block may differ)
WARPS_BWD = 0  # 0: the forward's
STAGES = 3  # H100, b1 l2^20: forward 15.8 ms at 3 stages, 16.2 at 2
STAGES_BWD = 2  # 0: STAGES (the backward at 3 stages was slower: fwd+bwd +2.2 ms at b1 l2^20)
STATE_BLOCK = 512  # elements of the (p, n) state per program of the state passes
DT_HEADS = 8  # heads per program of the kernels over dt (the forward's dt', cs; the backward's ddt)
TARGET_PROGRAMS = 1024  # the backward splits the heads of a group among programs until this many run
# Off-diagonal decay tiles of the one-head output kernel and of dx/dB as outer products of two exp vectors
# (SEQMAMBA_SSD_FACTOR=0: every pair's own exp). The dC kernel always scales its product's rows and columns.
FACTOR = os.environ.get("SEQMAMBA_SSD_FACTOR", "1") != "0"
# States entering the chunks (kept for the backward) and the backward's G_out stored in bf16 when the tl.dot
# operands are bf16 (the kernels round them to bf16 before every product anyway); carried in fp32
# (SEQMAMBA_SSD_STATE_HALF=0: fp32 storage)
STATE_HALF = os.environ.get("SEQMAMBA_SSD_STATE_HALF", "1") != "0"
# Programs ordered heads first (1-d grids): consecutive programs are the heads (or groups) of one chunk or block,
# so they read neighbouring bytes of the (b, l, h, p) rows and the same B/C tiles (H100, b1 l2^20: forward 20.0
# -> 16.2 ms; SEQMAMBA_SSD_HEADS_FIRST=0: the chunks of one head first)
HEADS_FIRST = os.environ.get("SEQMAMBA_SSD_HEADS_FIRST", "1") != "0"
# Heads per program of the forward's output kernel: 2 (``_chunk_out_pair_kernel``) where the groups have an even
# number of heads, C B^T and the C, B tiles then serving both; 1: one head a program (``_chunk_out_kernel``).
# H100, same run, b1 l2^20 24x64 n128 forward: 1 head 15.9 ms; 2 heads in one (BLK, 2 BP) tile 13.5 (4 warps, 2
# stages), 17.8 (3 stages), 21.1 (8 warps); 4 heads (8 warps, spilling) 19.9. Two heads with an accumulator each
# (x tiles unscaled, straight into the products; session 16): 12.62 -> 12.05 ms (1 stage 11.99, 3 stages 15.83);
# b8 l2048 0.221 -> 0.214; b1 l65536 0.806 -> 0.767.
OUT_HEADS = 2
OUT_WARPS = 4
OUT_STAGES = 2
# L2 prefetches of the diagonal block's B and x rows at the start of each pair output program (inline PTX; not in
# interpreted runs). H100 same run, b1 l2^20 forward: 10.57-10.61 -> 10.46 ms; b1 l65536 0.760 -> 0.750. Prefetching
# also what the program a wave later reads (its C rows and states) was slower: 11.1-11.5 ms.
OUT_PREFETCH = True
# Chunks read per load by the forward's and the backward's passes over chunk states (1: one at a time).
# H100 same run, forward b1 l2^20 24x64 n128: 13.54 ms at 1, 12.52 at 4, 12.55 at 8, 12.67 at 16; b8 l2048:
# 0.285, 0.222, 0.224, 0.312 ms. With the backward's pass grouped too, fwd+bwd at 1M: 68.3 at 1, 66.2 at 4,
# 66.6 at 8
STATE_UNROLL = 4
# At long lengths the forward cuts the length into runs of chunks: ``_chunk_state_run_kernel`` carries each run
# from a zero state to its end state, a pass over the runs gives the state entering each run, and
# ``_run_out_kernel`` walks each run again, block by block, from that state (no chunk state written or read, no
# block before the diagonal recomputed). Runs are the longest of STATE_RUN, STATE_RUN / 2, ... RUN_OUT_SHORTEST
# chunks that give RUN_OUT_MIN_PROGRAMS programs, else (and with RUN_OUT off) the chunk path. H100, same runs,
# bf16 24x64 n128, forward ms, the chunk path or session 18's runs (chunk states fixed in place, then the pair
# output kernel) -> run-out (runs of):
#   b1 l2^20 10.53 -> 8.15-8.30 (32; 16: 8.22; fwd+bwd 56.6 -> 55.6); b1 l262144 2.90 -> 2.05 (32; 16: 2.11);
#   b1 l65536 0.750 -> 0.563 (8; 4: 0.607, 16: 0.666); b2 l32768 0.747 -> 0.559 (8; 16: 0.660);
#   b4 l16384 0.755 -> 0.558 (8); b8 l2048 0.211 (chunk path) against 0.267 in runs of 4.
#   Its own launch at 1M: 1 stage (2: 8.88 ms, 3: 19.3), 4 warps (8: 13.0-14.9 ms), the forward's block of 64
#   (RUN_OUT_BLOCK 32 on 4 / 2 warps: 10.4 / 10.7 ms; 128 on 8 / 4 warps: 12.8 / 28.0).
# fp32 products run it in blocks of RUN_OUT_BLOCK_FP32 (at most the forward's block). H100, same runs, fp32 inputs,
# forward ms, b1 l65536 / l262144: 3xTF32, the chunk path (or fix) 5.98-6.08 / 23.7-23.8, run-out in blocks of 64
# 6.84 / 27.0 (the fp32 state and tiles spill), of 32 8.96 / 36.7, of 16 5.40 / 21.2; single TF32 (torch's
# switch), b1 l65536 / l2^20: chunk path / fix 2.39 / 36.1-36.3, blocks of 32 2.31 / 35.1, of 16 2.22 / 33.8.
STATE_RUN = 32
RUN_OUT = True
RUN_OUT_SHORTEST = 8
RUN_OUT_MIN_PROGRAMS = 768
RUN_OUT_WARPS = 4
RUN_OUT_STAGES = 1
RUN_OUT_BLOCK = 0  # 0: the forward's block (RUN_OUT_BLOCK_FP32 for fp32 products)
RUN_OUT_BLOCK_FP32 = 16


@triton.jit
def _mm(a, b, acc=None, PREC: tl.constexpr = "ieee", UP: tl.constexpr = False):
    """tl.dot(a, b, acc); UP (the interpreter) multiplies the (already rounded) operands in fp32."""
    if UP:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _pos(j, seqlen, REVERSE: tl.constexpr):
    """Storage index of scan position j."""
    if REVERSE:
        return seqlen - 1 - j
    else:
        return j


@triton.jit
def _seq_at(seq_ptr, row, j, seqlen, ss_l, REVERSE: tl.constexpr):
    """seq_idx at scan position j, clamped into [0, l): padding positions belong to the last sequence."""
    jc = tl.minimum(tl.maximum(j, 0), seqlen - 1)
    return tl.load(seq_ptr + row + _pos(jc, seqlen, REVERSE) * ss_l)


@triton.jit
def _load_rows(ptr, base, t, s_l, cols, s_c, valid, ncols):
    """(BLK, BCOLS) tile in the tensor's dtype: rows at storage positions t, columns cols < ncols; zeros
    where masked."""
    m = valid[:, None] & (cols < ncols)[None, :]
    return tl.load(ptr + base + t[:, None] * s_l + cols[None, :] * s_c, mask=m, other=0.0)


@triton.jit
def _decay(cs_ptr, ref, cst, css, off, FACTOR: tl.constexpr):
    """(t, s) tile exp(min(cs[t] - cs[s], 0)). Where ``off`` (every s of the tile before every t), and FACTOR,
    as the outer product exp(cs[t] - cs[ref]) exp(cs[ref] - cs[s]) through the position ref (s <= ref <= t):
    2 BLK exps instead of BLK^2, both factors <= 1 (nothing positive is exponentiated)."""
    if FACTOR:
        if off:
            cr = tl.load(cs_ptr + ref)
            d = tl.exp(tl.minimum(cst - cr, 0.0))[:, None] * tl.exp(tl.minimum(cr - css, 0.0))[None, :]
        else:
            d = tl.exp(tl.minimum(cst[:, None] - css[None, :], 0.0))
    else:
        d = tl.exp(tl.minimum(cst[:, None] - css[None, :], 0.0))
    return d


@triton.jit
def _dt_kernel(dt_ptr, A_ptr, bias_ptr, dtp_ptr, cs_ptr, sdt_b, sdt_l, sdt_h, nheads, seqlen, Lp,
               HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, Q: tl.constexpr,
               BH: tl.constexpr):
    """dt' (0 past the end) and its A-weighted cumulative sum inside each chunk, (b h, Lp) in scan order. One
    program per (chunk, batch, block of BH heads): a position's heads sit side by side in dt."""
    c = tl.program_id(0)
    bb = tl.program_id(1).to(tl.int64)
    hh = tl.program_id(2) * BH + tl.arange(0, BH)
    hm = hh < nheads
    j = c.to(tl.int64) * Q + tl.arange(0, Q)
    valid = j < seqlen
    t = _pos(j, seqlen, REVERSE)
    m = valid[:, None] & hm[None, :]
    raw = tl.load(dt_ptr + bb * sdt_b + t[:, None] * sdt_l + hh[None, :] * sdt_h, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + hh, mask=hm, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        d = _softplus(raw)
    else:
        d = raw
    d = tl.where(m, d, 0.0)
    cs = tl.cumsum(d * tl.load(A_ptr + hh, mask=hm, other=0.0).to(tl.float32)[None, :], axis=0)
    off = (bb * nheads + hh)[None, :] * Lp + j[:, None]
    tl.store(dtp_ptr + off, d, mask=hm[None, :])
    tl.store(cs_ptr + off, cs, mask=hm[None, :])


@triton.jit
def _grid_ids(n_bh, HEADS_FIRST: tl.constexpr):
    """(chunk or block index, batch * heads index) of this program: from a 1-d grid whose consecutive programs
    are the n_bh (batch, head) pairs of one chunk or block (HEADS_FIRST), or from the 2-d grid (chunks, b h)."""
    if HEADS_FIRST:
        pc = tl.program_id(0) // n_bh
        pid = tl.program_id(0) % n_bh
    else:
        pc = tl.program_id(0)
        pid = tl.program_id(1)
    return pc, pid


@triton.jit
def _batch_head_group(pid, nheads, hpg):
    """(batch (int64), head, group) of a (batch, head) index."""
    hh = pid % nheads
    return (pid // nheads).to(tl.int64), hh, hh // hpg


@triton.jit
def _block_local(acc, x_ptr, B_ptr, dtp_ptr, cs_ptr, seq_ptr, xbase, Bbase, row, seq_row, c0, k, seqlen,
                 sx_l, sx_p, sB_l, sB_n, ss_l, hdim, dstate, REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr,
                 Q: tl.constexpr, BLK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr,
                 PREC: tl.constexpr, UP: tl.constexpr):
    """acc + block k's part of the local end state of the chunk starting at c0 (from a zero state):
    sum_s exp(cs[Q-1] - cs[s]) dt[s] x[s] B[s]^T over the block's s, a (BP, BN) fp32 tile."""
    p_off = tl.arange(0, BP)
    n_off = tl.arange(0, BN)
    cs_last = tl.load(cs_ptr + row + c0 + Q - 1)
    js = c0 + k * BLK + tl.arange(0, BLK)
    vs = js < seqlen
    ts = _pos(js, seqlen, REVERSE)
    xs = _load_rows(x_ptr, xbase, ts, sx_l, p_off, sx_p, vs, hdim).to(tl.float32)
    Bs = _load_rows(B_ptr, Bbase, ts, sB_l, n_off, sB_n, vs, dstate).to(DT)
    w = tl.exp(tl.minimum(cs_last - tl.load(cs_ptr + row + js), 0.0)) * tl.load(dtp_ptr + row + js)
    if HAS_SEQ:
        seq_last = _seq_at(seq_ptr, seq_row, c0 + Q - 1, seqlen, ss_l, REVERSE)
        w = tl.where(_seq_at(seq_ptr, seq_row, js, seqlen, ss_l, REVERSE) == seq_last, w, 0.0)
    return _mm(tl.trans((xs * w[:, None]).to(DT)), Bs.to(DT), acc, PREC=PREC, UP=UP)


@triton.jit
def _chunk_state_kernel(x_ptr, B_ptr, dtp_ptr, cs_ptr, st_ptr, seq_ptr,
                        sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, ss_b, ss_l,
                        nheads, hpg, seqlen, Lp, n_chunks, hdim, dstate, n_bh,
                        REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr, Q: tl.constexpr, BLK: tl.constexpr,
                        BP: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, UP: tl.constexpr,
                        HEADS_FIRST: tl.constexpr):
    """Local end state of each chunk (from a zero state), written to slot c of the (b, chunks, h, p, n) fp32
    buffer of local states."""
    c, pid = _grid_ids(n_bh, HEADS_FIRST)
    bb = (pid // nheads).to(tl.int64)
    hh = pid % nheads
    p_off = tl.arange(0, BP)
    n_off = tl.arange(0, BN)
    acc = tl.zeros([BP, BN], dtype=tl.float32)
    for k in range(0, Q // BLK):
        acc = _block_local(acc, x_ptr, B_ptr, dtp_ptr, cs_ptr, seq_ptr, bb * sx_b + hh * sx_h,
                           bb * sB_b + (hh // hpg) * sB_g, pid.to(tl.int64) * Lp, bb * ss_b, c.to(tl.int64) * Q, k,
                           seqlen, sx_l, sx_p, sB_l, sB_n, ss_l, hdim, dstate, REVERSE, HAS_SEQ, Q, BLK, BP, BN, DT,
                           PREC, UP)
    slot = ((bb * n_chunks + c) * nheads + hh) * hdim * dstate
    m = (p_off < hdim)[:, None] & (n_off < dstate)[None, :]
    tl.store(st_ptr + slot + p_off[:, None] * dstate + n_off[None, :], acc, mask=m)


@triton.jit
def _run_program(n_bh, nheads, hpg, hdim, dstate, Lp, sx_b, sx_h, sB_b, sB_g, BP: tl.constexpr, BN: tl.constexpr):
    """For a program of a kernel over runs (1-d grid, the n_bh (batch, head) pairs of one run consecutive): its
    run, (batch, head) index, batch, head, group, row of dt' and cs, bases of its x and B rows, and the offsets
    and mask of a (BP, BN) state tile."""
    r, pid = _grid_ids(n_bh, True)
    bb, hh, gg = _batch_head_group(pid, nheads, hpg)
    p_off = tl.arange(0, BP)
    n_off = tl.arange(0, BN)
    hoff = p_off[:, None] * dstate + n_off[None, :]
    hm = (p_off < hdim)[:, None] & (n_off < dstate)[None, :]
    return r, pid, bb, hh, gg, pid.to(tl.int64) * Lp, bb * sx_b + hh * sx_h, bb * sB_b + gg * sB_g, hoff, hm


@triton.jit
def _chunk_state_run_kernel(x_ptr, B_ptr, dtp_ptr, cs_ptr, agg_ptr, dagg_ptr, seq_ptr,
                            sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, ss_b, ss_l,
                            nheads, hpg, seqlen, Lp, n_chunks, hdim, dstate, n_bh, n_runs,
                            REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr, Q: tl.constexpr, BLK: tl.constexpr,
                            BP: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                            UP: tl.constexpr, RUN: tl.constexpr):
    """A run of RUN consecutive chunks of one (batch, head), carried from a zero state at the run's start
    (h <- decay h + local, in fp32): its end state (``agg``, (b, runs, h, p, n) fp32) and total decay (``dagg``,
    (b h, runs)), for ``_run_pass_kernel``; the chunks' local states never reach memory. 1-d grid, the n_bh
    (batch, head) pairs of one run consecutive."""
    r, pid, bb, hh, gg, row, xbase, Bbase, hoff, hm = _run_program(n_bh, nheads, hpg, hdim, dstate, Lp, sx_b, sx_h,
                                                                   sB_b, sB_g, BP, BN)
    h = tl.zeros([BP, BN], dtype=tl.float32)
    run_decay = tl.full((), 1.0, tl.float32)
    c_first = r * RUN
    NB: tl.constexpr = Q // BLK
    # one loop over the run's blocks (not chunks, then blocks): the loads stay pipelined across the chunks
    # (H100, b1 l2^20 forward: 11.19 -> 10.70 ms)
    for i in range(0, tl.minimum(n_chunks - c_first, RUN) * NB):
        c = c_first + i // NB
        k = i % NB
        c0 = c.to(tl.int64) * Q
        if k == 0:
            decay = _chunk_decay(cs_ptr, row, seq_ptr, bb * ss_b, c0, seqlen, ss_l, HAS_SEQ, REVERSE, Q)
            h = h * decay
            run_decay = run_decay * decay
        h = _block_local(h, x_ptr, B_ptr, dtp_ptr, cs_ptr, seq_ptr, xbase, Bbase, row, bb * ss_b, c0, k, seqlen,
                         sx_l, sx_p, sB_l, sB_n, ss_l, hdim, dstate, REVERSE, HAS_SEQ, Q, BLK, BP, BN, DT, PREC, UP)
    tl.store(agg_ptr + ((bb * n_runs + r) * nheads + hh) * hdim * dstate + hoff, h, mask=hm)
    tl.store(dagg_ptr + pid.to(tl.int64) * n_runs + r, run_decay)


@triton.jit
def _state_block_start(h0_ptr, nheads, size, HAS_H0: tl.constexpr, BS: tl.constexpr):
    """For a program (b h, state block) of a pass over states: its (batch, head) index, batch, head, element
    offsets e and mask, and its block of the initial state (h0, or 0) in fp32."""
    pid = tl.program_id(0)
    bb = (pid // nheads).to(tl.int64)
    e = tl.program_id(1) * BS + tl.arange(0, BS)
    em = e < size
    if HAS_H0:
        h = tl.load(h0_ptr + pid.to(tl.int64) * size + e, mask=em, other=0.0)
    else:
        h = tl.zeros([BS], dtype=tl.float32)
    return pid, bb, pid % nheads, e, em, h


@triton.jit
def _run_pass_kernel(agg_ptr, dagg_ptr, hr_ptr, ht_ptr, h0_ptr, nheads, n_runs, size, HAS_H0: tl.constexpr,
                     BS: tl.constexpr):
    """Over the runs of ``_chunk_state_run_kernel``: the state entering run r (fp32, to its slot of ``hr``, (b,
    runs, h, p, n)) is dagg[r-1] * that of run r-1 + agg[r-1], starting from h0 (or 0); the final state (fp32)
    to ``ht``. A block of BS elements of one (batch, head) state per program."""
    pid, bb, hh, e, em, h = _state_block_start(h0_ptr, nheads, size, HAS_H0, BS)
    step = nheads * size
    slot = (bb * n_runs * nheads + hh) * size
    agg = tl.load(agg_ptr + slot + e, mask=em, other=0.0)
    for r in range(0, n_runs):
        agg_next = tl.load(agg_ptr + slot + step + e, mask=em & (r + 1 < n_runs), other=0.0)  # in flight meanwhile
        tl.store(hr_ptr + slot + e, h, mask=em)
        h = tl.load(dagg_ptr + pid.to(tl.int64) * n_runs + r) * h + agg
        agg = agg_next
        slot += step
    tl.store(ht_ptr + pid.to(tl.int64) * size + e, h, mask=em)


@triton.jit
def _chunk_keep(seq_ptr, row, c0, seqlen, ss_l, REVERSE: tl.constexpr, Q: tl.constexpr):
    """1 where the chunk starting at c0 ends in the sequence of the position before it (no reset inside)."""
    s_last = _seq_at(seq_ptr, row, c0 + Q - 1, seqlen, ss_l, REVERSE)
    s_prev = _seq_at(seq_ptr, row, c0 - 1, seqlen, ss_l, REVERSE)
    return s_last == s_prev


@triton.jit
def _chunk_decay(cs_ptr, row, seq_ptr, seq_row, c0, seqlen, ss_l, HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr,
                 Q: tl.constexpr):
    """exp(cs at the chunk's last position), 0 where a new sequence starts inside the chunk (c0 its start)."""
    decay = tl.exp(tl.minimum(tl.load(cs_ptr + row + c0 + Q - 1), 0.0))
    if HAS_SEQ:
        decay = tl.where(_chunk_keep(seq_ptr, seq_row, c0, seqlen, ss_l, REVERSE, Q), decay, 0.0)
    return decay


@triton.jit
def _row(tile, i):
    """Row i of a (U, BS) tile, taken out within each thread (the tiles keep each column's U rows in one thread)."""
    u = tl.arange(0, tile.shape[0])[:, None]
    return tl.sum(tl.where(u == i, tile, 0.0), axis=0)


@triton.jit
def _slots(ptr, base, step, e, em, cc, n_chunks):
    """(U, BS) fp32 tile of the elements e of chunks cc's slots (chunk c's at base + c step); 0 for the cc
    outside [0, n_chunks)."""
    valid = (cc >= 0) & (cc < n_chunks)
    return tl.load(ptr + base + cc[:, None].to(tl.int64) * step + e[None, :], mask=valid[:, None] & em[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _state_group(ptr, cs_ptr, seq_ptr, row, seq_row, base, step, e, em, cc, n_chunks, seqlen, ss_l,
                 HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr, Q: tl.constexpr):
    """Chunks cc (U of them) as (U, BS) tiles: the slots of ``ptr`` (fp32; chunk c's slot at base + c step)
    and the chunks' decays, each decay repeated along the row (so that ``_row`` stays within threads);
    decay 1 and slot 0 for the cc outside [0, n_chunks)."""
    valid = (cc >= 0) & (cc < n_chunks)
    S = _slots(ptr, base, step, e, em, cc, n_chunks)
    c0 = tl.minimum(tl.maximum(cc, 0), n_chunks - 1).to(tl.int64) * Q  # clamped: no reads outside the chunks
    decay = tl.where(valid, _chunk_decay(cs_ptr, row, seq_ptr, seq_row, c0, seqlen, ss_l, HAS_SEQ, REVERSE, Q), 1.0)
    decay = decay[:, None] * tl.full(S.shape, 1.0, tl.float32)
    return S, decay


@triton.jit
def _state_pass_kernel(loc_ptr, st_ptr, ht_ptr, cs_ptr, h0_ptr, seq_ptr, ss_b, ss_l, nheads, seqlen, Lp, n_chunks,
                       size, HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr, Q: tl.constexpr,
                       BS: tl.constexpr, U: tl.constexpr):
    """Over slots c = 0..chunks-1 of (b, chunks, h, p, n): local end states (fp32, ``loc``) -> the states
    entering each chunk (``st``, in its dtype; it may be ``loc`` itself: each element is read before it is
    written), carried in fp32; the final state (fp32) to ``ht``. A block of BS elements of one (batch, head)
    state per program. U chunks per load, the next U in flight while these are carried (the pass is bound
    by load latency: one chunk at a time kept too few bytes in flight)."""
    pid, bb, hh, e, em, h = _state_block_start(h0_ptr, nheads, size, HAS_H0, BS)
    row = pid.to(tl.int64) * Lp
    step = nheads * size  # from one chunk's slot to the next
    base = (bb * n_chunks * nheads + hh) * size
    u = tl.arange(0, U)
    S_n, D_n = _state_group(loc_ptr, cs_ptr, seq_ptr, row, bb * ss_b, base, step, e, em, u, n_chunks, seqlen, ss_l,
                            HAS_SEQ, REVERSE, Q)
    slot = base  # chunk c_first's slot
    for c_first in range(0, n_chunks, U):
        S = S_n
        D = D_n
        if c_first + U < n_chunks:  # prefetch: nothing below depends on the carried state
            S_n, D_n = _state_group(loc_ptr, cs_ptr, seq_ptr, row, bb * ss_b, base, step, e, em, c_first + U + u,
                                    n_chunks, seqlen, ss_l, HAS_SEQ, REVERSE, Q)
        for i in tl.static_range(U):
            tl.store(st_ptr + slot + i * step + e, h.to(st_ptr.dtype.element_ty), mask=em & (c_first + i < n_chunks))
            h = _row(D, i) * h + _row(S, i)
        slot += U * step
    tl.store(ht_ptr + pid.to(tl.int64) * size + e, h, mask=em)


@triton.jit
def _chunk_out_kernel(x_ptr, B_ptr, C_ptr, D_ptr, z_ptr, y_ptr, ypre_ptr, dtp_ptr, cs_ptr, st_ptr, seq_ptr,
                      sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
                      sz_b, sz_l, sz_h, sz_p, so_b, so_l, so_h, ss_b, ss_l,
                      nheads, hpg, seqlen, Lp, n_chunks, hdim, dstate, n_bh,
                      HAS_D: tl.constexpr, D_HP: tl.constexpr, HAS_Z: tl.constexpr, STORE_PRE: tl.constexpr,
                      REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr, Q: tl.constexpr, BLK: tl.constexpr,
                      BP: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, UP: tl.constexpr,
                      FACTOR: tl.constexpr, HEADS_FIRST: tl.constexpr):
    """y for one block of BLK positions of one chunk and head: the state entering the chunk, decayed, read by
    C, plus the masked (C B^T) (dt x) product over the blocks up to this one, plus D x, times silu(z).
    HEADS_FIRST: a 1-d grid whose consecutive programs are the n_bh (batch, head) pairs of one block."""
    pc, pid = _grid_ids(n_bh, HEADS_FIRST)
    NB: tl.constexpr = Q // BLK
    c = pc // NB
    m = pc % NB
    bb, hh, gg = _batch_head_group(pid, nheads, hpg)
    p_off = tl.arange(0, BP)
    n_off = tl.arange(0, BN)
    row = pid.to(tl.int64) * Lp
    c0 = c.to(tl.int64) * Q
    jt = c0 + m * BLK + tl.arange(0, BLK)
    vt = jt < seqlen
    tt = _pos(jt, seqlen, REVERSE)
    cst = tl.load(cs_ptr + row + jt)
    Ct = _load_rows(C_ptr, bb * sC_b + gg * sC_g, tt, sC_l, n_off, sC_n, vt, dstate).to(DT)
    slot = ((bb * n_chunks + c) * nheads + hh) * hdim * dstate
    H = tl.load(st_ptr + slot + p_off[:, None] * dstate + n_off[None, :],
                mask=(p_off < hdim)[:, None] & (n_off < dstate)[None, :], other=0.0)
    ein = tl.exp(tl.minimum(cst, 0.0))
    if HAS_SEQ:
        seq_t = _seq_at(seq_ptr, bb * ss_b, jt, seqlen, ss_l, REVERSE)
        ein = tl.where(seq_t == _seq_at(seq_ptr, bb * ss_b, c0 - 1, seqlen, ss_l, REVERSE), ein, 0.0)
    acc = _mm(Ct, tl.trans(H.to(DT)), PREC=PREC, UP=UP) * ein[:, None]
    for k in range(0, m + 1):
        js = c0 + k * BLK + tl.arange(0, BLK)
        vs = js < seqlen
        ts = _pos(js, seqlen, REVERSE)
        xs = _load_rows(x_ptr, bb * sx_b + hh * sx_h, ts, sx_l, p_off, sx_p, vs, hdim).to(DT)
        Bs = _load_rows(B_ptr, bb * sB_b + gg * sB_g, ts, sB_l, n_off, sB_n, vs, dstate).to(DT)
        cb = _mm(Ct, tl.trans(Bs), PREC=PREC, UP=UP)
        decay = _decay(cs_ptr, row + c0 + k * BLK + BLK - 1, cst, tl.load(cs_ptr + row + js), k < m, FACTOR)
        keep = jt[:, None] >= js[None, :]
        if HAS_SEQ:
            keep = keep & (seq_t[:, None] == _seq_at(seq_ptr, bb * ss_b, js, seqlen, ss_l, REVERSE)[None, :])
        wgt = tl.where(keep, cb * decay * tl.load(dtp_ptr + row + js)[None, :], 0.0)
        acc = _mm(wgt.to(DT), xs, acc, PREC=PREC, UP=UP)
    if HAS_D:
        xt = _load_rows(x_ptr, bb * sx_b + hh * sx_h, tt, sx_l, p_off, sx_p, vt, hdim)
    else:
        xt = acc  # unused
    _out_head(acc, xt, D_ptr, z_ptr, y_ptr, ypre_ptr, hh, bb, tt, vt, p_off, hdim, sz_b, sz_l, sz_h, sz_p,
              so_b, so_l, so_h, HAS_D, D_HP, HAS_Z, STORE_PRE)


@triton.jit
def _out_head(acc, xt, D_ptr, z_ptr, y_ptr, ypre_ptr, hh, bb, tt, vt, p_off, hdim, sz_b, sz_l, sz_h, sz_p,
              so_b, so_l, so_h, HAS_D: tl.constexpr, D_HP: tl.constexpr, HAS_Z: tl.constexpr,
              STORE_PRE: tl.constexpr):
    """Writes one head's (BLK, BP) tile of y (and y before the gate): acc + D x, times silu(z)."""
    if HAS_D:
        if D_HP:
            Dv = tl.load(D_ptr + hh * hdim + p_off, mask=p_off < hdim, other=0.0).to(tl.float32)
            acc += Dv[None, :] * xt.to(tl.float32)
        else:
            acc += tl.load(D_ptr + hh).to(tl.float32) * xt.to(tl.float32)
    om = vt[:, None] & (p_off < hdim)[None, :]
    out = bb * so_b + hh * so_h + tt[:, None] * so_l + p_off[None, :]
    if STORE_PRE:
        tl.store(ypre_ptr + out, acc.to(ypre_ptr.dtype.element_ty), mask=om)
    if HAS_Z:
        zt = _load_rows(z_ptr, bb * sz_b + hh * sz_h, tt, sz_l, p_off, sz_p, vt, hdim).to(tl.float32)
        acc = acc * zt * _sigmoid(zt)
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=om)


@triton.jit
def _chunk_out_pair_kernel(x_ptr, B_ptr, C_ptr, D_ptr, z_ptr, y_ptr, ypre_ptr, dtp_ptr, cs_ptr, st_ptr, seq_ptr,
                           sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
                           sz_b, sz_l, sz_h, sz_p, so_b, so_l, so_h, ss_b, ss_l,
                           nheads, hpg, seqlen, Lp, n_chunks, hdim, dstate, n_bq,
                           HAS_D: tl.constexpr, D_HP: tl.constexpr, HAS_Z: tl.constexpr,
                           STORE_PRE: tl.constexpr, REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr, Q: tl.constexpr,
                           BLK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr,
                           PREC: tl.constexpr, UP: tl.constexpr, PREFETCH: tl.constexpr):
    """``_chunk_out_kernel`` for two heads (h0, h0 + 1) of one group, each with its own (BLK, BP) accumulator:
    C B^T is computed, and the C and B tiles read, once for both. The state term and the blocks before the
    diagonal accumulate in the frame of ref = the position before this block (every factor exp(<= 0)), then one
    exp(cs[t] - cs[ref]) per (t, head) moves them to t. Each head's decay and dt scale the (t, s) weights, not x,
    so the x tiles go from memory straight into the products; the diagonal block takes one product a head.
    PREFETCH (``_prefetch_ok``: 16-bit tensors, unit strides along p and n) asks L2 for the diagonal block's B
    and x rows first thing: 128-byte lines, two a B row (n <= 128), one a head's x row (p <= 64).
    1-d grid, the n_bq (batch, head pair) pairs of one block consecutive."""
    NB: tl.constexpr = Q // BLK
    pc = tl.program_id(0) // n_bq
    pq = tl.program_id(0) % n_bq
    c = pc // NB
    m = pc % NB
    nq = nheads // 2
    bb = (pq // nq).to(tl.int64)
    h0 = (pq % nq) * 2
    gg = h0 // hpg
    p_off = tl.arange(0, BP)
    n_off = tl.arange(0, BN)
    row0 = (bb * nheads + h0).to(tl.int64) * Lp  # rows of dt' and cs: head h0, then h0 + 1 at row0 + Lp
    row1 = row0 + Lp
    c0 = c.to(tl.int64) * Q
    jt = c0 + m * BLK + tl.arange(0, BLK)
    vt = jt < seqlen
    tt = _pos(jt, seqlen, REVERSE)
    if PREFETCH:  # the diagonal block's B and x rows, read last: their DRAM round trip overlaps the rest
        tc = tl.where(vt, tt, 0)
        two = tl.arange(0, 2)
        _prefetch_l2(B_ptr + bb * sB_b + gg * sB_g + tc[:, None] * sB_l + (two * (dstate // 2) * sB_n)[None, :])
        _prefetch_l2(x_ptr + bb * sx_b + (h0 + two)[None, :] * sx_h + tc[:, None] * sx_l)
    Ct = _load_rows(C_ptr, bb * sC_b + gg * sC_g, tt, sC_l, n_off, sC_n, vt, dstate).to(DT)
    ref = tl.maximum(c0 + m * BLK - 1, c0)
    cr0 = tl.where(m > 0, tl.load(cs_ptr + row0 + ref), 0.0)  # cs at ref (0: the chunk's start)
    cr1 = tl.where(m > 0, tl.load(cs_ptr + row1 + ref), 0.0)
    # state term, in the frame of ref: exp(cs[ref]) C H^T
    slot = ((bb * n_chunks + c) * nheads + h0) * hdim * dstate
    hoff = p_off[:, None] * dstate + n_off[None, :]
    hm = (p_off < hdim)[:, None] & (n_off < dstate)[None, :]
    H0 = tl.load(st_ptr + slot + hoff, mask=hm, other=0.0).to(DT)
    H1 = tl.load(st_ptr + slot + hdim * dstate + hoff, mask=hm, other=0.0).to(DT)
    acc0 = _mm(Ct, tl.trans(H0), PREC=PREC, UP=UP) * tl.exp(tl.minimum(cr0, 0.0))
    acc1 = _mm(Ct, tl.trans(H1), PREC=PREC, UP=UP) * tl.exp(tl.minimum(cr1, 0.0))
    if HAS_SEQ:
        seq_t = _seq_at(seq_ptr, bb * ss_b, jt, seqlen, ss_l, REVERSE)
        keep_in = seq_t == _seq_at(seq_ptr, bb * ss_b, c0 - 1, seqlen, ss_l, REVERSE)
        acc0 = tl.where(keep_in[:, None], acc0, 0.0)
        acc1 = tl.where(keep_in[:, None], acc1, 0.0)
    x0 = bb * sx_b + h0 * sx_h
    x1 = x0 + sx_h
    for k in range(0, m):
        js = c0 + k * BLK + tl.arange(0, BLK)
        vs = js < seqlen
        ts = _pos(js, seqlen, REVERSE)
        Bs = _load_rows(B_ptr, bb * sB_b + gg * sB_g, ts, sB_l, n_off, sB_n, vs, dstate).to(DT)
        cb = _mm(Ct, tl.trans(Bs), PREC=PREC, UP=UP)
        if HAS_SEQ:
            cb = tl.where(seq_t[:, None] == _seq_at(seq_ptr, bb * ss_b, js, seqlen, ss_l, REVERSE)[None, :], cb, 0.0)
        f0 = tl.exp(tl.minimum(cr0 - tl.load(cs_ptr + row0 + js), 0.0)) * tl.load(dtp_ptr + row0 + js)
        f1 = tl.exp(tl.minimum(cr1 - tl.load(cs_ptr + row1 + js), 0.0)) * tl.load(dtp_ptr + row1 + js)
        xs0 = _load_rows(x_ptr, x0, ts, sx_l, p_off, sx_p, vs, hdim).to(DT)
        xs1 = _load_rows(x_ptr, x1, ts, sx_l, p_off, sx_p, vs, hdim).to(DT)
        acc0 = _mm((cb * f0[None, :]).to(DT), xs0, acc0, PREC=PREC, UP=UP)
        acc1 = _mm((cb * f1[None, :]).to(DT), xs1, acc1, PREC=PREC, UP=UP)
    # from the frame of ref to t
    cst0 = tl.load(cs_ptr + row0 + jt)
    cst1 = tl.load(cs_ptr + row1 + jt)
    acc0 = acc0 * tl.exp(tl.minimum(cst0 - cr0, 0.0))[:, None]
    acc1 = acc1 * tl.exp(tl.minimum(cst1 - cr1, 0.0))[:, None]
    # the diagonal block: per head, the (t, s) weights C B^T exp(cs[t] - cs[s]) dt[s], s <= t
    Bt = _load_rows(B_ptr, bb * sB_b + gg * sB_g, tt, sB_l, n_off, sB_n, vt, dstate).to(DT)
    cb = _mm(Ct, tl.trans(Bt), PREC=PREC, UP=UP)
    keep = jt[:, None] >= jt[None, :]
    if HAS_SEQ:
        keep = keep & (seq_t[:, None] == seq_t[None, :])
    cb = tl.where(keep, cb, 0.0)
    xt0 = _load_rows(x_ptr, x0, tt, sx_l, p_off, sx_p, vt, hdim)
    xt1 = _load_rows(x_ptr, x1, tt, sx_l, p_off, sx_p, vt, hdim)
    w0 = cb * tl.exp(tl.minimum(cst0[:, None] - cst0[None, :], 0.0)) * tl.load(dtp_ptr + row0 + jt)[None, :]
    acc0 = _mm(w0.to(DT), xt0.to(DT), acc0, PREC=PREC, UP=UP)
    w1 = cb * tl.exp(tl.minimum(cst1[:, None] - cst1[None, :], 0.0)) * tl.load(dtp_ptr + row1 + jt)[None, :]
    acc1 = _mm(w1.to(DT), xt1.to(DT), acc1, PREC=PREC, UP=UP)
    _out_head(acc0, xt0, D_ptr, z_ptr, y_ptr, ypre_ptr, h0, bb, tt, vt, p_off, hdim, sz_b, sz_l, sz_h, sz_p,
              so_b, so_l, so_h, HAS_D, D_HP, HAS_Z, STORE_PRE)
    _out_head(acc1, xt1, D_ptr, z_ptr, y_ptr, ypre_ptr, h0 + 1, bb, tt, vt, p_off, hdim, sz_b, sz_l, sz_h, sz_p,
              so_b, so_l, so_h, HAS_D, D_HP, HAS_Z, STORE_PRE)


@triton.jit
def _run_out_kernel(x_ptr, B_ptr, C_ptr, D_ptr, z_ptr, y_ptr, ypre_ptr, dtp_ptr, cs_ptr, st_ptr, seq_ptr,
                    sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
                    sz_b, sz_l, sz_h, sz_p, so_b, so_l, so_h, ss_b, ss_l,
                    nheads, hpg, seqlen, Lp, n_chunks, hdim, dstate, hr_ptr, n_bh, n_runs,
                    HAS_D: tl.constexpr, D_HP: tl.constexpr, HAS_Z: tl.constexpr, STORE_PRE: tl.constexpr,
                    REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr, Q: tl.constexpr, BLK: tl.constexpr,
                    BP: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, UP: tl.constexpr,
                    RUN: tl.constexpr, STATES: tl.constexpr):
    """y for a run of RUN chunks of one (batch, head), walked block by block from the state entering the run
    (``hr``, from ``_run_pass_kernel``), the state H carried in fp32 registers. For each block of BLK positions,
    with ref the position before it (cs taken as 0 there at a chunk's start):

        y[t] = exp(cs[t] - cs[ref]) C[t] H^T + sum_{s <= t in the block} exp(cs[t] - cs[s]) (C[t].B[s]) dt[s] x[s]
        H   <- exp(cs[last] - cs[ref]) H + sum_s exp(cs[last] - cs[s]) dt[s] x[s] B[s]^T

    then D x and silu(z) as the chunk output kernels. No chunk state is read, and no block before the diagonal
    recomputed; STATES writes the state entering each chunk to its ``st`` slot (kept for the backward).
    1-d grid, the n_bh (batch, head) pairs of one run consecutive."""
    r, pid, bb, hh, gg, row, xbase, Bbase, hoff, hm = _run_program(n_bh, nheads, hpg, hdim, dstate, Lp, sx_b, sx_h,
                                                                   sB_b, sB_g, BP, BN)
    Cbase = bb * sC_b + gg * sC_g
    p_off = tl.arange(0, BP)
    n_off = tl.arange(0, BN)
    H = tl.load(hr_ptr + ((bb * n_runs + r) * nheads + hh) * hdim * dstate + hoff, mask=hm, other=0.0)
    NB: tl.constexpr = Q // BLK
    c_first = r * RUN
    for i in range(0, tl.minimum(n_chunks - c_first, RUN) * NB):
        c = c_first + i // NB
        k = i % NB
        c0 = c.to(tl.int64) * Q
        if STATES:
            if k == 0:
                tl.store(st_ptr + ((bb * n_chunks + c) * nheads + hh) * hdim * dstate + hoff,
                         H.to(st_ptr.dtype.element_ty), mask=hm)
        j0 = c0 + k * BLK
        jt = j0 + tl.arange(0, BLK)
        vt = jt < seqlen
        tt = _pos(jt, seqlen, REVERSE)
        cr = tl.where(k > 0, tl.load(cs_ptr + row + tl.maximum(j0 - 1, c0)), 0.0)
        cst = tl.load(cs_ptr + row + jt)
        dts = tl.load(dtp_ptr + row + jt)
        cl = tl.load(cs_ptr + row + j0 + BLK - 1)
        Ct = _load_rows(C_ptr, Cbase, tt, sC_l, n_off, sC_n, vt, dstate).to(DT)
        Bt = _load_rows(B_ptr, Bbase, tt, sB_l, n_off, sB_n, vt, dstate).to(DT)
        xt = _load_rows(x_ptr, xbase, tt, sx_l, p_off, sx_p, vt, hdim)
        e_in = tl.exp(tl.minimum(cst - cr, 0.0))  # from ref to t
        e_out = tl.exp(tl.minimum(cl - cst, 0.0)) * dts  # from s to the block's last position, times dt
        decay = tl.exp(tl.minimum(cl - cr, 0.0))
        keep = jt[:, None] >= jt[None, :]
        if HAS_SEQ:
            seq_t = _seq_at(seq_ptr, bb * ss_b, jt, seqlen, ss_l, REVERSE)
            seq_in = _seq_at(seq_ptr, bb * ss_b, j0 - 1, seqlen, ss_l, REVERSE)
            seq_last = _seq_at(seq_ptr, bb * ss_b, j0 + BLK - 1, seqlen, ss_l, REVERSE)
            e_in = tl.where(seq_t == seq_in, e_in, 0.0)
            e_out = tl.where(seq_t == seq_last, e_out, 0.0)
            decay = tl.where(seq_last == seq_in, decay, 0.0)
            keep = keep & (seq_t[:, None] == seq_t[None, :])
        acc = _mm(Ct, tl.trans(H.to(DT)), PREC=PREC, UP=UP) * e_in[:, None]
        cb = _mm(Ct, tl.trans(Bt), PREC=PREC, UP=UP)
        w = tl.where(keep, cb * tl.exp(tl.minimum(cst[:, None] - cst[None, :], 0.0)) * dts[None, :], 0.0)
        acc = _mm(w.to(DT), xt.to(DT), acc, PREC=PREC, UP=UP)
        _out_head(acc, xt, D_ptr, z_ptr, y_ptr, ypre_ptr, hh, bb, tt, vt, p_off, hdim, sz_b, sz_l, sz_h, sz_p,
                  so_b, so_l, so_h, HAS_D, D_HP, HAS_Z, STORE_PRE)
        H = _mm(tl.trans((xt.to(tl.float32) * e_out[:, None]).to(DT)), Bt, H * decay, PREC=PREC, UP=UP)


# ---------------------------------------------------------------------------------------------- backward

@triton.jit
def _bwd_gloc_kernel(dy_ptr, z_ptr, C_ptr, g_ptr, cs_ptr, gst_ptr, seq_ptr,
                     sz_b, sz_l, sz_h, sz_p, sC_b, sC_l, sC_g, sC_n, so_b, so_l, so_h, ss_b, ss_l,
                     nheads, hpg, seqlen, Lp, n_chunks, hdim, dstate, n_bh,
                     HAS_Z: tl.constexpr, REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr, Q: tl.constexpr,
                     BLK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr,
                     PREC: tl.constexpr, UP: tl.constexpr, HEADS_FIRST: tl.constexpr):
    """g = dy silu(z) (written when z is given) and each chunk's local dL/dH_in = sum_t exp(cs[t]) g[t]^T C[t]
    into slot c of the (b, chunks, h, p, n) fp32 gradient buffer."""
    c, pid = _grid_ids(n_bh, HEADS_FIRST)
    bb, hh, gg = _batch_head_group(pid, nheads, hpg)
    p_off = tl.arange(0, BP)
    n_off = tl.arange(0, BN)
    row = pid.to(tl.int64) * Lp
    c0 = c.to(tl.int64) * Q
    if HAS_SEQ:
        seq_in = _seq_at(seq_ptr, bb * ss_b, c0 - 1, seqlen, ss_l, REVERSE)
    acc = tl.zeros([BP, BN], dtype=tl.float32)
    for k in range(0, Q // BLK):
        jt = c0 + k * BLK + tl.arange(0, BLK)
        vt = jt < seqlen
        tt = _pos(jt, seqlen, REVERSE)
        gt = _load_rows(dy_ptr, bb * so_b + hh * so_h, tt, so_l, p_off, 1, vt, hdim).to(tl.float32)
        if HAS_Z:
            zt = _load_rows(z_ptr, bb * sz_b + hh * sz_h, tt, sz_l, p_off, sz_p, vt, hdim).to(tl.float32)
            gt = gt * zt * _sigmoid(zt)
            tl.store(g_ptr + bb * so_b + hh * so_h + tt[:, None] * so_l + p_off[None, :],
                     gt.to(g_ptr.dtype.element_ty), mask=vt[:, None] & (p_off < hdim)[None, :])
        ein = tl.exp(tl.minimum(tl.load(cs_ptr + row + jt), 0.0))
        if HAS_SEQ:
            ein = tl.where(_seq_at(seq_ptr, bb * ss_b, jt, seqlen, ss_l, REVERSE) == seq_in, ein, 0.0)
        Ct = _load_rows(C_ptr, bb * sC_b + gg * sC_g, tt, sC_l, n_off, sC_n, vt, dstate).to(DT)
        acc = _mm(tl.trans((gt * ein[:, None]).to(DT)), Ct.to(DT), acc, PREC=PREC, UP=UP)
    slot = ((bb * n_chunks + c) * nheads + hh) * hdim * dstate
    m = (p_off < hdim)[:, None] & (n_off < dstate)[None, :]
    tl.store(gst_ptr + slot + p_off[:, None] * dstate + n_off[None, :], acc, mask=m)


@triton.jit
def _bwd_state_pass_kernel(gl_ptr, gst_ptr, st_ptr, cs_ptr, dht_ptr, dh0_ptr, kp_ptr, seq_ptr, ss_b, ss_l,
                           nheads, seqlen, Lp, n_chunks, size, n_blocks,
                           HAS_DHT: tl.constexpr, HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr,
                           Q: tl.constexpr, BS: tl.constexpr, U: tl.constexpr):
    """Right to left over chunks: local dL/dH_in (fp32, ``gl``) -> G_out[c] = dL/dH_out[c] (``gst``, in its
    dtype; it may be ``gl`` itself: a group's slots are read before they are written), carried in fp32;
    dinitial_state; and this block's part of E_c <G_out[c], H_in[c]> (E_c = exp(cs[Q-1]) the chunk's decay:
    the gradient of the loss with respect to log E_c through the carried state). U chunks per load, the next
    U in flight, as in ``_state_pass_kernel``; their U inner products are reduced once per group."""
    pid = tl.program_id(0)
    blk = tl.program_id(1)
    bb = (pid // nheads).to(tl.int64)
    hh = pid % nheads
    e = blk * BS + tl.arange(0, BS)
    em = e < size
    if HAS_DHT:
        G = tl.load(dht_ptr + pid.to(tl.int64) * size + e, mask=em, other=0.0)
    else:
        G = tl.zeros([BS], dtype=tl.float32)
    row = pid.to(tl.int64) * Lp
    step = nheads * size
    base = (bb * n_chunks * nheads + hh) * size  # chunk 0's slot
    kp_row = (pid.to(tl.int64) * n_blocks + blk) * n_chunks
    u = tl.arange(0, U)  # row i of a group: chunk n_chunks - 1 - done - i
    L_n, D_n = _state_group(gl_ptr, cs_ptr, seq_ptr, row, bb * ss_b, base, step, e, em, n_chunks - 1 - u,
                            n_chunks, seqlen, ss_l, HAS_SEQ, REVERSE, Q)
    # the half-precision states load 4 elements a thread like the fp32 tiles (8 would give them another layout,
    # and taking a row out would cross warps through shared memory)
    e4 = tl.max_contiguous(e, 4)
    H_n = _slots(st_ptr, base, step, e4, em, n_chunks - 1 - u, n_chunks)
    for done in range(0, n_chunks, U):
        cc = n_chunks - 1 - done - u
        L = L_n
        D = D_n
        H = H_n
        if done + U < n_chunks:  # prefetch: nothing below depends on the carried gradient
            L_n, D_n = _state_group(gl_ptr, cs_ptr, seq_ptr, row, bb * ss_b, base, step, e, em, cc - U, n_chunks,
                                    seqlen, ss_l, HAS_SEQ, REVERSE, Q)
            H_n = _slots(st_ptr, base, step, e4, em, cc - U, n_chunks)
        Gs = tl.zeros([U, BS], dtype=tl.float32)  # G_out of the group's chunks
        slot = base + (n_chunks - 1 - done).to(tl.int64) * step
        for i in tl.static_range(U):
            tl.store(gst_ptr + slot - i * step + e, G.to(gst_ptr.dtype.element_ty), mask=em & (done + i < n_chunks))
            Gs = tl.where(u[:, None] == i, G[None, :], Gs)
            G = _row(D, i) * G + _row(L, i)
        tl.store(kp_ptr + kp_row + cc, tl.sum(D * Gs * H, axis=1), mask=cc >= 0)
    tl.store(dh0_ptr + pid.to(tl.int64) * size + e, G, mask=em)


@triton.jit
def _bwd_dx_dB_kernel(x_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dy_ptr, g_ptr, ypre_ptr, dtp_ptr, cs_ptr, gst_ptr,
                      seq_ptr, dx_ptr, dz_ptr, dBp_ptr, q_ptr, zs_ptr, dDp_ptr,
                      sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
                      sz_b, sz_l, sz_h, sz_p, so_b, so_l, so_h, ss_b, ss_l,
                      nheads, ngroups, hpg, hps, n_splits, seqlen, Lp, n_chunks, hdim, dstate, n_prog,
                      HAS_D: tl.constexpr, D_HP: tl.constexpr, HAS_Z: tl.constexpr, REVERSE: tl.constexpr,
                      HAS_SEQ: tl.constexpr, Q: tl.constexpr, BLK: tl.constexpr, BP: tl.constexpr,
                      BN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, UP: tl.constexpr,
                      FACTOR: tl.constexpr, HEADS_FIRST: tl.constexpr):
    """One block of BLK source positions s of one chunk, for the ``hps`` heads of one split of a group:

        dx[s] = dt[s] (sum_{t>=s} P[t,s] (C[t].B[s]) g[t] + w[s] G_out B[s]) + D g[s]
        dB[s] = dt[s] (sum_{t>=s} P[t,s] (g[t].x[s]) C[t] + w[s] G_out^T x[s])   (summed over the heads)

    with P[t,s] = exp(cs[t] - cs[s]), w[s] = exp(cs[Q-1] - cs[s]); also dz, this block's part of dD and,
    in scan order, q = x.(dx - D g)/dt (the direct ddt) and Z = w dt x.(G_out B) (the outgoing state's term,
    whose gradient in cs[s] is -Z[s])."""
    pc, pid = _grid_ids(n_prog, HEADS_FIRST)  # pid: (batch, group, split)
    NB: tl.constexpr = Q // BLK
    c = pc // NB
    m = pc % NB
    sp = pid % n_splits
    gg = (pid // n_splits) % ngroups
    bb = (pid // (n_splits * ngroups)).to(tl.int64)
    p_off = tl.arange(0, BP)
    n_off = tl.arange(0, BN)
    pm = p_off < hdim
    st_m = pm[:, None] & (n_off < dstate)[None, :]
    c0 = c.to(tl.int64) * Q
    js = c0 + m * BLK + tl.arange(0, BLK)
    vs = js < seqlen
    ts = _pos(js, seqlen, REVERSE)
    Bs = _load_rows(B_ptr, bb * sB_b + gg * sB_g, ts, sB_l, n_off, sB_n, vs, dstate).to(DT)
    if HAS_SEQ:
        seq_s = _seq_at(seq_ptr, bb * ss_b, js, seqlen, ss_l, REVERSE)
        seq_last = _seq_at(seq_ptr, bb * ss_b, c0 + Q - 1, seqlen, ss_l, REVERSE)
    dB = tl.zeros([BLK, BN], dtype=tl.float32)
    for i in range(0, hps):
        hh = gg * hpg + sp * hps + i
        row = (bb * nheads + hh) * Lp
        xs = _load_rows(x_ptr, bb * sx_b + hh * sx_h, ts, sx_l, p_off, sx_p, vs, hdim).to(DT)
        dts = tl.load(dtp_ptr + row + js)
        css = tl.load(cs_ptr + row + js)
        acc = tl.zeros([BLK, BP], dtype=tl.float32)
        for k in range(m, NB):
            jt = c0 + k * BLK + tl.arange(0, BLK)
            vt = jt < seqlen
            tt = _pos(jt, seqlen, REVERSE)
            Ct = _load_rows(C_ptr, bb * sC_b + gg * sC_g, tt, sC_l, n_off, sC_n, vt, dstate).to(DT)
            gt = _load_rows(g_ptr, bb * so_b + hh * so_h, tt, so_l, p_off, 1, vt, hdim).to(DT)
            decay = tl.trans(_decay(cs_ptr, row + c0 + m * BLK + BLK - 1, tl.load(cs_ptr + row + jt), css, k > m,
                                    FACTOR))  # (s, t)
            keep = jt[None, :] >= js[:, None]
            if HAS_SEQ:
                keep = keep & (_seq_at(seq_ptr, bb * ss_b, jt, seqlen, ss_l, REVERSE)[None, :] == seq_s[:, None])
            decay = tl.where(keep, decay, 0.0)
            cbt = _mm(Bs, tl.trans(Ct), PREC=PREC, UP=UP)
            acc = _mm((cbt * decay).to(DT), gt, acc, PREC=PREC, UP=UP)
            gxt = _mm(xs, tl.trans(gt), PREC=PREC, UP=UP)
            dB = _mm((gxt * decay * dts[:, None]).to(DT), Ct, dB, PREC=PREC, UP=UP)
        # what only the state terms need is loaded after the loop (fewer registers live across it)
        xs32 = xs.to(tl.float32)  # exact: DT is x's dtype or fp32
        w = tl.exp(tl.minimum(tl.load(cs_ptr + row + c0 + Q - 1) - css, 0.0))
        if HAS_SEQ:
            w = tl.where(seq_s == seq_last, w, 0.0)
        slot = ((bb * n_chunks + c) * nheads + hh) * hdim * dstate
        Gout = tl.load(gst_ptr + slot + p_off[:, None] * dstate + n_off[None, :], mask=st_m, other=0.0).to(DT)
        dB = _mm((xs32 * (w * dts)[:, None]).to(DT), Gout, dB, PREC=PREC, UP=UP)
        _dx_epilogue(D_ptr, z_ptr, dy_ptr, g_ptr, ypre_ptr, dx_ptr, dz_ptr, q_ptr, zs_ptr, dDp_ptr, Bs, Gout, acc,
                     xs32, w, dts, bb, hh, row, js, ts, vs, pc, n_chunks, nheads, sz_b, sz_l, sz_h, sz_p, so_b,
                     so_l, so_h, hdim, p_off, HAS_D, D_HP, HAS_Z, NB, BP, PREC, UP)
    dbm = vs[:, None] & (n_off < dstate)[None, :]
    tl.store(dBp_ptr + (((bb * n_splits + sp) * seqlen + ts[:, None]) * ngroups + gg) * dstate + n_off[None, :],
             dB.to(dBp_ptr.dtype.element_ty), mask=dbm)


@triton.jit
def _dx_epilogue(D_ptr, z_ptr, dy_ptr, g_ptr, ypre_ptr, dx_ptr, dz_ptr, q_ptr, zs_ptr, dDp_ptr, Bs, Gout,
                 acc, xs32, w, dts, bb, hh, row, js, ts, vs, pc, n_chunks, nheads,
                 sz_b, sz_l, sz_h, sz_p, so_b, so_l, so_h, hdim, p_off,
                 HAS_D: tl.constexpr, D_HP: tl.constexpr, HAS_Z: tl.constexpr, NB: tl.constexpr, BP: tl.constexpr,
                 PREC: tl.constexpr, UP: tl.constexpr):
    """dx of one s block and head from its pair sum ``acc`` and the outgoing state's term; q, Z, dD's part, dz."""
    pm = p_off < hdim
    om = vs[:, None] & pm[None, :]
    bgo = w[:, None] * _mm(Bs, tl.trans(Gout), PREC=PREC, UP=UP)
    tl.store(zs_ptr + row + js, dts * tl.sum(xs32 * bgo, axis=1))
    dxraw = acc + bgo
    tl.store(q_ptr + row + js, tl.sum(xs32 * dxraw, axis=1))
    dx = dts[:, None] * dxraw
    if HAS_D:
        gs = _load_rows(g_ptr, bb * so_b + hh * so_h, ts, so_l, p_off, 1, vs, hdim).to(tl.float32)
        if D_HP:
            Dv = tl.load(D_ptr + hh * hdim + p_off, mask=pm, other=0.0).to(tl.float32)[None, :]
        else:
            Dv = tl.load(D_ptr + hh).to(tl.float32)
        dx += Dv * gs
        tl.store(dDp_ptr + ((bb * n_chunks * NB + pc) * nheads + hh) * BP + p_off, tl.sum(gs * xs32, axis=0))
    out = bb * so_b + hh * so_h + ts[:, None] * so_l + p_off[None, :]
    tl.store(dx_ptr + out, dx.to(dx_ptr.dtype.element_ty), mask=om)
    if HAS_Z:  # dz = dy y_pre silu'(z), y_pre the output before the gate (saved by the forward)
        zs = _load_rows(z_ptr, bb * sz_b + hh * sz_h, ts, sz_l, p_off, sz_p, vs, hdim).to(tl.float32)
        dys = _load_rows(dy_ptr, bb * so_b + hh * so_h, ts, so_l, p_off, 1, vs, hdim).to(tl.float32)
        yp = _load_rows(ypre_ptr, bb * so_b + hh * so_h, ts, so_l, p_off, 1, vs, hdim).to(tl.float32)
        sg = _sigmoid(zs)
        tl.store(dz_ptr + out, (dys * yp * sg * (1.0 + zs * (1.0 - sg))).to(dz_ptr.dtype.element_ty), mask=om)


@triton.jit
def _bwd_dC_kernel(x_ptr, B_ptr, C_ptr, g_ptr, dtp_ptr, cs_ptr, st_ptr, seq_ptr, dCp_ptr, rin_ptr, dap_ptr,
                   sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n, so_b, so_l, so_h,
                   ss_b, ss_l,
                   nheads, ngroups, hpg, hps, n_splits, seqlen, Lp, n_chunks, hdim, dstate, n_prog,
                   REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr, Q: tl.constexpr, BLK: tl.constexpr,
                   BP: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, UP: tl.constexpr,
                   HEADS_FIRST: tl.constexpr, HB: tl.constexpr):
    """One block of BLK target positions t, summed over the ``hps`` heads of one split of a group:
    dC[t] = sum_{s<=t} P[t,s] dt[s] (g[t].x[s]) B[s] + exp(cs[t]) g[t]^T H_in. Per head also the parts of
    the gradient in dA = dt A that do not cancel: with R[t,s] = P[t,s] (C[t].B[s]) dt[s] (g[t].x[s]) (the
    pair's term of the loss), da[k] gets sum_{s<k<=t} R[t,s] (summed here without forming differences of
    large sums: this t block's share for every k of the chunk up to it, into its own row of ``dap``), and
    r_in[t] = exp(cs[t]) g[t].(H_in C[t]) (the incoming state's term) in scan order.

    The heads are the inner loops (HB = hps rounded up to a power of two): for each s block before this t
    block, C B^T and the B tile serve every head (one product, not one a head), and the loop Triton pipelines
    runs hps times instead of the 0 to NB-1 times of a loop over s blocks. Each head's per-t sums over those
    s blocks (rs) and its running total of their pairs (run) wait in (BLK, HB) and (HB,) tiles for its
    diagonal tile, which comes last with the incoming state's terms."""
    pc, pid = _grid_ids(n_prog, HEADS_FIRST)  # pid: (batch, group, split)
    NB: tl.constexpr = Q // BLK
    c = pc // NB
    m = pc % NB
    sp = pid % n_splits
    gg = (pid // n_splits) % ngroups
    bb = (pid // (n_splits * ngroups)).to(tl.int64)
    p_off = tl.arange(0, BP)
    n_off = tl.arange(0, BN)
    st_m = (p_off < hdim)[:, None] & (n_off < dstate)[None, :]
    c0 = c.to(tl.int64) * Q
    ar = tl.arange(0, BLK)
    jt = c0 + m * BLK + ar
    vt = jt < seqlen
    tt = _pos(jt, seqlen, REVERSE)
    seq_t = jt  # unused without seq_idx
    if HAS_SEQ:
        seq_t = _seq_at(seq_ptr, bb * ss_b, jt, seqlen, ss_l, REVERSE)
        seq_in = _seq_at(seq_ptr, bb * ss_b, c0 - 1, seqlen, ss_l, REVERSE)
    Ct = _load_rows(C_ptr, bb * sC_b + gg * sC_g, tt, sC_l, n_off, sC_n, vt, dstate).to(DT)
    Bbase = bb * sB_b + gg * sB_g
    h_first = gg * hpg + sp * hps
    ref = tl.maximum(c0 + m * BLK - 1, c0)
    before = ar[:, None] < ar[None, :]  # [i, j]: i < j
    at_or_after = ar[:, None] >= ar[None, :]  # [t, k]: t >= k
    hv = tl.arange(0, HB)
    dC = tl.zeros([BLK, BN], dtype=tl.float32)
    rs_all = tl.zeros([BLK, HB], dtype=tl.float32)  # [t, head]: t's pairs with the s of earlier blocks
    run_all = tl.zeros([HB], dtype=tl.float32)  # per head: every pair of the earlier s blocks
    for k in range(0, m):  # s blocks before this t block: every t is >= every k of the s block
        js = c0 + k * BLK + ar
        vs = js < seqlen
        ts = _pos(js, seqlen, REVERSE)
        Bs = _load_rows(B_ptr, Bbase, ts, sB_l, n_off, sB_n, vs, dstate).to(DT)
        cb = _mm(Ct, tl.trans(Bs), PREC=PREC, UP=UP)
        if HAS_SEQ:
            keep_s = seq_t[:, None] == _seq_at(seq_ptr, bb * ss_b, js, seqlen, ss_l, REVERSE)[None, :]
        for i in range(0, hps):
            hh = h_first + i
            row = (bb * nheads + hh) * Lp
            gt = _load_rows(g_ptr, bb * so_b + hh * so_h, tt, so_l, p_off, 1, vt, hdim).to(DT)
            xs = _load_rows(x_ptr, bb * sx_b + hh * sx_h, ts, sx_l, p_off, sx_p, vs, hdim).to(DT)
            # P[t,s] = exp(cs[t] - cs[ref]) exp(cs[ref] - cs[s]) through ref = the position before the t block
            cref = tl.load(cs_ptr + row + ref)
            a_t = tl.exp(tl.minimum(tl.load(cs_ptr + row + jt) - cref, 0.0))
            b_s = tl.exp(tl.minimum(cref - tl.load(cs_ptr + row + js), 0.0)) * tl.load(dtp_ptr + row + js)
            wgt = _mm(gt, tl.trans(xs), PREC=PREC, UP=UP) * a_t[:, None] * b_s[None, :]
            if HAS_SEQ:
                wgt = tl.where(keep_s, wgt, 0.0)
            R = wgt * cb
            dC = _mm(wgt.to(DT), Bs, dC, PREC=PREC, UP=UP)
            # the pairs s < k <= t of R by masked sums over the tile, with no scans (tl.cumsum of tensors laid
            # out for tl.dot is avoided)
            colsum = tl.sum(R, axis=0)  # per s
            excl = tl.sum(tl.where(before, colsum[:, None], 0.0), axis=0)  # per k of the block: s < k
            dap_row = ((bb * nheads + hh) * n_chunks + c) * NB * Q
            tl.store(dap_ptr + dap_row + m * Q + k * BLK + ar, excl + tl.sum(tl.where(hv == i, run_all, 0.0), axis=0))
            run_all = tl.where(hv == i, run_all + tl.sum(colsum, axis=0), run_all)
            rs_all = tl.where(hv[None, :] == i, rs_all + tl.sum(R, axis=1)[:, None], rs_all)
    # per head: the incoming state's terms and the diagonal tile (s and t in this block)
    Bt = _load_rows(B_ptr, Bbase, tt, sB_l, n_off, sB_n, vt, dstate).to(DT)
    keep = jt[:, None] >= jt[None, :]
    if HAS_SEQ:
        keep = keep & (seq_t[:, None] == seq_t[None, :])
    cbd = tl.where(keep, _mm(Ct, tl.trans(Bt), PREC=PREC, UP=UP), 0.0)
    ones_before = tl.where(before, 1.0, 0.0).to(DT)
    for i in range(0, hps):
        hh = h_first + i
        row = (bb * nheads + hh) * Lp
        g32 = _load_rows(g_ptr, bb * so_b + hh * so_h, tt, so_l, p_off, 1, vt, hdim).to(tl.float32)
        cst = tl.load(cs_ptr + row + jt)
        ein = tl.exp(tl.minimum(cst, 0.0))
        if HAS_SEQ:
            ein = tl.where(seq_t == seq_in, ein, 0.0)
        slot = ((bb * n_chunks + c) * nheads + hh) * hdim * dstate
        H = tl.load(st_ptr + slot + p_off[:, None] * dstate + n_off[None, :], mask=st_m, other=0.0).to(DT)
        dC = _mm((g32 * ein[:, None]).to(DT), H, dC, PREC=PREC, UP=UP)
        tl.store(rin_ptr + row + jt, ein * tl.sum(g32 * _mm(Ct, tl.trans(H), PREC=PREC, UP=UP), axis=1))
        xt = _load_rows(x_ptr, bb * sx_b + hh * sx_h, tt, sx_l, p_off, sx_p, vt, hdim).to(DT)
        decay = tl.exp(tl.minimum(cst[:, None] - cst[None, :], 0.0))
        wgt = tl.where(keep, _mm(g32.to(DT), tl.trans(xt), PREC=PREC, UP=UP) * decay, 0.0)
        wgt = wgt * tl.load(dtp_ptr + row + jt)[None, :]
        dC = _mm(wgt.to(DT), Bt, dC, PREC=PREC, UP=UP)
        R = wgt * cbd
        # c1[t, k] = sum_{s<k} R[t, s], kept where t >= k; then the earlier s blocks' pairs with t >= k
        c1 = _mm(R.to(DT), ones_before, PREC=PREC, UP=UP)
        diag = tl.sum(tl.where(at_or_after, c1, 0.0), axis=0)
        rs = tl.sum(tl.where(hv[None, :] == i, rs_all, 0.0), axis=1)
        diag += tl.sum(tl.where(at_or_after, rs[:, None], 0.0), axis=0)
        dap_row = ((bb * nheads + hh) * n_chunks + c) * NB * Q
        tl.store(dap_ptr + dap_row + m * Q + m * BLK + ar, diag)
    tl.store(dCp_ptr + (((bb * n_splits + sp) * seqlen + tt[:, None]) * ngroups + gg) * dstate + n_off[None, :],
             dC.to(dCp_ptr.dtype.element_ty), mask=vt[:, None] & (n_off < dstate)[None, :])


@triton.jit
def _bwd_ddt_kernel(dt_ptr, bias_ptr, A_ptr, dtp_ptr, q_ptr, zs_ptr, rin_ptr, dap_ptr, K_ptr, ddt_ptr, dAp_ptr,
                    dbp_ptr, sdt_b, sdt_l, sdt_h, nheads, seqlen, Lp, n_chunks,
                    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, Q: tl.constexpr,
                    BH: tl.constexpr):
    """da[k] = dL/d(dt[k] A) = (pairs s < k <= t, summed over the t blocks) + sum_{t>=k} r_in[t]
    + sum_{s<k} Z[s] + K (the chunk decay's term); ddt = q + A da (through softplus), and this chunk's parts
    of dA = sum da dt and of ddt_bias. One program per (chunk, batch, block of BH heads), as ``_dt_kernel``."""
    c = tl.program_id(0)
    bb = tl.program_id(1).to(tl.int64)
    hh = tl.program_id(2) * BH + tl.arange(0, BH)
    hm = hh < nheads
    ar = tl.arange(0, Q)
    j = c.to(tl.int64) * Q + ar
    valid = j < seqlen
    t = _pos(j, seqlen, REVERSE)
    pid = bb * nheads + hh  # (BH,) rows of the (b h, Lp) buffers
    off = pid[None, :] * Lp + j[:, None]
    rm = hm[None, :]
    d = tl.load(dtp_ptr + off, mask=rm, other=0.0)
    q = tl.load(q_ptr + off, mask=rm, other=0.0)
    K = tl.load(K_ptr + pid * n_chunks + c, mask=hm, other=0.0)
    da = tl.load(dap_ptr + off, mask=rm, other=0.0)
    # forward scans only (Triton's reverse scan has an open wrong-result report, triton-lang/triton#4362)
    rin = tl.load(rin_ptr + off, mask=rm, other=0.0)
    da += tl.sum(rin, axis=0)[None, :] - tl.cumsum(rin, axis=0) + rin  # sum over t >= k
    zz = tl.load(zs_ptr + off, mask=rm, other=0.0)
    da += tl.cumsum(zz, axis=0) - zz + K[None, :]  # sum over s < k
    A = tl.load(A_ptr + hh, mask=hm, other=0.0).to(tl.float32)
    tl.store(dAp_ptr + pid * n_chunks + c, tl.sum(tl.where(valid[:, None], da * d, 0.0), axis=0), mask=hm)
    ddt = q + A[None, :] * da
    m = valid[:, None] & rm
    if SOFTPLUS:
        raw = tl.load(dt_ptr + bb * sdt_b + t[:, None] * sdt_l + hh[None, :] * sdt_h, mask=m,
                      other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw += tl.load(bias_ptr + hh, mask=hm, other=0.0).to(tl.float32)[None, :]
        ddt = ddt * _sigmoid(raw)
    ddt = tl.where(m, ddt, 0.0)
    if HAS_BIAS:
        tl.store(dbp_ptr + pid * n_chunks + c, tl.sum(ddt, axis=0), mask=hm)
    tl.store(ddt_ptr + (bb * seqlen + t)[:, None] * nheads + hh[None, :], ddt.to(ddt_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------- launchers

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# Triton 3.6's interpreter multiplies bf16 tl.dot operands as garbage: interpreted copies (CPU tests) round the
# operands to the half type as the GPU does and multiply them in fp32 (UP).
_INTERPRETED = __name__.endswith("__interpreted")


def _state_dtype(x, B, C):
    """Storage of the chunk-entry states and of G_out: bf16 where the tl.dot operands are bf16 (STATE_HALF),
    else fp32. fp16 keeps fp32 (a state may exceed fp16's range)."""
    half = STATE_HALF and x.dtype == torch.bfloat16 and torch.float32 not in (B.dtype, C.dtype)
    return torch.bfloat16 if half else torch.float32


def _tf32_allowed():
    """torch's switch for fp32 matmuls on CUDA (``torch.backends.cuda.matmul.fp32_precision``, also set by
    ``torch.set_float32_matmul_precision("high")`` and the legacy ``allow_tf32``); read through the new API,
    which never raises on a mix of the two."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


def _dot_dtype(x, B, C):
    """tl.dot operand type and precision: fp32 if any of x, B, C is fp32 (FP32_PREC, or TF32 where torch allows
    it for fp32 matmuls, as for the reference's einsums), else x's half type."""
    if torch.float32 in (x.dtype, B.dtype, C.dtype):
        return dict(DT=tl.float32, PREC="tf32" if _tf32_allowed() else FP32_PREC, UP=False)
    return dict(DT=_TL[x.dtype], PREC="tf32", UP=_INTERPRETED)


def _default_block(x, B, C):
    """BLOCK, or BLOCK_FP32's block for fp32 products of that precision."""
    dot = _dot_dtype(x, B, C)
    return BLOCK_FP32[dot["PREC"]] if dot["DT"] == tl.float32 else BLOCK


class _Cfg:
    """Launch geometry shared by the forward and backward of one call."""

    def __init__(self, x, B, chunk, blk, warps):
        b, l, h, p = x.shape
        self.b, self.l, self.h, self.p = b, l, h, p
        self.g, self.n = B.shape[2], B.shape[3]
        self.hpg = h // self.g
        self.Q, self.BLK, self.warps = chunk, blk, warps
        if chunk % blk:
            raise ValueError(f"ssd_scan (triton): the chunk {chunk} must be a multiple of the block {blk}")
        self.nc = max(triton.cdiv(l, chunk), 1)
        self.Lp = self.nc * chunk
        self.NB = chunk // blk
        self.BP = max(triton.next_power_of_2(p), 16)
        self.BN = max(triton.next_power_of_2(self.n), 16)
        self.size = p * self.n
        self.BS = min(STATE_BLOCK, triton.next_power_of_2(self.size))
        self.n_sblocks = triton.cdiv(self.size, self.BS)
        self.BH = min(triton.next_power_of_2(h), DT_HEADS)
        # the (heads, heads a group, length, padded length, chunks, p, n) arguments every chunk kernel takes
        self.dims = (h, self.hpg, l, self.Lp, self.nc, p, self.n)


def _strides4(t):
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _seq_args(seq_idx, dummy):
    return (seq_idx, seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (dummy, 0, 0)


def _fwd(x, dt, A, B, C, D, z, dt_bias, softplus, h0, reverse, seq_idx, store_pre, chunk, blk, warps):
    """Returns y, final_state (b, h, p, n) fp32, y_pre (or None), dt' and cs ((b h, Lp) fp32, scan order),
    and the states entering each chunk (b, chunks, h, p, n) in ``_state_dtype`` (in runs of chunks: only with
    ``store_pre``, the backward's inputs; else a placeholder)."""
    cfg = _Cfg(x, B, chunk, blk, warps)
    b, l, h, p, nc = cfg.b, cfg.l, cfg.h, cfg.p, cfg.nc
    dev = x.device
    f32 = dict(device=dev, dtype=torch.float32)
    dot = _dot_dtype(x, B, C)
    dummy = torch.empty(1, **f32)
    seq = _seq_args(seq_idx, dummy)
    common = dict(REVERSE=reverse, HAS_SEQ=seq_idx is not None, Q=cfg.Q)
    dtp = torch.empty(b * h, cfg.Lp, **f32)
    cs = torch.empty(b * h, cfg.Lp, **f32)
    _dt_kernel[(nc, b, triton.cdiv(h, cfg.BH))](dt, A, dt_bias if dt_bias is not None else dummy, dtp, cs,
                                                *dt.stride(), h, l, cfg.Lp, HAS_BIAS=dt_bias is not None,
                                                SOFTPLUS=softplus, REVERSE=reverse, Q=cfg.Q, BH=cfg.BH)
    blocks = dict(BLK=cfg.BLK, BP=cfg.BP, BN=cfg.BN, **dot)
    h0c = h0.float().contiguous() if h0 is not None else dummy
    y = torch.empty(b, l, h, p, device=dev, dtype=x.dtype)
    ypre = torch.empty_like(y) if (store_pre and z is not None) else None
    flags = dict(HAS_D=D is not None, D_HP=D is not None and D.dim() == 2, HAS_Z=z is not None,
                 STORE_PRE=ypre is not None, **common, **blocks)
    run = _state_run(cfg)
    if run:
        hr, ht = _run_states(x, B, dtp, cs, h0c, h0 is not None, seq, cfg, common, blocks, run)
        st = torch.empty(b, nc, h, p, cfg.n, device=dev, dtype=_state_dtype(x, B, C)) if store_pre else dummy
    else:
        st, ht = _states_by_chunk(x, B, C, dtp, cs, h0c, h0 is not None, seq, cfg, common, blocks)
    args = (x, B, C, D if D is not None else dummy, z if z is not None else dummy, y,
            ypre if ypre is not None else y, dtp, cs, st, seq[0], *x.stride(), *B.stride(), *C.stride(),
            *_strides4(z), *y.stride()[:3], *seq[1:], *cfg.dims)
    if run:
        flags["BLK"] = _run_out_block(cfg, dot)
        _run_out_kernel[(hr.shape[1] * b * h,)](*args, hr, b * h, hr.shape[1], **flags, RUN=run, STATES=store_pre,
                                                num_warps=RUN_OUT_WARPS, num_stages=RUN_OUT_STAGES)
    elif _out_heads(cfg) == 2:
        _chunk_out_pair_kernel[(nc * cfg.NB * b * h // 2,)](*args, b * h // 2, **flags, num_warps=OUT_WARPS,
                                                            num_stages=OUT_STAGES, PREFETCH=_prefetch_ok(x, B, C, cfg))
    else:
        grid = (nc * cfg.NB * b * h,) if HEADS_FIRST else (nc * cfg.NB, b * h)
        _chunk_out_kernel[grid](*args, b * h, **flags, FACTOR=FACTOR, HEADS_FIRST=HEADS_FIRST, num_warps=warps,
                                num_stages=STAGES)
    return y, ht, ypre, dtp, cs, st


def _prefetch_ok(x, B, C, cfg):
    """Whether the pair output kernel's L2 prefetches apply: OUT_PREFETCH, compiled (not interpreted), 16-bit x,
    B and C with unit strides along p and n, p <= 64 and n <= 128 (the lines it names cover such rows)."""
    return (OUT_PREFETCH and not _INTERPRETED and all(t.element_size() == 2 for t in (x, B, C))
            and x.stride(3) == 1 and B.stride(3) == 1 and C.stride(3) == 1 and cfg.p <= 64 and cfg.n <= 128)


def _state_run(cfg):
    """Chunks per run of the forward (``_run_out_kernel``): the longest of STATE_RUN, STATE_RUN / 2, ...
    RUN_OUT_SHORTEST shorter than the row that gives RUN_OUT_MIN_PROGRAMS programs; 0 (the chunk path) if none
    does or RUN_OUT is off."""
    run = STATE_RUN if RUN_OUT else 0
    while run and run >= RUN_OUT_SHORTEST:
        if cfg.nc > run and cfg.b * cfg.h * triton.cdiv(cfg.nc, run) >= RUN_OUT_MIN_PROGRAMS:
            return run
        run //= 2
    return 0


def _run_out_block(cfg, dot):
    """Block of ``_run_out_kernel``: RUN_OUT_BLOCK, else the forward's block (16-bit products) or
    RUN_OUT_BLOCK_FP32, at most the forward's (fp32 products)."""
    if RUN_OUT_BLOCK:
        return RUN_OUT_BLOCK
    return min(RUN_OUT_BLOCK_FP32, cfg.BLK) if dot["DT"] == tl.float32 else cfg.BLK


def _states_by_chunk(x, B, C, dtp, cs, h0, has_h0, seq, cfg, common, blocks):
    """The states entering each chunk and the final state: the chunks' local states (fp32), then a pass over
    the chunks."""
    b, h, p, n, nc = cfg.b, cfg.h, cfg.p, cfg.n, cfg.nc
    f32 = dict(device=x.device, dtype=torch.float32)
    loc = torch.empty(b, nc, h, p, n, **f32)
    grid = (nc * b * h,) if HEADS_FIRST else (nc, b * h)
    _chunk_state_kernel[grid](x, B, dtp, cs, loc, seq[0], *x.stride(), *B.stride(), *seq[1:], *cfg.dims, b * h,
                              **common, **blocks, HEADS_FIRST=HEADS_FIRST, num_warps=cfg.warps, num_stages=STAGES)
    sdt = _state_dtype(x, B, C)
    st = loc if sdt == torch.float32 else torch.empty(b, nc, h, p, n, device=x.device, dtype=sdt)
    ht = torch.empty(b, h, p, n, **f32)
    _state_pass_kernel[(b * h, cfg.n_sblocks)](loc, st, ht, cs, h0, *seq, h, cfg.l, cfg.Lp, nc, cfg.size,
                                               HAS_H0=has_h0, **common, BS=cfg.BS, U=STATE_UNROLL, num_warps=4)
    return st, ht


def _run_states(x, B, dtp, cs, h0, has_h0, seq, cfg, common, blocks, run):
    """``_chunk_state_run_kernel`` over runs of ``run`` chunks, then the pass over the runs: the states entering
    the runs (b, runs, h, p, n) and the final state (b, h, p, n), fp32."""
    b, h, p, n = cfg.b, cfg.h, cfg.p, cfg.n
    f32 = dict(device=x.device, dtype=torch.float32)
    n_runs = triton.cdiv(cfg.nc, run)
    agg = torch.empty(b, n_runs, h, p, n, **f32)
    dagg = torch.empty(b * h, n_runs, **f32)
    _chunk_state_run_kernel[(n_runs * b * h,)](x, B, dtp, cs, agg, dagg, seq[0], *x.stride(), *B.stride(), *seq[1:],
                                               *cfg.dims, b * h, n_runs, **common, **blocks, RUN=run,
                                               num_warps=cfg.warps, num_stages=STAGES)
    hr = torch.empty_like(agg)
    ht = torch.empty(b, h, p, n, **f32)
    _run_pass_kernel[(b * h, cfg.n_sblocks)](agg, dagg, hr, ht, h0, h, n_runs, cfg.size, HAS_H0=has_h0, BS=cfg.BS,
                                             num_warps=4)
    return hr, ht


def _out_heads(cfg):
    """Heads per program of the forward's output kernel: OUT_HEADS (1 or 2) where it divides h / g, else 1."""
    return 2 if OUT_HEADS == 2 and cfg.hpg % 2 == 0 else 1


def _splits(cfg, target=None):
    """Heads of a group per backward program: split a group's heads (a divisor of h/g) until enough run."""
    target = target or TARGET_PROGRAMS
    base = cfg.b * cfg.g * cfg.nc * cfg.NB
    for s in range(1, cfg.hpg + 1):
        if cfg.hpg % s == 0 and base * s >= target:
            return s
    return cfg.hpg


def _bwd(x, dt, A, B, C, D, z, dt_bias, softplus, reverse, seq_idx, ypre, dtp, cs, st, dy, dht, chunk, blk,
         warps, splits=0):
    """Gradients (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_state fp32), None where the input is None."""
    cfg = _Cfg(x, B, chunk, blk, warps)
    b, l, h, p, n, g, nc = cfg.b, cfg.l, cfg.h, cfg.p, cfg.n, cfg.g, cfg.nc
    dev = x.device
    f32 = dict(device=dev, dtype=torch.float32)
    dot = _dot_dtype(x, B, C)
    dummy = torch.empty(1, **f32)
    seq = _seq_args(seq_idx, dummy)
    common = dict(REVERSE=reverse, HAS_SEQ=seq_idx is not None, Q=cfg.Q)
    blocks = dict(BLK=cfg.BLK, BP=cfg.BP, BN=cfg.BN, **dot)
    dy = dy.to(x.dtype).contiguous()
    so = dy.stride()[:3]
    gbuf = torch.empty_like(dy) if z is not None else dy
    gl = torch.empty(b, nc, h, p, n, **f32)
    grid = (nc * b * h,) if HEADS_FIRST else (nc, b * h)
    _bwd_gloc_kernel[grid](dy, z if z is not None else dummy, C, gbuf, cs, gl, seq[0], *_strides4(z), *C.stride(),
                           *so, *seq[1:], *cfg.dims, b * h, HAS_Z=z is not None, **common, **blocks,
                           HEADS_FIRST=HEADS_FIRST, num_warps=warps, num_stages=STAGES)
    kp = torch.empty(b * h, cfg.n_sblocks, nc, **f32)
    dh0 = torch.empty(b, h, p, n, **f32)
    dht_c = dht.float().contiguous() if dht is not None else None
    gst = gl if st.dtype == torch.float32 else torch.empty(b, nc, h, p, n, device=dev, dtype=st.dtype)
    _bwd_state_pass_kernel[(b * h, cfg.n_sblocks)](gl, gst, st, cs, dht_c if dht_c is not None else dummy, dh0,
                                                   kp, *seq, h, l, cfg.Lp, nc, cfg.size, cfg.n_sblocks,
                                                   HAS_DHT=dht is not None, **common, BS=cfg.BS, U=STATE_UNROLL,
                                                   num_warps=4)
    del gl  # freed here when G_out is kept in bf16
    if splits and cfg.hpg % splits:
        raise ValueError(f"ssd_scan (triton): splits={splits} must divide the {cfg.hpg} heads of a group")
    ns = splits or _splits(cfg)
    dx = torch.empty(b, l, h, p, device=dev, dtype=x.dtype)
    dz = torch.empty(b, l, h, p, device=dev, dtype=z.dtype) if z is not None else None
    q = torch.empty(b * h, cfg.Lp, **f32)
    zs = torch.empty(b * h, cfg.Lp, **f32)
    # dB and dC partials per split, fp32; one split writes dB and dC themselves, in B's and C's dtypes
    dBp = torch.empty(b, ns, l, g, n, device=dev, dtype=B.dtype if ns == 1 else torch.float32)
    dDp = torch.empty(b, nc * cfg.NB, h, cfg.BP, **f32) if D is not None else None
    kw = dict(**common, **blocks, HEADS_FIRST=HEADS_FIRST, num_warps=warps, num_stages=STAGES_BWD or STAGES)
    n_prog = b * g * ns  # programs per block of positions
    grid = (nc * cfg.NB * n_prog,) if HEADS_FIRST else (nc * cfg.NB, n_prog)
    gdims = (h, g, cfg.hpg, cfg.hpg // ns, ns, l, cfg.Lp, nc, p, n, n_prog)
    _bwd_dx_dB_kernel[grid](
        x, B, C, D if D is not None else dummy, z if z is not None else dummy, dy, gbuf,
        ypre if ypre is not None else dummy, dtp, cs, gst, seq[0], dx, dz if dz is not None else dummy, dBp, q, zs,
        dDp if dDp is not None else dummy, *x.stride(), *B.stride(), *C.stride(), *_strides4(z), *so, *seq[1:],
        *gdims, HAS_D=D is not None, D_HP=D is not None and D.dim() == 2, HAS_Z=z is not None, FACTOR=FACTOR, **kw)
    dCp = torch.empty(b, ns, l, g, n, device=dev, dtype=C.dtype if ns == 1 else torch.float32)
    rin = torch.empty(b * h, cfg.Lp, **f32)
    dap = torch.zeros(b * h, nc, cfg.NB, cfg.Q, **f32)  # [t block, k]: only blocks k <= t block are written
    _bwd_dC_kernel[grid](x, B, C, gbuf, dtp, cs, st, seq[0], dCp, rin, dap, *x.stride(), *B.stride(), *C.stride(),
                         *so, *seq[1:], *gdims, **kw, HB=triton.next_power_of_2(cfg.hpg // ns))
    ddt = torch.empty(b, l, h, device=dev, dtype=dt.dtype)
    dAp = torch.empty(b * h, nc, **f32)
    dbp = torch.empty(b * h, nc, **f32) if dt_bias is not None else None
    _bwd_ddt_kernel[(nc, b, triton.cdiv(h, cfg.BH))](dt, dt_bias if dt_bias is not None else dummy, A, dtp, q, zs,
                                                     rin, dap.sum(2), kp.sum(1), ddt, dAp,
                                                     dbp if dbp is not None else dummy, *dt.stride(), h, l, cfg.Lp,
                                                     nc, HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus,
                                                     REVERSE=reverse, Q=cfg.Q, BH=cfg.BH)
    dB = dBp.sum(1).to(B.dtype) if ns > 1 else dBp[:, 0]
    dC = dCp.sum(1).to(C.dtype) if ns > 1 else dCp[:, 0]
    dA = dAp.view(b, h, nc).sum((0, 2)).to(A.dtype)
    dD = None
    if D is not None:
        dD = dDp.sum((0, 1))[:, :p]
        dD = (dD if D.dim() == 2 else dD.sum(1)).to(D.dtype)
    dbias = dbp.view(b, h, nc).sum((0, 2)).to(dt_bias.dtype) if dt_bias is not None else None
    return dx, ddt, dA, dB, dC, dD, dz, dbias, dh0


# ------------------------------------------------------------------ torch.library registration (torch.compile)
# torch.compile sees each direction as one opaque node with a registered backward (no graph break). A copy of
# this module loaded under the Triton interpreter (tests) registers its own names.
_OPS = "seqmamba::ssd" + ("_interp" if __name__.endswith("__interpreted") else "")
_T = torch.Tensor


def _empty(ref):
    return ref.new_empty(0, dtype=torch.float32)


def _ssd_fwd_impl(x: _T, dt: _T, A: _T, B: _T, C: _T, D: _T | None, z: _T | None, dt_bias: _T | None,
                  initial_state: _T | None, seq_idx: _T | None, softplus: bool, reverse: bool, save: bool,
                  chunk: int, blk: int, warps: int, blk_bwd: int, warps_bwd: int,
                  splits: int) -> tuple[_T, _T, _T, _T, _T, _T]:
    """Forward. ``blk_bwd``, ``warps_bwd`` and ``splits`` (the number of programs per group of heads; 0:
    automatic) are the backward's launch parameters, kept for it."""
    y, ht, ypre, dtp, cs, st = _fwd(x, dt, A, B, C, D, z, dt_bias, softplus, initial_state, reverse, seq_idx,
                                    save, chunk, blk, warps)
    if not save:
        return y, ht, _empty(x), _empty(x), _empty(x), _empty(x)
    return y, ht, ypre if ypre is not None else _empty(x), dtp, cs, st


_ssd_fwd_op = torch.library.custom_op(_OPS + "_fwd", _ssd_fwd_impl, mutates_args=())


@_ssd_fwd_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, softplus, reverse, save, chunk, blk, warps, blk_bwd,
      warps_bwd, splits):
    b, l, h, p = x.shape
    n = B.shape[3]
    nc = max(-(-l // chunk), 1)
    f32 = dict(dtype=torch.float32)
    if not save:
        return x.new_empty(b, l, h, p), x.new_empty(b, h, p, n, **f32), *(_empty(x) for _ in range(4))
    ypre = x.new_empty(b, l, h, p) if z is not None else _empty(x)
    return (x.new_empty(b, l, h, p), x.new_empty(b, h, p, n, **f32), ypre, x.new_empty(b * h, nc * chunk, **f32),
            x.new_empty(b * h, nc * chunk, **f32), x.new_empty(b, nc, h, p, n, dtype=_state_dtype(x, B, C)))


def _ssd_bwd_impl(x: _T, dt: _T, A: _T, B: _T, C: _T, D: _T | None, z: _T | None, dt_bias: _T | None,
                  initial_state: _T | None, seq_idx: _T | None, ypre: _T | None, dtp: _T, cs: _T, st: _T, dy: _T,
                  dht: _T | None, softplus: bool, reverse: bool, chunk: int, blk: int, warps: int,
                  splits: int) -> list[_T]:
    grads = list(_bwd(x, dt, A, B, C, D, z, dt_bias, softplus, reverse, seq_idx, ypre, dtp, cs, st, dy, dht,
                      chunk, blk, warps, splits))
    grads[-1] = grads[-1].to(initial_state.dtype) if initial_state is not None else None
    return [gr if gr is not None else _empty(x) for gr in grads]


_ssd_bwd_op = torch.library.custom_op(_OPS + "_bwd", _ssd_bwd_impl, mutates_args=())


@_ssd_bwd_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, ypre, dtp, cs, st, dy, dht, softplus, reverse,
      chunk, blk, warps, splits):
    like = [x, dt, A, B, C, D, z, dt_bias, initial_state]
    return [t.new_empty(t.shape) if t is not None else _empty(x) for t in like]


def _ssd_setup(ctx, inputs, output):
    (x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, softplus, reverse, _, chunk, _, _, blk_bwd, warps_bwd,
     splits) = inputs
    y, _, ypre, dtp, cs, st = output
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, ypre if z is not None else None,
                          dtp, cs, st)
    ctx.flags = (softplus, reverse, chunk, blk_bwd, warps_bwd, splits)
    # outputs without a gradient (the saved dt', cs and states, often y or the final state) arrive as None
    # rather than as zero tensors of their sizes (the states alone are 1.6 GB at b1 l2^20 24x64 n128)
    ctx.set_materialize_grads(False)


def _ssd_backward(ctx, dy, dht, *_):
    x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, ypre, dtp, cs, st = ctx.saved_tensors
    softplus, reverse, chunk, blk, warps, splits = ctx.flags
    if dy is None:
        dy = torch.zeros_like(x)
    grads = _ssd_bwd_call(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, ypre, dtp, cs, st, dy, dht,
                          softplus, reverse, chunk, blk, warps, splits)
    present = [x, dt, A, B, C, D, z, dt_bias, initial_state]
    grads = [gr if t is not None else None for gr, t in zip(grads, present)]
    return (*grads, None, None, None, None, None, None, None, None, None, None)


_ssd_fwd_op.register_autograd(_ssd_backward, setup_context=_ssd_setup)
_ssd_fwd_call = EagerCustomOp(_ssd_fwd_op, _ssd_fwd_impl, _ssd_setup, _ssd_backward)
_ssd_bwd_call = EagerCustomOp(_ssd_bwd_op, _ssd_bwd_impl)


def ssd_scan_triton(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
                    initial_state=None, return_final_state=False, reverse=False, seq_idx=None, _tuning=None):
    """Triton implementation with :func:`ssd_scan_ref`'s signature (``chunk_size`` is ignored: the kernels
    use ``CHUNK``). Inputs fp32/bf16/fp16 on a CUDA device (or any device under TRITON_INTERPRET=1), assumed
    validated by the caller. Runs as the custom ops ``seqmamba::ssd_fwd/_bwd`` (torch.compile sees one node
    each way). ``_tuning`` (tests, benchmarks): a dict of any of chunk, blk, warps, blk_bwd, warps_bwd (the
    backward's; default the forward's) and splits (the backward's programs per group of heads, a divisor of
    h / g; 0 picks).

    Returns y (b, l, h, p) in x's dtype, or (y, final_state (b, h, p, n) fp32)."""
    if x.shape[1] == 0:  # nothing to scan: the reference handles the empty length
        return ssd_scan_ref(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_state,
                            return_final_state, reverse, seq_idx)
    t = _tuning or {}
    tensors = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    save = torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in tensors)
    blk, warps = int(t.get("blk") or _default_block(x, B, C)), int(t.get("warps", WARPS))
    y, ht, *_ = _ssd_fwd_call(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, bool(dt_softplus),
                              bool(reverse), save, int(t.get("chunk", CHUNK)), blk, warps,
                              int(t.get("blk_bwd", BLOCK_BWD or blk)), int(t.get("warps_bwd", WARPS_BWD or warps)),
                              int(t.get("splits", 0)))
    return (y, ht) if return_final_state else y
