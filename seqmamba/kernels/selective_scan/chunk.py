"""Triton selective scan, chunked over the length (forward and backward).

Same math as :func:`seqmamba.kernels.selective_scan.ref.selective_scan_ref`. The length is cut into tiles
of ``T`` positions (a tile is scanned in registers with ``tl.associative_scan``) and tiles are grouped into
chunks; one program walks the tiles of one chunk for a block of ``BD`` channels, carrying the (BD, n) state.

Forward, in scan order (``reverse`` only changes the address of position j: t = j or l-1-j; nothing is
flipped in memory):
  1. ``_fwd_kernel`` MODE 0 (only with more than one chunk): each chunk scanned from a zero state gives its
     local end state and sum(dt) (the decay over the chunk is exp(A * sum dt), one exp per channel and state);
  2. ``_fwd_state_kernel``: one sequential pass over the chunk summaries gives every chunk's start state;
  3. ``_fwd_kernel`` MODE 1: each chunk rescanned from its start state writes y, the chunk's end state
     (the last one is the final state) and, under autograd, the state at every tile start (b, l/T, d, n):
     the backward recomputes everything else from these, never storing (b, d, l, n).

Backward: with g_t = dL/dh_t (all paths), g_t = dy_t C_t + exp(dt_{t+1} A) g_{t+1}, g_l = dht.
  1. ``_bwd_sum_kernel`` + ``_bwd_state_kernel``: the same summary / state-passing trick from the right gives
     g at the end of each backward chunk;
  2. ``_bwd_kernel``: one program per (batch, group, channel split, chunk) walks its tiles right to left and,
     for each tile, every channel block of its share of the group: recomputes h from the saved tile state,
     g from the carried one, and writes du, ddelta, dz; dB and dC (summed over the channels of the group) are
     accumulated in registers, dA, dD, ddelta_bias into per-chunk slots that only this program touches. No
     atomics anywhere: the backward is deterministic (summed in a fixed order by torch afterwards).

Accumulation is fp32 for every input dtype; all offsets are 64-bit.

Default path and determinism: the custom ops below (``selective_scan_triton``, the bidirectional call) run the
single-pass blocked kernels of ``blocked_fwd.py`` / ``blocked_bwd.py`` (except a no-grad forward on
channel-last delta: see ``blocked_default``; the forward keeps only the state entering each chunk of ``T``
positions, (b, l/T, d, n); the backward walks the chunks right to left and adds dB, dC into fp32 buffers
with atomics, so its dB, dC vary in the last bits from run to run). When
``torch.are_deterministic_algorithms_enabled()``, the whole op runs the kernels of this file instead (forward
with tile states, tile or sequential backward: no atomics, bitwise reproducible). ``_tuning`` (tests,
benchmarks) selects this file's kernels too, or the blocked pair with ``blocked=True``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from seqmamba.kernels._dispatch import EagerCustomOp, kernel_module
from seqmamba.kernels.selective_scan.ref import _grouped


_common = kernel_module("seqmamba.kernels._triton_common", __name__)
_softplus, _combine, _keep = _common.softplus, _common.affine_combine, _common.continues_sequence
_blocked_fwd_mod = kernel_module("seqmamba.kernels.selective_scan.blocked_fwd", __name__)
_blocked_bwd_mod = kernel_module("seqmamba.kernels.selective_scan.blocked_bwd", __name__)

LOG2E = 1.4426950408889634

# Tile length, channel block caps and warps per program: the best of a sweep on an H100 (benchmarks/kernels.py
# --sweep and --sweep-programs; short tiles and one warp won, Triton's scan being cheapest inside a warp);
# programs aimed for.
TILE = 16
MAX_BD_FWD = 4
MAX_BD_BWD = 2
WARPS_FWD = 1
WARPS_BWD = 1
TARGET_PROGRAMS = 2048
# The sequential forward kernel (``_fwd_seq_kernel``): channels per program, warps, programs aimed for.
# "auto" takes it when few channels (batch * d) must be spread over the length: on an H100 it beat the tile
# scan at b1 d1536 (4.7 vs 7.1 ms at 64k tokens) and lost at b8 d1536 l2048 (1.24 vs 0.96 ms).
FWD_KERNEL = "auto"
# "seq": the state held as (channels, n); "seqt": as (n, channels), a warp's threads along the channels with
# every n of a channel in one thread (NFIRST); "auto": seqt for channel-last delta (the mixer's layout), where an
# H100 measured it 15% faster (b1 d1536 l2^20 30.5 vs 35.7 ms, b8 l2048 0.52 vs 0.61 ms), seq otherwise (on
# l-contiguous inputs each thread of seqt reads its own cache line a step: 302 vs 92 ms).
# SEQMAMBA_SCAN_SEQ_VARIANT overrides it (benchmarks).
SEQ_VARIANT = os.environ.get("SEQMAMBA_SCAN_SEQ_VARIANT", "auto")
# Backward kernel: "tile" (_bwd_kernel), "seq" (_bwd_seq_kernel; only after the state-first forward and without
# seq_idx, else tile) or "auto": seq where its (b, channel blocks, g, n, l) fp32 dB/dC partials stay under
# BWD_SEQ_MAX_PARTIAL_BYTES, tile otherwise. H100, same run, fwd+bwd on the mixer's layout: b8 d1536 l2048
# 6.65 -> 6.13 ms, b1 d1536 l2^20 483 -> 346 ms (gradients within 2e-6 of the tile kernel's in fp32), but the
# partials at 2^20 take 6.4 GB (tile: 0.13 GB); bwd_splits (several blocks a program, read-modify-write of
# fewer partials) cuts them and is not yet timed. SEQMAMBA_SCAN_BWD overrides the choice.
BWD_KERNEL = os.environ.get("SEQMAMBA_SCAN_BWD", "auto")
BWD_SEQ_MAX_PARTIAL_BYTES = 1 << 30
MAX_BD_BWD_SEQ = 32
WARPS_BWD_SEQ = 1
BWD_SEQ_SPLITS = None  # None: one channel block a program (no read-modify-write of the dB/dC partials)
MAX_BD_SEQT = 128
WARPS_SEQT = 1
SEQ_MAX_CHANNELS = 8192
MAX_BD_SEQ = 128
WARPS_SEQ = 4
SEQ_PROGRAMS = 1024


@triton.jit
def _dt_tile(delta_ptr, row_off, t_off, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(BD, T) raw delta tile -> (dl = delta + bias, dt); dt is 0 where masked (an identity step)."""
    dl = tl.load(delta_ptr + row_off[:, None] + t_off[None, :], mask=mask, other=0.0).to(tl.float32)
    return _common.delta_to_dt(dl, mask, bias, HAS_BIAS, SOFTPLUS)


@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    hin_ptr, hout_ptr, dtsum_ptr, tstate_ptr,
    su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    sz_b, sz_d, sz_l, sy_b, sy_d, sy_l, seq_ptr, ss_b, ss_l,
    dim, nstate, seqlen, cpg, tiles_per_chunk, n_tiles, n_chunks,
    MODE: tl.constexpr, HAS_HIN: tl.constexpr, SAVE_STATES: tl.constexpr, HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
    HAS_SEQ: tl.constexpr, ACCUM: tl.constexpr,
    BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr,
):
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    ndb = dim // BD
    pb = (pid // ndb).to(tl.int64)
    d_off = ((pid % ndb) * BD + tl.arange(0, BD)).to(tl.int64)  # BD divides d // g: one group per program
    grp = (pid % ndb) * BD // cpg
    n_off = tl.arange(0, BN).to(tl.int64)
    n_mask = n_off < nstate
    dn_mask = n_mask[None, :] & (d_off[:, None] < dim)

    A2 = tl.load(A_ptr + d_off[:, None] * nstate + n_off[None, :], mask=dn_mask,
                 other=0.0).to(tl.float32) * 1.4426950408889634
    bias = tl.zeros([BD], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d_off).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d_off).to(tl.float32)

    # state slots (b, chunk, d, n) fp32, contiguous
    slot = ((pb * n_chunks + chunk) * dim + d_off[:, None]) * nstate + n_off[None, :]
    if HAS_HIN:
        h = tl.load(hin_ptr + slot, mask=dn_mask, other=0.0)
    else:
        h = tl.zeros([BD, BN], dtype=tl.float32)
    dtacc = tl.zeros([BD], dtype=tl.float32)

    u_row = pb * su_b + d_off * su_d
    dl_row = pb * sdl_b + d_off * sdl_d
    B_row = pb * sB_b + grp.to(tl.int64) * sB_g + n_off * sB_n
    C_row = pb * sC_b + grp.to(tl.int64) * sC_g + n_off * sC_n
    ar = tl.arange(0, T)
    is_last = (ar == T - 1)[None, None, :]

    k0 = chunk * tiles_per_chunk
    for kk in range(0, tiles_per_chunk):  # tiles past the end are fully masked: identity steps
        k = k0 + kk
        j = k.to(tl.int64) * T + ar
        valid = j < seqlen
        if REVERSE:
            t = seqlen - 1 - j
        else:
            t = j
        mask = valid[None, :] & (d_off[:, None] < dim)
        if SAVE_STATES:
            tl.store(tstate_ptr + ((pb * n_tiles + k) * dim + d_off[:, None]) * nstate + n_off[None, :], h,
                     mask=dn_mask & (k < n_tiles))
        _, dt = _dt_tile(delta_ptr, dl_row, t * sdl_l, mask, bias, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_ptr + u_row[:, None] + t[None, :] * su_l, mask=mask, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + B_row[:, None] + t[None, :] * sB_l, mask=n_mask[:, None] & valid[None, :],
                     other=0.0).to(tl.float32)
        a = tl.exp2(dt[:, None, :] * A2[:, :, None])          # (BD, BN, T)
        if HAS_SEQ:  # a new sequence starts: the carried state is multiplied by 0
            if REVERSE:
                tp = t + 1
            else:
                tp = t - 1
            keep = _keep(seq_ptr, pb * ss_b, t, tp, valid & (j > 0), ss_l)
            a = tl.where(keep[None, None, :], a, 0.0)
            dt_sum = tl.where(keep[None, :], dt, float("inf"))
        else:
            dt_sum = dt
        bx = (dt * u)[:, None, :] * Bt[None, :, :]
        ca, hs = tl.associative_scan((a, bx), 2, _combine)
        hh = hs + ca * h[:, :, None]
        h = tl.sum(tl.where(is_last, hh, 0.0), axis=2)
        if MODE == 0:
            dtacc += tl.sum(dt_sum, axis=1)
        else:
            Ct = tl.load(C_ptr + C_row[:, None] + t[None, :] * sC_l, mask=n_mask[:, None] & valid[None, :],
                         other=0.0).to(tl.float32)
            y = tl.sum(hh * Ct[None, :, :], axis=1)            # (BD, T)
            if HAS_D:
                y += Dv[:, None] * u
            if HAS_Z:
                zz = tl.load(z_ptr + (pb * sz_b + d_off * sz_d)[:, None] + t[None, :] * sz_l, mask=mask,
                             other=0.0).to(tl.float32)
                y = y * zz * _common.sigmoid(zz)
            y_off = (pb * sy_b + d_off * sy_d)[:, None] + t[None, :] * sy_l
            if ACCUM:  # add to what y holds (the other direction of a bidirectional call)
                y += tl.load(y_ptr + y_off, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(hout_ptr + slot, h, mask=dn_mask)
    if MODE == 0:
        tl.store(dtsum_ptr + (pb * n_chunks + chunk) * dim + d_off, dtacc)


@triton.jit
def _seq_load(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, u_row, dl_row, B_row, C_row, z_row, su_l, sdl_l, sB_l, sC_l,
              sz_l, j, seqlen, dmask, n_mask, MODE: tl.constexpr, HAS_Z: tl.constexpr, REVERSE: tl.constexpr):
    """The inputs of scan position j (fp32; zeros past the end)."""
    valid = j < seqlen
    if REVERSE:
        t = seqlen - 1 - j
    else:
        t = j
    m = dmask & valid
    u = tl.load(u_ptr + u_row + t * su_l, mask=m, other=0.0).to(tl.float32)
    dl = tl.load(delta_ptr + dl_row + t * sdl_l, mask=m, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + B_row + t * sB_l, mask=n_mask & valid, other=0.0).to(tl.float32)
    Cv = Bv
    zz = u
    if MODE == 1:
        Cv = tl.load(C_ptr + C_row + t * sC_l, mask=n_mask & valid, other=0.0).to(tl.float32)
        if HAS_Z:
            zz = tl.load(z_ptr + z_row + t * sz_l, mask=m, other=0.0).to(tl.float32)
    return u, dl, Bv, Cv, zz, m, valid


@triton.jit
def _dvec(v, NFIRST: tl.constexpr):
    """A per-channel vector broadcast against the (channels, n) state, or the (n, channels) one."""
    if NFIRST:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _nvec(v, NFIRST: tl.constexpr):
    """A per-state (n) vector broadcast against the state (see ``_dvec``)."""
    if NFIRST:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _fwd_seq_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    hin_ptr, hout_ptr, dtsum_ptr, tstate_ptr,
    su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    sz_b, sz_d, sz_l, sy_b, sy_d, sy_l, seq_ptr, ss_b, ss_l,
    dim, nstate, seqlen, cpg, tiles_per_chunk, n_tiles, n_chunks,
    MODE: tl.constexpr, HAS_HIN: tl.constexpr, SAVE_STATES: tl.constexpr, HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
    HAS_SEQ: tl.constexpr, ACCUM: tl.constexpr,
    BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr, NFIRST: tl.constexpr = False,
):
    """``_fwd_kernel``'s contract, one position at a time: a wide block of channels (BD) steps through the
    chunk with its (BD, n) state in registers; no scan tree, no reductions over the tile.

    ``NFIRST``: the state is held as (n, BD), ``A_ptr`` points to A transposed ((n, d) contiguous) and the
    state buffers hin, hout and the tile states hold each (d, n) slot in (n, d) order, so that Triton lays a
    warp's threads along the channels with every n of a channel in one thread: the per-channel work (softplus,
    gate, skip) is not repeated by threads sharing a channel, and the sum over n stays in a thread."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    ndb = dim // BD
    pb = (pid // ndb).to(tl.int64)
    d_off = ((pid % ndb) * BD + tl.arange(0, BD)).to(tl.int64)
    grp = (pid % ndb) * BD // cpg
    n_off = tl.arange(0, BN).to(tl.int64)
    n_mask = n_off < nstate
    dmask = d_off < dim
    dn_mask = _nvec(n_mask, NFIRST) & _dvec(dmask, NFIRST)
    if NFIRST:
        # The state buffers (hin, hout, tile states) hold (n, d) order, so every (n, d) pointer is contiguous
        # along the channels: Triton then puts a warp's threads along the channels (an n-contiguous pointer
        # would put them along n and convert the whole state every step). ``unaligned`` (0, of divisibility 1)
        # keeps it from giving a thread 4 adjacent channels (16-byte vectors), which would split n again.
        unaligned = nstate // nstate - 1
        A_off = n_off[:, None] * dim + d_off[None, :] + unaligned
        dn = d_off[None, :] + n_off[:, None] * dim + unaligned
    else:
        A_off = d_off[:, None] * nstate + n_off[None, :]
        dn = d_off[:, None] * nstate + n_off[None, :]
    A2 = tl.load(A_ptr + A_off, mask=dn_mask, other=0.0).to(tl.float32) * 1.4426950408889634
    bias = tl.zeros([BD], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d_off).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d_off).to(tl.float32)
    slot = (pb * n_chunks + chunk) * dim * nstate + dn
    if HAS_HIN:
        h = tl.load(hin_ptr + slot, mask=dn_mask, other=0.0)
    else:
        h = tl.zeros_like(A2)
    dtacc = tl.zeros([BD], dtype=tl.float32)
    u_row = pb * su_b + d_off * su_d
    dl_row = pb * sdl_b + d_off * sdl_d
    z_row = pb * sz_b + d_off * sz_d
    y_row = pb * sy_b + d_off * sy_d
    B_row = pb * sB_b + grp.to(tl.int64) * sB_g + n_off * sB_n
    C_row = pb * sC_b + grp.to(tl.int64) * sC_g + n_off * sC_n
    # one flat loop over the chunk's positions; the loads of position j+1 are issued before step j computes
    j0 = (chunk * tiles_per_chunk).to(tl.int64) * T
    npos = tiles_per_chunk * T
    u_n, dl_n, B_n, C_n, z_n, m_n, valid_n = _seq_load(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, u_row, dl_row,
                                                        B_row, C_row, z_row, su_l, sdl_l, sB_l, sC_l, sz_l,
                                                        j0, seqlen, dmask, n_mask, MODE, HAS_Z, REVERSE)
    for jj in range(0, npos):
        j = j0 + jj
        u, dl, Bv, Cv, zz, m, valid = u_n, dl_n, B_n, C_n, z_n, m_n, valid_n
        u_n, dl_n, B_n, C_n, z_n, m_n, valid_n = _seq_load(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, u_row, dl_row,
                                                            B_row, C_row, z_row, su_l, sdl_l, sB_l, sC_l, sz_l,
                                                            j + 1, seqlen, dmask, n_mask, MODE, HAS_Z, REVERSE)
        if SAVE_STATES:
            if jj % T == 0:
                k = j // T
                tl.store(tstate_ptr + (pb * n_tiles + k) * dim * nstate + dn, h, mask=dn_mask & (k < n_tiles))
        if HAS_BIAS:
            dl += bias
        if SOFTPLUS:
            dt = _softplus(dl)
        else:
            dt = dl
        dt = tl.where(m, dt, 0.0)
        a = tl.exp2(_dvec(dt, NFIRST) * A2)
        if HAS_SEQ:
            if REVERSE:
                t_c = seqlen - 1 - j
                t_p = t_c + 1
            else:
                t_c = j
                t_p = t_c - 1
            keep = _keep(seq_ptr, pb * ss_b, t_c, t_p, valid & (j > 0), ss_l)
            a = tl.where(keep, a, 0.0)
            dt_sum = tl.where(keep, dt, float("inf"))
        else:
            dt_sum = dt
        h = a * h + _dvec(dt * u, NFIRST) * _nvec(Bv, NFIRST)
        if MODE == 0:
            dtacc += dt_sum
        else:
            if NFIRST:
                y = tl.sum(h * Cv[:, None], axis=0)
            else:
                y = tl.sum(h * Cv[None, :], axis=1)
            if HAS_D:
                y += Dv * u
            if HAS_Z:
                y = y * zz * _common.sigmoid(zz)
            if REVERSE:
                t = seqlen - 1 - j
            else:
                t = j
            if ACCUM:  # add to what y holds (the other direction of a bidirectional call)
                y += tl.load(y_ptr + y_row + t * sy_l, mask=m, other=0.0).to(tl.float32)
            tl.store(y_ptr + y_row + t * sy_l, y.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(hout_ptr + slot, h, mask=dn_mask)
    if MODE == 0:
        tl.store(dtsum_ptr + (pb * n_chunks + chunk) * dim + d_off, dtacc)


@triton.jit
def _fwd_state_kernel(A_ptr, hloc_ptr, dtsum_ptr, h0_ptr, hstart_ptr, dim, nstate, n_chunks,
                      HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
                      NFIRST: tl.constexpr = False):
    """h_start[c] = h; h = exp(A sum dt_c) h + h_loc[c], c = 0..n_chunks-1 (sequential). ``NFIRST``: h_loc and
    h_start slots in (n, d) order (h0 is (b, d, n) either way)."""
    pid = tl.program_id(0)
    ndb = dim // BD
    pb = (pid // ndb).to(tl.int64)
    d_off = ((pid % ndb) * BD + tl.arange(0, BD)).to(tl.int64)
    n_off = tl.arange(0, BN).to(tl.int64)
    m = (n_off < nstate)[None, :] & (d_off[:, None] < dim)
    A2 = tl.load(A_ptr + d_off[:, None] * nstate + n_off[None, :], mask=m,
                 other=0.0).to(tl.float32) * 1.4426950408889634
    dn = d_off[:, None] * nstate + n_off[None, :]
    if NFIRST:
        dnb = d_off[:, None] + n_off[None, :] * dim
    else:
        dnb = dn
    if HAS_H0:
        h = tl.load(h0_ptr + pb * dim * nstate + dn, mask=m, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BD, BN], dtype=tl.float32)
    for c in range(0, n_chunks):
        base = (pb * n_chunks + c) * dim
        tl.store(hstart_ptr + base * nstate + dnb, h, mask=m)
        s = tl.load(dtsum_ptr + base + d_off)
        hl = tl.load(hloc_ptr + base * nstate + dnb, mask=m, other=0.0)
        if HAS_SEQ:  # a chunk holding a reset (dt sum = inf) passes nothing through
            h = tl.where(s[:, None] == float("inf"), 0.0, tl.exp2(A2 * s[:, None])) * h + hl
        else:
            h = tl.exp2(A2 * s[:, None]) * h + hl


@triton.jit
def _bwd_sum_kernel(
    delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dout_ptr, gloc_ptr, dtsum_ptr,
    sdl_b, sdl_d, sdl_l, sC_b, sC_g, sC_n, sC_l, sz_b, sz_d, sz_l, so_b, so_d, so_l, seq_ptr, ss_b, ss_l,
    dim, nstate, seqlen, cpg, tiles_per_chunk, n_tiles, n_chunks,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr,
):
    """Per backward chunk: g at its first position from a zero g beyond its end, and sum of dt_{j+1}."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    ndb = dim // BD
    pb = (pid // ndb).to(tl.int64)
    d_off = ((pid % ndb) * BD + tl.arange(0, BD)).to(tl.int64)
    grp = (pid % ndb) * BD // cpg
    n_off = tl.arange(0, BN).to(tl.int64)
    n_mask = n_off < nstate
    dn_mask = n_mask[None, :] & (d_off[:, None] < dim)
    A2 = tl.load(A_ptr + d_off[:, None] * nstate + n_off[None, :], mask=dn_mask,
                 other=0.0).to(tl.float32) * 1.4426950408889634
    bias = tl.zeros([BD], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d_off).to(tl.float32)
    g = tl.zeros([BD, BN], dtype=tl.float32)
    dtacc = tl.zeros([BD], dtype=tl.float32)
    dl_row = pb * sdl_b + d_off * sdl_d
    C_row = pb * sC_b + grp.to(tl.int64) * sC_g + n_off * sC_n
    ar = tl.arange(0, T)
    is_first = (ar == 0)[None, None, :]
    k0 = chunk * tiles_per_chunk
    for kk in range(0, tiles_per_chunk):  # right to left; tiles past the end are fully masked
        k = k0 + tiles_per_chunk - 1 - kk
        j = k.to(tl.int64) * T + ar
        valid = j < seqlen
        valid_n = (j + 1) < seqlen
        if REVERSE:
            t = seqlen - 1 - j
            t_n = t - 1
        else:
            t = j
            t_n = t + 1
        mask = valid[None, :] & (d_off[:, None] < dim)
        mask_n = valid_n[None, :] & (d_off[:, None] < dim)
        _, dt_n = _dt_tile(delta_ptr, dl_row, t_n * sdl_l, mask_n, bias, HAS_BIAS, SOFTPLUS)
        dy = tl.load(dout_ptr + (pb * so_b + d_off * so_d)[:, None] + t[None, :] * so_l, mask=mask,
                     other=0.0).to(tl.float32)
        if HAS_Z:
            zz = tl.load(z_ptr + (pb * sz_b + d_off * sz_d)[:, None] + t[None, :] * sz_l, mask=mask,
                         other=0.0).to(tl.float32)
            dy = dy * zz * _common.sigmoid(zz)
        Ct = tl.load(C_ptr + C_row[:, None] + t[None, :] * sC_l, mask=n_mask[:, None] & valid[None, :],
                     other=0.0).to(tl.float32)
        a_n = tl.exp2(dt_n[:, None, :] * A2[:, :, None])
        if HAS_SEQ:
            keep_n = _keep(seq_ptr, pb * ss_b, t_n, t, valid_n, ss_l)
            a_n = tl.where(keep_n[None, None, :], a_n, 0.0)
            dt_n = tl.where(keep_n[None, :], dt_n, float("inf"))
        bv = dy[:, None, :] * Ct[None, :, :]
        pa, gs = tl.associative_scan((a_n, bv), 2, _combine, reverse=True)
        gg = gs + pa * g[:, :, None]
        g = tl.sum(tl.where(is_first, gg, 0.0), axis=2)
        dtacc += tl.sum(dt_n, axis=1)
    slot = ((pb * n_chunks + chunk) * dim + d_off[:, None]) * nstate + n_off[None, :]
    tl.store(gloc_ptr + slot, g, mask=dn_mask)
    tl.store(dtsum_ptr + (pb * n_chunks + chunk) * dim + d_off, dtacc)


@triton.jit
def _bwd_state_kernel(A_ptr, gloc_ptr, dtsum_ptr, dht_ptr, gin_ptr, dim, nstate, n_chunks,
                      HAS_DHT: tl.constexpr, HAS_SEQ: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    """g_in[c] = g; g = g_loc[c] + exp(A sum dt_{j+1}) g, c = n_chunks-1..0; g starts as dht."""
    pid = tl.program_id(0)
    ndb = dim // BD
    pb = (pid // ndb).to(tl.int64)
    d_off = ((pid % ndb) * BD + tl.arange(0, BD)).to(tl.int64)
    n_off = tl.arange(0, BN).to(tl.int64)
    m = (n_off < nstate)[None, :] & (d_off[:, None] < dim)
    A2 = tl.load(A_ptr + d_off[:, None] * nstate + n_off[None, :], mask=m,
                 other=0.0).to(tl.float32) * 1.4426950408889634
    dn = d_off[:, None] * nstate + n_off[None, :]
    if HAS_DHT:
        g = tl.load(dht_ptr + pb * dim * nstate + dn, mask=m, other=0.0).to(tl.float32)
    else:
        g = tl.zeros([BD, BN], dtype=tl.float32)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        base = (pb * n_chunks + c) * dim
        tl.store(gin_ptr + base * nstate + dn, g, mask=m)
        s = tl.load(dtsum_ptr + base + d_off)
        gl = tl.load(gloc_ptr + base * nstate + dn, mask=m, other=0.0)
        if HAS_SEQ:
            g = gl + tl.where(s[:, None] == float("inf"), 0.0, tl.exp2(A2 * s[:, None])) * g
        else:
            g = gl + tl.exp2(A2 * s[:, None]) * g


@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, tstate_ptr, gbuf_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    sz_b, sz_d, sz_l, so_b, so_d, so_l, seq_ptr, ss_b, ss_l,
    dim, nstate, seqlen, cpg, n_groups, n_splits, db_per_split, tiles_per_chunk, n_tiles, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr,
    TS_NFIRST: tl.constexpr = False,
):
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    split = pid % n_splits
    grp = (pid // n_splits) % n_groups
    pb = (pid // (n_splits * n_groups)).to(tl.int64)
    ndb_g = cpg // BD
    i0 = split * db_per_split
    n_off = tl.arange(0, BN).to(tl.int64)
    n_mask = n_off < nstate
    ar = tl.arange(0, T)
    is_first = (ar == 0)[None, None, :]
    B_row = pb * sB_b + grp.to(tl.int64) * sB_g + n_off * sB_n
    C_row = pb * sC_b + grp.to(tl.int64) * sC_g + n_off * sC_n
    # dB/dC partials: (b, splits, g, n, l) fp32, contiguous
    dBC_row = ((pb * n_splits + split) * n_groups + grp) * nstate + n_off
    slot_c = pb * n_chunks + chunk

    k0 = chunk * tiles_per_chunk
    for kk in range(0, tiles_per_chunk):  # right to left; tiles past the end are fully masked
        k = k0 + tiles_per_chunk - 1 - kk
        j = k.to(tl.int64) * T + ar
        valid = j < seqlen
        valid_n = (j + 1) < seqlen
        if REVERSE:
            t = seqlen - 1 - j
            t_n = t - 1
        else:
            t = j
            t_n = t + 1
        bc_mask = n_mask[:, None] & valid[None, :]
        if HAS_SEQ:
            if REVERSE:
                tp = t + 1
            else:
                tp = t - 1
            keep = _keep(seq_ptr, pb * ss_b, t, tp, valid & (j > 0), ss_l)
            keep_n = _keep(seq_ptr, pb * ss_b, t_n, t, valid_n, ss_l)
        Bt = tl.load(B_ptr + B_row[:, None] + t[None, :] * sB_l, mask=bc_mask, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + C_row[:, None] + t[None, :] * sC_l, mask=bc_mask, other=0.0).to(tl.float32)
        dB_acc = tl.zeros([BN, T], dtype=tl.float32)
        dC_acc = tl.zeros([BN, T], dtype=tl.float32)
        for ii in range(0, db_per_split):  # channel blocks past the group's end are masked
            i = i0 + ii
            d_off = (grp * cpg + i * BD + tl.arange(0, BD)).to(tl.int64)
            dmask = (tl.arange(0, BD) * 0 + i) < ndb_g
            dn_mask = n_mask[None, :] & dmask[:, None]
            dn = d_off[:, None] * nstate + n_off[None, :]
            mask = valid[None, :] & dmask[:, None]
            mask_n = valid_n[None, :] & dmask[:, None]
            A = tl.load(A_ptr + dn, mask=dn_mask, other=0.0).to(tl.float32)
            A2 = A * 1.4426950408889634
            bias = tl.zeros([BD], dtype=tl.float32)
            if HAS_BIAS:
                bias = tl.load(bias_ptr + d_off, mask=dmask, other=0.0).to(tl.float32)
            dl_row = pb * sdl_b + d_off * sdl_d
            dl, dt = _dt_tile(delta_ptr, dl_row, t * sdl_l, mask, bias, HAS_BIAS, SOFTPLUS)
            _, dt_n = _dt_tile(delta_ptr, dl_row, t_n * sdl_l, mask_n, bias, HAS_BIAS, SOFTPLUS)
            u_off = (pb * su_b + d_off * su_d)[:, None] + t[None, :] * su_l
            u = tl.load(u_ptr + u_off, mask=mask, other=0.0).to(tl.float32)
            o_off = (pb * so_b + d_off * so_d)[:, None] + t[None, :] * so_l
            dout = tl.load(dout_ptr + o_off, mask=mask, other=0.0).to(tl.float32)

            # forward recompute of h inside the tile from the saved tile-start state
            if TS_NFIRST:  # tile states written by the state-first sequential forward: (n, d) order
                ts_dn = d_off[:, None] + n_off[None, :] * dim
            else:
                ts_dn = dn
            h0 = tl.load(tstate_ptr + (pb * n_tiles + k) * dim * nstate + ts_dn, mask=dn_mask & (k < n_tiles),
                         other=0.0)
            a = tl.exp2(dt[:, None, :] * A2[:, :, None])
            if HAS_SEQ:
                a = tl.where(keep[None, None, :], a, 0.0)
            dtu = dt * u
            bx = dtu[:, None, :] * Bt[None, :, :]
            ca, hs = tl.associative_scan((a, bx), 2, _combine)
            h = hs + ca * h0[:, :, None]

            if HAS_Z:
                z_off = (pb * sz_b + d_off * sz_d)[:, None] + t[None, :] * sz_l
                zz = tl.load(z_ptr + z_off, mask=mask, other=0.0).to(tl.float32)
                sg = _common.sigmoid(zz)
                ypre = tl.sum(h * Ct[None, :, :], axis=1)
                if HAS_D:
                    Dv = tl.load(D_ptr + d_off, mask=dmask, other=0.0).to(tl.float32)
                    ypre += Dv[:, None] * u
                dz = dout * ypre * sg * (1.0 + zz * (1.0 - sg))
                tl.store(dz_ptr + (pb * dim + d_off)[:, None] * seqlen + t[None, :],
                         dz.to(dz_ptr.dtype.element_ty), mask=mask)
                dy = dout * zz * sg
            else:
                dy = dout
            dC_acc += tl.sum(dy[:, None, :] * h, axis=0)

            # adjoint: g_t = dy_t C_t + exp(dt_{t+1} A) g_{t+1}, carried between tiles in gbuf
            gslot = (slot_c * dim) * nstate + dn
            gc = tl.load(gbuf_ptr + gslot, mask=dn_mask, other=0.0)
            a_n = tl.exp2(dt_n[:, None, :] * A2[:, :, None])
            if HAS_SEQ:
                a_n = tl.where(keep_n[None, None, :], a_n, 0.0)
            bv = dy[:, None, :] * Ct[None, :, :]
            pa, gs = tl.associative_scan((a_n, bv), 2, _combine, reverse=True)
            g = gs + pa * gc[:, :, None]
            tl.store(gbuf_ptr + gslot, tl.sum(tl.where(is_first, g, 0.0), axis=2), mask=dn_mask)
            if k == 0:
                tl.store(dh0_ptr + pb * dim * nstate + dn, tl.sum(tl.where(is_first, g * a, 0.0), axis=2),
                         mask=dn_mask)

            ah = h - bx                                        # = exp(dt A) h_{t-1}
            gB = tl.sum(g * Bt[None, :, :], axis=1)            # (BD, T)
            gah = g * ah
            du = gB * dt
            ddt = gB * u + tl.sum(gah * A[:, :, None], axis=1)
            if HAS_D:
                Dv = tl.load(D_ptr + d_off, mask=dmask, other=0.0).to(tl.float32)
                du += dy * Dv[:, None]
                tl.store(dD_ptr + slot_c * dim + d_off, tl.load(dD_ptr + slot_c * dim + d_off, mask=dmask, other=0.0)
                         + tl.sum(dy * u, axis=1), mask=dmask)
            if SOFTPLUS:
                ddt = ddt * _common.sigmoid(dl)
            ddt = tl.where(mask, ddt, 0.0)
            tl.store(du_ptr + (pb * dim + d_off)[:, None] * seqlen + t[None, :], du.to(du_ptr.dtype.element_ty),
                     mask=mask)
            tl.store(ddelta_ptr + (pb * dim + d_off)[:, None] * seqlen + t[None, :],
                     ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)
            if HAS_BIAS:
                tl.store(dbias_ptr + slot_c * dim + d_off,
                         tl.load(dbias_ptr + slot_c * dim + d_off, mask=dmask, other=0.0) + tl.sum(ddt, axis=1),
                         mask=dmask)
            dA_slot = slot_c * dim * nstate + dn
            tl.store(dA_ptr + dA_slot, tl.load(dA_ptr + dA_slot, mask=dn_mask, other=0.0)
                     + tl.sum(gah * dt[:, None, :], axis=2), mask=dn_mask)
            dB_acc += tl.sum(g * dtu[:, None, :], axis=0)
        tl.store(dB_ptr + dBC_row[:, None] * seqlen + t[None, :], dB_acc, mask=bc_mask)
        tl.store(dC_ptr + dBC_row[:, None] * seqlen + t[None, :], dC_acc, mask=bc_mask)


@triton.jit
def _bwd_seq_load(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, dout_ptr, u_row, dl_row, B_row, C_row, z_row, o_row,
                  su_l, sdl_l, sB_l, sC_l, sz_l, so_l, j, seqlen, dmask, n_mask, bias,
                  HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr):
    """Scan position j's inputs in fp32 (zeros and dt = 0, an identity step, past the end): u, dl (delta +
    bias), dt, B, C, z, dout, the channel mask and t."""
    valid = (j < seqlen) & (j >= 0)
    if REVERSE:
        t = seqlen - 1 - j
    else:
        t = j
    m = dmask & valid
    u = tl.load(u_ptr + u_row + t * su_l, mask=m, other=0.0).to(tl.float32)
    dl = tl.load(delta_ptr + dl_row + t * sdl_l, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dl += bias
    if SOFTPLUS:
        dt = _softplus(dl)
    else:
        dt = dl
    dt = tl.where(m, dt, 0.0)
    Bv = tl.load(B_ptr + B_row + t * sB_l, mask=n_mask & valid, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + C_row + t * sC_l, mask=n_mask & valid, other=0.0).to(tl.float32)
    zz = u
    if HAS_Z:
        zz = tl.load(z_ptr + z_row + t * sz_l, mask=m, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + o_row + t * so_l, mask=m, other=0.0).to(tl.float32)
    return u, dl, dt, Bv, Cv, zz, dout, m, t


@triton.jit
def _bwd_seq_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, tstate_ptr, gbuf_ptr, hs_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    sz_b, sz_d, sz_l, so_b, so_d, so_l, sg_b, sg_d, sg_l,
    dim, nstate, seqlen, cpg, n_groups, n_splits, blocks_per_split, tiles_per_chunk, n_tiles, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr, ACC_BC: tl.constexpr = False,
):
    """Sequential backward in the state-first layout of ``_fwd_seq_kernel`` (NFIRST): one program walks one
    chunk right to left for BD channels, a thread per channel with all n of it, g = dL/dh carried in registers.
    Per tile of T positions it recomputes h from the saved tile state (a forward sweep that parks every h in a
    per-program scratch, ``hs_ptr``, read back by the same thread), then walks the tile backwards:
        g_t = dy_t C_t + exp(dt_{t+1} A) g_{t+1}
    and writes du, ddelta, dz (layout given by the sg_* strides); dA, dD, ddelta_bias are summed in registers
    over the chunk. A program takes ``blocks_per_split`` channel blocks of one group one after the other and sums
    their dB, dC into its split's slice of the (b, splits, g, n, l) partials (read-modify-write by this program
    alone, in a fixed order: deterministic), which torch sums. Tile states and g at chunk ends are (n, d)-ordered
    slots (see ``_fwd_seq_kernel``)."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    split = pid % n_splits
    grp = (pid // n_splits) % n_groups
    pb = (pid // (n_splits * n_groups)).to(tl.int64)
    ndb_g = cpg // BD
    # scratch: T + 1 slots of (BN, BD) per program (slot 0: the tile's start state, slot s + 1: h after step s);
    # dA and dh0 are written in (n, d) order too (transposed by torch)
    hs_base = (pid.to(tl.int64) * n_chunks + chunk) * ((T + 1) * BN * BD)
    slot_c = pb * n_chunks + chunk
    k0 = chunk * tiles_per_chunk
    j_end = (k0 + tiles_per_chunk).to(tl.int64) * T
    for ib in range(0, blocks_per_split):
        blk = split * blocks_per_split + ib  # channel block within the group; past ndb_g: fully masked
        _bwd_seq_block(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, tstate_ptr,
                       gbuf_ptr, hs_ptr, du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
                       dh0_ptr, su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n,
                       sC_l, sz_b, sz_d, sz_l, so_b, so_d, so_l, sg_b, sg_d, sg_l, dim, nstate, seqlen,
                       tiles_per_chunk, n_tiles, n_chunks, pb, grp, split, n_splits, n_groups,
                       grp * cpg + blk * BD, blk < ndb_g, ib, hs_base, slot_c, k0, j_end,
                       HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, REVERSE, BD, BN, T, ACC_BC)


@triton.jit
def _bwd_seq_block(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, tstate_ptr,
                   gbuf_ptr, hs_ptr, du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
                   dh0_ptr, su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n,
                   sC_l, sz_b, sz_d, sz_l, so_b, so_d, so_l, sg_b, sg_d, sg_l, dim, nstate, seqlen,
                   tiles_per_chunk, n_tiles, n_chunks, pb, grp, split, n_splits, n_groups,
                   d0, blk_ok, ib, hs_base, slot_c, k0, j_end,
                   HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                   REVERSE: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr,
                   ACC_BC: tl.constexpr):
    """One channel block (channels d0 .. d0 + BD) of ``_bwd_seq_kernel``'s chunk; with ACC_BC (several blocks
    a program), ib > 0 adds its dB, dC to what the program's earlier blocks wrote."""
    if ACC_BC:
        if ib > 0:
            tl.debug_barrier()  # the earlier blocks' dB/dC stores are visible to every thread
    n_off = tl.arange(0, BN).to(tl.int64)
    n_mask = n_off < nstate
    d_off = (d0 + tl.arange(0, BD)).to(tl.int64)
    dmask = (d_off < dim) & blk_ok
    nd_mask = n_mask[:, None] & dmask[None, :]
    unaligned = nstate // nstate - 1  # see _fwd_seq_kernel
    B_row = pb * sB_b + grp.to(tl.int64) * sB_g + n_off * sB_n
    C_row = pb * sC_b + grp.to(tl.int64) * sC_g + n_off * sC_n
    dBC_row = ((pb * n_splits + split) * n_groups + grp) * nstate + n_off
    loc = tl.arange(0, BD)[None, :] + tl.arange(0, BN)[:, None] * BD + unaligned
    A = tl.load(A_ptr + n_off[:, None] * dim + d_off[None, :] + unaligned, mask=nd_mask, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634
    dn = d_off[None, :] + n_off[:, None] * dim + unaligned
    bias = tl.zeros([BD], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d_off, mask=dmask, other=0.0).to(tl.float32)
    Dv = tl.zeros([BD], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d_off, mask=dmask, other=0.0).to(tl.float32)
    u_row = pb * su_b + d_off * su_d
    dl_row = pb * sdl_b + d_off * sdl_d
    z_row = pb * sz_b + d_off * sz_d
    o_row = pb * so_b + d_off * so_d
    g_row = pb * sg_b + d_off * sg_d
    g = tl.load(gbuf_ptr + slot_c * dim * nstate + dn, mask=nd_mask, other=0.0)  # g after the chunk's end
    # exp(dt A) of the position right of the chunk (1 past the end: dt = 0)
    _, _, dt_r, _, _, _, _, _, _ = _bwd_seq_load(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, dout_ptr, u_row, dl_row,
                                                 B_row, C_row, z_row, o_row, su_l, sdl_l, sB_l, sC_l, sz_l, so_l,
                                                 j_end, seqlen, dmask, n_mask, bias, HAS_Z, HAS_BIAS, SOFTPLUS,
                                                 REVERSE)
    a_r = tl.exp2(dt_r[None, :] * A2)
    dA_acc = tl.zeros([BN, BD], dtype=tl.float32)
    dD_acc = tl.zeros([BD], dtype=tl.float32)
    db_acc = tl.zeros([BD], dtype=tl.float32)
    for kk in range(0, tiles_per_chunk):
        k = k0 + tiles_per_chunk - 1 - kk
        jt = k.to(tl.int64) * T
        h_start = tl.load(tstate_ptr + (pb * n_tiles + k) * dim * nstate + dn, mask=nd_mask & (k < n_tiles),
                          other=0.0)
        h = h_start
        tl.store(hs_ptr + hs_base + loc, h)
        for s in range(0, T):  # forward sweep: park every h
            u, dl, dt, Bv, Cv, zz, dout, m, t = _bwd_seq_load(
                u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, dout_ptr, u_row, dl_row, B_row, C_row, z_row, o_row,
                su_l, sdl_l, sB_l, sC_l, sz_l, so_l, jt + s, seqlen, dmask, n_mask, bias, HAS_Z, HAS_BIAS,
                SOFTPLUS, REVERSE)
            h = tl.exp2(dt[None, :] * A2) * h + (dt * u)[None, :] * Bv[:, None]
            tl.store(hs_ptr + hs_base + (s + 1) * BN * BD + loc, h)
        for s_ in range(0, T):  # backward walk
            s = T - 1 - s_
            j = jt + s
            u, dl, dt, Bv, Cv, zz, dout, m, t = _bwd_seq_load(
                u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, dout_ptr, u_row, dl_row, B_row, C_row, z_row, o_row,
                su_l, sdl_l, sB_l, sC_l, sz_l, so_l, j, seqlen, dmask, n_mask, bias, HAS_Z, HAS_BIAS,
                SOFTPLUS, REVERSE)
            h = tl.load(hs_ptr + hs_base + (s + 1) * BN * BD + loc)
            h_prev = tl.load(hs_ptr + hs_base + s * BN * BD + loc)
            if HAS_Z:
                sg = _common.sigmoid(zz)
                ypre = tl.sum(h * Cv[:, None], axis=0) + Dv * u
                dz = dout * ypre * sg * (1.0 + zz * (1.0 - sg))
                tl.store(dz_ptr + g_row + t * sg_l, dz.to(dz_ptr.dtype.element_ty), mask=m)
                dy = dout * zz * sg
            else:
                dy = dout
            bc_ok = n_mask & (j < seqlen)
            dC_t = tl.sum(dy[None, :] * h, axis=1)
            if ACC_BC:
                dC_t += tl.load(dC_ptr + dBC_row * seqlen + t, mask=bc_ok & (ib > 0), other=0.0)
            tl.store(dC_ptr + dBC_row * seqlen + t, dC_t, mask=bc_ok)
            g = dy[None, :] * Cv[:, None] + a_r * g
            a = tl.exp2(dt[None, :] * A2)
            if j == 0:
                tl.store(dh0_ptr + pb * dim * nstate + dn, g * a, mask=nd_mask)
            gah = g * a * h_prev
            gB = tl.sum(g * Bv[:, None], axis=0)
            du = gB * dt + dy * Dv
            ddt = gB * u + tl.sum(gah * A, axis=0)
            if SOFTPLUS:
                ddt = ddt * _common.sigmoid(dl)
            ddt = tl.where(m, ddt, 0.0)
            tl.store(du_ptr + g_row + t * sg_l, du.to(du_ptr.dtype.element_ty), mask=m)
            tl.store(ddelta_ptr + g_row + t * sg_l, ddt.to(ddelta_ptr.dtype.element_ty), mask=m)
            dB_t = tl.sum(g * (dt * u)[None, :], axis=1)
            if ACC_BC:
                dB_t += tl.load(dB_ptr + dBC_row * seqlen + t, mask=bc_ok & (ib > 0), other=0.0)
            tl.store(dB_ptr + dBC_row * seqlen + t, dB_t, mask=bc_ok)
            dA_acc += gah * dt[None, :]
            dD_acc += dy * u
            db_acc += ddt
            a_r = a
    tl.store(dA_ptr + slot_c * dim * nstate + dn, dA_acc, mask=nd_mask)
    if HAS_D:
        tl.store(dD_ptr + slot_c * dim + d_off, dD_acc, mask=dmask)
    if HAS_BIAS:
        tl.store(dbias_ptr + slot_c * dim + d_off, db_acc, mask=dmask)


# ---------------------------------------------------------------------------------------------- launchers

def _strides3(t):
    return (t.stride(0), t.stride(1), t.stride(2)) if t is not None else (0, 0, 0)


def channel_last(t) -> bool:
    """True when a (b, c, l) tensor holds its channels contiguously (a transposed view of (b, l, c)), as the
    Mamba mixer's delta and z are."""
    return t.shape[1] > 1 and t.shape[2] > 1 and t.stride(1) == 1


def new_output(u, delta):
    """Uninitialised y (b, d, l) in u's dtype, channel-last when delta is (the sequential kernel then stores
    each position's channels contiguously, and the mixer's transpose back to (b, l, d) costs no copy)."""
    b, d, l = u.shape
    if channel_last(delta):
        return u.new_empty((b, l, d)).transpose(1, 2)
    return u.new_empty((b, d, l))


def _fwd_plan(b, d, l, delta, kernel, tile):
    """(sequential forward kernel?, state held n-first?) for this call; the backward asks again to read the
    tile states in the order they were written."""
    kernel = kernel or FWD_KERNEL
    # the sequential kernel: when few channels must be spread over the length, or when delta is channel-last
    # (each step then loads one contiguous row; an H100 measured 0.85 vs 1.15 ms at b8 d1536 l2048)
    seq = kernel in ("seq", "seqt") or (kernel == "auto" and (b * d < SEQ_MAX_CHANNELS or channel_last(delta))
                                        and l >= 4 * tile)
    variant = SEQ_VARIANT if SEQ_VARIANT != "auto" else ("seqt" if channel_last(delta) else "seq")
    return seq, kernel == "seqt" or (kernel == "auto" and seq and variant == "seqt")


def _fwd(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, reverse, save_states, tile=TILE,
         n_chunks=None, num_warps=None, max_bd=None, programs=None, kernel=None, seq_idx=None, out=None):
    """Returns y, final_state (b, d, n) fp32, tile_states (b, n_tiles, d, n) fp32 or None. With ``out`` (a
    (b, d, l) tensor), y is added to it in place and ``out`` is returned as y."""
    b, d, l = u.shape
    n = A.shape[1]
    seq, nfirst = _fwd_plan(b, d, l, delta, kernel, tile)
    kern = _fwd_seq_kernel if seq else _fwd_kernel
    num_warps = num_warps or (WARPS_SEQT if nfirst else WARPS_SEQ if seq else WARPS_FWD)
    B4, C4 = _grouped(B), _grouped(C)
    g = B4.shape[1]
    cpg = d // g
    BD = _common.pow2_divisor(cpg, max_bd or (MAX_BD_SEQT if nfirst else MAX_BD_SEQ if seq else MAX_BD_FWD))
    BN = max(triton.next_power_of_2(n), 2)
    ndb = d // BD
    n_tiles = max(triton.cdiv(l, tile), 1)
    if n_chunks is None:
        # one pass when the channels alone fill the GPU; else many chunks (the summary pass pays for itself)
        if programs is None:
            programs = ((1 if b * ndb >= TARGET_PROGRAMS else 16 * TARGET_PROGRAMS) if not seq
                        else (1 if b * ndb >= SEQ_PROGRAMS else SEQ_PROGRAMS))
        n_chunks = min(n_tiles, max(1, triton.cdiv(programs, b * ndb)))
    tpc = triton.cdiv(n_tiles, n_chunks)
    n_chunks = triton.cdiv(n_tiles, tpc)
    dev = u.device
    f32 = dict(device=dev, dtype=torch.float32)
    y = new_output(u, delta) if out is None else out
    hout = torch.empty(b, n_chunks, d, n, **f32)
    tstates = torch.empty(b, n_tiles, d, n, **f32) if save_states else hout
    A = A.contiguous()
    A_k = A.t().contiguous() if nfirst else A  # the state-first kernel reads A as (n, d)
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
                 REVERSE=reverse, HAS_SEQ=seq_idx is not None, ACCUM=out is not None, BD=BD, BN=BN, T=tile)
    if seq:
        flags["NFIRST"] = nfirst
    seq = (seq_idx, seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (y, 0, 0)
    strides = (*_strides3(u), *_strides3(delta), *B4.stride(), *C4.stride(), *_strides3(z), *_strides3(y), *seq)
    dummy = hout
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    if n_chunks == 1:
        hin = h0.transpose(1, 2).contiguous() if nfirst and h0 is not None else h0  # slots in (n, d) order
    else:
        hloc = torch.empty(b, n_chunks, d, n, **f32)
        dtsum = torch.empty(b, n_chunks, d, **f32)
        kern[(b * ndb, n_chunks)](
            u, delta, A_k, B4, C4, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, y, dummy, hloc, dtsum, dummy, *strides,
            d, n, l, cpg, tpc, n_tiles, n_chunks, MODE=0, HAS_HIN=False, SAVE_STATES=False,
            **flags, num_warps=num_warps)
        hin = torch.empty(b, n_chunks, d, n, **f32)
        _fwd_state_kernel[(b * ndb,)](A, hloc, dtsum, h0 if h0 is not None else dummy, hin, d, n, n_chunks,
                                      HAS_H0=h0 is not None, HAS_SEQ=seq_idx is not None, BD=BD, BN=BN,
                                      NFIRST=nfirst, num_warps=1)
    kern[(b * ndb, n_chunks)](
        u, delta, A_k, B4, C4, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, y, hin if hin is not None else dummy, hout, dummy,
        tstates, *strides, d, n, l, cpg, tpc, n_tiles, n_chunks, MODE=1, HAS_HIN=hin is not None,
        SAVE_STATES=save_states, **flags, num_warps=num_warps)
    final = hout[:, -1]
    if nfirst:  # (n, d) order back to (b, d, n)
        final = final.reshape(b, n, d).transpose(1, 2).contiguous()
    elif n_chunks > 1:
        final = final.contiguous()  # a copy (not a view of hout), laid out as the fake implementation says
    return y, final, (tstates if save_states else None)


def _chunk_end_adjoints(delta, A, C4, z, delta_bias, softplus, reverse, dout, dht, seq, has_seq, n_chunks, tpc,
                        n_tiles, tile, BDs, BN, num_warps):
    """g = dL/dh at the end of every backward chunk (b, n_chunks, d, n) fp32: dht for the last one; with more
    than one chunk, each chunk's local adjoint from a zero end (``_bwd_sum_kernel``) carried right to left over
    the chunks (``_bwd_state_kernel``). ``seq``: (seq_idx or a dummy, its two strides)."""
    b, d, l = delta.shape
    n = A.shape[1]
    f32 = dict(device=delta.device, dtype=torch.float32)
    dummy = torch.empty(1, **f32)
    dht_c = dht.float().contiguous() if dht is not None else None
    gbuf = torch.empty(b, n_chunks, d, n, **f32)
    if n_chunks == 1:
        if dht_c is not None:
            gbuf.copy_(dht_c.unsqueeze(1))
        else:
            gbuf.zero_()
        return gbuf
    cpg = d // C4.shape[1]
    ndb = d // BDs
    gloc = torch.empty(b, n_chunks, d, n, **f32)
    dtsum = torch.empty(b, n_chunks, d, **f32)
    _bwd_sum_kernel[(b * ndb, n_chunks)](
        delta, A, C4, z if z is not None else dummy, delta_bias if delta_bias is not None else dummy,
        dout, gloc, dtsum, *_strides3(delta), *C4.stride(), *_strides3(z), *_strides3(dout), *seq,
        d, n, l, cpg, tpc, n_tiles, n_chunks, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=softplus, REVERSE=reverse, HAS_SEQ=has_seq, BD=BDs, BN=BN, T=tile, num_warps=num_warps)
    _bwd_state_kernel[(b * ndb,)](A, gloc, dtsum, dht_c if dht_c is not None else dummy, gbuf, d, n,
                                  n_chunks, HAS_DHT=dht_c is not None, HAS_SEQ=has_seq, BD=BDs, BN=BN, num_warps=1)
    return gbuf


def _bwd(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, tstates, dout, dht, tile=TILE,
         n_chunks=None, n_splits=None, num_warps=None, max_bd=None, programs=None, seq_idx=None, fwd_kernel=None,
         bwd_kernel=None):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0), each in its input's dtype (None where
    the input is None). ``bwd_kernel``: "tile" (``_bwd_kernel``) or "seq" (``_bwd_seq_kernel``: needs tile
    states from the state-first forward and no seq_idx; else the tile kernel runs)."""
    b, d, l = u.shape
    if _bwd_plan(u, delta, A, B, seq_idx, fwd_kernel, bwd_kernel, tile, n_splits, max_bd):
        return _bwd_seq(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, tstates, dout, dht, tile,
                        programs, n_splits, max_bd)
    n = A.shape[1]
    num_warps = num_warps or WARPS_BWD
    B4, C4 = _grouped(B), _grouped(C)
    g = B4.shape[1]
    cpg = d // g
    BD = _common.pow2_divisor(cpg, max_bd or MAX_BD_BWD)
    BDs = _common.pow2_divisor(cpg, MAX_BD_FWD)  # summary/state passes: any block works, reuse the forward's
    BN = max(triton.next_power_of_2(n), 2)
    ndb_g = cpg // BD
    n_tiles = tstates.shape[1]
    assert n_tiles == max(triton.cdiv(l, tile), 1)
    if n_chunks is None:
        n_chunks = min(n_tiles, max(1, triton.cdiv(programs or TARGET_PROGRAMS, b * g)))
    tpc = triton.cdiv(n_tiles, n_chunks)
    n_chunks = triton.cdiv(n_tiles, tpc)
    if n_splits is None:
        n_splits = min(ndb_g, max(1, triton.cdiv(programs or TARGET_PROGRAMS, b * g * n_chunks)))
    dbps = triton.cdiv(ndb_g, n_splits)
    n_splits = triton.cdiv(ndb_g, dbps)
    dev = u.device
    f32 = dict(device=dev, dtype=torch.float32)
    A = A.contiguous()
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    dummy = torch.empty(1, **f32)
    seq = (seq_idx, seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (dummy, 0, 0)
    gbuf = _chunk_end_adjoints(delta, A, C4, z, delta_bias, softplus, reverse, dout, dht, seq, seq_idx is not None,
                               n_chunks, tpc, n_tiles, tile, BDs, BN, num_warps)
    du = torch.empty(b, d, l, device=dev, dtype=u.dtype)
    ddelta = torch.empty(b, d, l, device=dev, dtype=delta.dtype)
    dz = torch.empty(b, d, l, device=dev, dtype=z.dtype) if z is not None else None
    dBp = torch.empty(b, n_splits, g, n, l, **f32)
    dCp = torch.empty(b, n_splits, g, n, l, **f32)
    dAp = torch.zeros(b, n_chunks, d, n, **f32)
    dDp = torch.zeros(b, n_chunks, d, **f32) if D is not None else None
    dbp = torch.zeros(b, n_chunks, d, **f32) if delta_bias is not None else None
    dh0 = torch.empty(b, d, n, **f32)
    _bwd_kernel[(b * g * n_splits, n_chunks)](
        u, delta, A, B4, C4, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, dout, tstates, gbuf,
        du, ddelta, dz if dz is not None else dummy, dBp, dCp, dAp, dDp if dDp is not None else dummy,
        dbp if dbp is not None else dummy, dh0,
        *_strides3(u), *_strides3(delta), *B4.stride(), *C4.stride(), *_strides3(z), *_strides3(dout), *seq,
        d, n, l, cpg, g, n_splits, dbps, tpc, n_tiles, n_chunks,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
        REVERSE=reverse, HAS_SEQ=seq_idx is not None, BD=BD, BN=BN, T=tile,
        TS_NFIRST=_fwd_plan(b, d, l, delta, fwd_kernel, tile)[1], num_warps=num_warps)
    dB = dBp.sum(1) if n_splits > 1 else dBp[:, 0]
    dC = dCp.sum(1) if n_splits > 1 else dCp[:, 0]
    dB, dC = dB.reshape(B.shape).to(B.dtype), dC.reshape(C.shape).to(C.dtype)
    dA = dAp.sum((0, 1)).to(A.dtype)
    dD = dDp.sum((0, 1)).to(D.dtype) if D is not None else None
    dbias = dbp.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, dbias, dh0


def _bwd_plan(u, delta, A, B, seq_idx, fwd_kernel, bwd_kernel, tile, n_splits=None, max_bd=None) -> bool:
    """True when the sequential backward runs (see BWD_KERNEL)."""
    b, d, l = u.shape
    bwd_kernel = bwd_kernel or BWD_KERNEL
    if bwd_kernel == "tile" or seq_idx is not None or not _fwd_plan(b, d, l, delta, fwd_kernel, tile)[1]:
        return False
    if bwd_kernel == "seq":
        return True
    g = _grouped(B).shape[1]
    ndb_g = (d // g) // _common.pow2_divisor(d // g, max_bd or MAX_BD_BWD_SEQ)
    splits = min(ndb_g, n_splits or BWD_SEQ_SPLITS or ndb_g)
    return 2 * 4 * b * splits * g * A.shape[1] * l <= BWD_SEQ_MAX_PARTIAL_BYTES


def _bwd_seq(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, tstates, dout, dht, tile, programs=None,
             n_splits=None, max_bd=None):
    """``_bwd`` through the sequential backward kernel (tile states in (n, d) order, no seq_idx)."""
    b, d, l = u.shape
    n = A.shape[1]
    B4, C4 = _grouped(B), _grouped(C)
    g = B4.shape[1]
    cpg = d // g
    BD = _common.pow2_divisor(cpg, max_bd or MAX_BD_BWD_SEQ)
    BDs = _common.pow2_divisor(cpg, MAX_BD_FWD)
    BN = max(triton.next_power_of_2(n), 2)
    n_tiles = tstates.shape[1]
    ndb_g = cpg // BD
    # channel blocks are shared out over n_splits programs a group (fewer (b, splits, g, n, l) dB/dC partials:
    # one per block would be 6.4 GB at b1 d1536 l2^20), the chunks make up the programs
    n_splits = min(ndb_g, n_splits or BWD_SEQ_SPLITS or ndb_g)
    bps = triton.cdiv(ndb_g, n_splits)
    n_splits = triton.cdiv(ndb_g, bps)
    n_chunks = min(n_tiles, max(1, triton.cdiv(programs or SEQ_PROGRAMS, b * g * n_splits)))
    tpc = triton.cdiv(n_tiles, n_chunks)
    n_chunks = triton.cdiv(n_tiles, tpc)
    dev = u.device
    f32 = dict(device=dev, dtype=torch.float32)
    A = A.contiguous()
    dummy = torch.empty(1, **f32)
    gbuf = _chunk_end_adjoints(delta, A, C4, z, delta_bias, softplus, reverse, dout, dht, (dummy, 0, 0), False,
                               n_chunks, tpc, n_tiles, tile, BDs, BN, WARPS_BWD)
    gbuf = gbuf.transpose(-1, -2).contiguous()  # (n, d) order for the sequential kernel
    du, ddelta = new_output(u, delta), new_output(delta, delta)
    dz = new_output(z, delta) if z is not None else None
    dBp = torch.empty(b, n_splits, g, n, l, **f32)
    dCp = torch.empty(b, n_splits, g, n, l, **f32)
    dAp = torch.empty(b, n_chunks, n, d, **f32)
    dDp = torch.empty(b, n_chunks, d, **f32)
    dbp = torch.empty(b, n_chunks, d, **f32)
    dh0 = torch.empty(b, n, d, **f32)
    hs = torch.empty(b * g * n_splits * n_chunks * (tile + 1) * BN * BD, **f32)
    _bwd_seq_kernel[(b * g * n_splits, n_chunks)](
        u, delta, A.t().contiguous(), B4, C4, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, dout, tstates, gbuf, hs,
        du, ddelta, dz if dz is not None else dummy, dBp, dCp, dAp, dDp, dbp, dh0,
        *_strides3(u), *_strides3(delta), *B4.stride(), *C4.stride(), *_strides3(z), *_strides3(dout),
        *_strides3(du), d, n, l, cpg, g, n_splits, bps, tpc, n_tiles, n_chunks,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
        REVERSE=reverse, BD=BD, BN=BN, T=tile, ACC_BC=bps > 1, num_warps=WARPS_BWD_SEQ)
    dB = (dBp.sum(1) if n_splits > 1 else dBp[:, 0]).reshape(B.shape).to(B.dtype)
    dC = (dCp.sum(1) if n_splits > 1 else dCp[:, 0]).reshape(C.shape).to(C.dtype)
    dA = dAp.sum((0, 1)).t().to(A.dtype)
    dD = dDp.sum((0, 1)).to(D.dtype) if D is not None else None
    dbias = dbp.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA.contiguous(), dB, dC, dD, dz, dbias, dh0.transpose(1, 2).contiguous()


# ------------------------------------------------------------------------------- the blocked pair (default)

def blocked_default(delta=None, save_states=True) -> bool:
    """Whether the ops run the blocked pair: not in torch's deterministic mode (the blocked backward's dB/dC atomics
    are not bitwise reproducible; this file's kernels are), nor for a forward without autograd on channel-last
    delta (the Mamba mixer's layout without autograd), which this file's sequential kernel reads in place while
    blocked_fwd copies delta and z l-contiguous first. H100, same run, no-grad forward, channel-last delta/z:
    b1 d1536 l2^20 36 vs 128 ms, b1 d1536 l65536 2.4 vs 3.3 ms, b8 d1536 l2048 0.61 vs 0.79 ms; under autograd
    the blocked pair is as fast or faster there too (fwd+bwd 474 vs 487, 18.4 vs 19.8, 4.0 vs 6.2 ms)."""
    if torch.are_deterministic_algorithms_enabled():
        return False
    return save_states or delta is None or not channel_last(delta)


# Under autograd the forward runs blocked_fwd's plan for the row count (GRAD_CHUNK, when set, is its chunk: the
# tests' short chunks) and saves the state entering every S positions, the backward's chunk (blocked_bwd; one
# program per (batch, channel) row). H100, bf16, session 8, same run, fwd (saving states) + bwd ms, with
# session 8's forward (2 channels of 4 warps, threads holding 8 V-strided positions):
#   forward chunk / warps / channels, saved every   b8 d1536 l2048   b1 d1536 l65536   b1 d1536 l2^20
#   512 / 2 / 1, every 512 (backward 4 warps; before) 2.80           13.1              221
#   512 / 2 / 1, every 128                            2.18           9.17              144
#   1024 / 4 / 1, every 128                           2.26           8.78              138
#   1024 / 4 / 2, every 128                           2.35           8.97              141
#   512 / 2 / 1, every 256 (backward 1 warp)          2.25           10.7              158
#   512 / 2 / 1, every 64                             2.56           14.4              229
# Session 9's forward (16 consecutive positions a thread, see blocked_fwd): saving states every 128 positions,
# b1 d1536 l2^20 25.8 ms (session 8's 34.1), b8 d1536 l2048 0.379 ms (0.504).
GRAD_CHUNK = None
# S by the number of rows b * d: short one-warp chunks need enough programs to hide their latency, and with few
# rows longer chunks on more threads win. H100, same run, fwd+bwd ms (S / backward warps):
#   rows                 128 / 1   256 / 1   512 / 2   1024 / 4
#   b1 d512 l2^20        90.8      65.7      54.1      57.6
#   b2 d512 l131072      14.1      11.1      13.6      14.4
#   b1 d1024 l262144     28.2      22.0      27.0      28.8
#   b1 d1536 l2^20       138       158 (forward chunk 512)
#   b4 d512 l16384       2.71      2.83      3.39      3.63
# Session 23: with S = 256 programs capped at 168 registers (blocked_bwd.MAXNREG: 12 an SM) and crossing lanes by
# gather, S = 256 wins wherever one wave holds every row; with more rows its programs run in two waves (b1 d1792
# l2^20: 135.2 ms against 104.1 at S = 128). Forward scans keep it up to there, reverse ones below 1536 rows.
# H100, blocked_bwd alone, same run, ms S = 128 / 256 (forward scan; reverse):
#   b1 d1536 l2^20     84.5 / 81.5 (92.4 / 94.6)     b1 d1536 l2^18     21.6 / 21.0 (22.6 / 23.5)
#   b1 d1536 l131072   10.7 / 10.1                   b1 d1536 l65536    5.57 / 5.25 (5.66 / 5.76)
#   b1 d1280 l2^20     83.6 / 71.5 (86.6 / 77.7)     b1 d1792 l2^20     104.1 / 135.2
# The forward under autograd takes the same time at either spacing (b1 d1536 l2^20 23.7 / 23.5 ms).
# With up to two rows an SM, S = 1024 (four warps, 8 positions a thread, ~254 registers: two programs an SM) beats
# S = 512 on two warps: blocked_bwd alone, same run, ms S = 512 / 1024 (forward scan; reverse): b1 d256 l2^20
# 26.3 / 17.1 (25.0 / 17.3); with more rows it runs in two waves: b1 d512 l2^20 32.2 / 33.8 (31.3 / 33.9), b2
# d256 l2^18 8.16 / 8.54 (7.93 / 8.57).
GRAD_STATE_LENS = ((1536, 128), (768, 256), (0, 512))   # (from this many rows, S); see _state_len
GRAD_S256_PER_SM = _common.warps_per_sm(_blocked_bwd_mod.MAXNREG[256])  # S = 256 backward programs an SM (12)
GRAD_S1024_PER_SM = 2  # S = 1024 backward programs an SM


def _state_len(rows: int, reverse: bool, sms: int) -> int:
    """S for ``rows`` = b * d rows: GRAD_STATE_LENS, but 256 for forward scans up to one wave of S = 256 programs
    (GRAD_S256_PER_SM a streaming multiprocessor), 128 past one wave, and 1024 where one wave of S = 1024
    programs (GRAD_S1024_PER_SM an SM) holds every row."""
    s = next(s for min_rows, s in GRAD_STATE_LENS if rows >= min_rows)
    if s == 128 and not reverse:
        s = 256
    if s == 256 and rows > GRAD_S256_PER_SM * sms:
        s = 128
    if s == 512 and rows <= GRAD_S1024_PER_SM * sms:
        s = 1024
    return s


def _grad_lengths(tuning, rows, reverse, device):
    """(forward chunk, saved-state spacing S = the backward's chunk) of a call on ``rows`` = b * d (batch,
    channel) rows, scanning in this direction on ``device``, that saves states with ``tuning``."""
    chunk = tuning.get("chunk") or GRAD_CHUNK or _blocked_fwd_mod.default_plan(rows)[0]
    state_len = tuning.get("state_len")
    if state_len is None:
        state_len = min(_state_len(rows, reverse, _common.sm_count(device)), chunk)
    return chunk, state_len


def _blocked_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, reverse, save_states, seq_idx,
                 out=None, tuning=None):
    """``blocked_fwd``: (y, final_state, chunk_states or None). ``tuning``: chunk, state_len, bd, warps (forward);
    when states are saved, by default the chunk of GRAD_CHUNK or blocked_fwd's plan, S from GRAD_STATE_LENS."""
    tuning = tuning or {}
    chunk, warps, bd, state_len = tuning.get("chunk"), tuning.get("warps"), tuning.get("bd"), None
    if save_states:
        chunk, state_len = _grad_lengths(tuning, u.shape[0] * u.shape[1], reverse, u.device)
    return _blocked_fwd_mod.blocked_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, reverse,
                                        seq_idx, save_states, out=out, chunk=chunk, state_len=state_len, bd=bd,
                                        num_warps=warps)


def _blocked_bwd(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, chunk_states, dy, dht, seq_idx,
                 tuning=None):
    """``blocked_bwd`` from the chunk states of ``_blocked_fwd`` called with the same ``tuning`` (its state
    spacing is the backward's chunk); tuning: also bd_bwd, warps_bwd, maxnreg_bwd, gather_bwd, shift_bwd,
    whole_bwd."""
    tuning = tuning or {}
    return _blocked_bwd_mod.blocked_bwd(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, chunk_states, dy,
                                        dht, seq_idx,
                                        chunk_len=_grad_lengths(tuning, u.shape[0] * u.shape[1], reverse, u.device)[1],
                                        block_d=tuning.get("bd_bwd"), num_warps=tuning.get("warps_bwd"),
                                        maxnreg=tuning.get("maxnreg_bwd"), gather=tuning.get("gather_bwd"),
                                        shift=tuning.get("shift_bwd"), whole=tuning.get("whole_bwd"))


def _blocked_states_like(u, A, save_states, reverse):
    """Empty chunk states with the blocked forward's shape (fake implementations)."""
    b, d, l = u.shape
    if not save_states:
        return _empty(u)
    n_saved = triton.cdiv(_common.padded_len(l), _grad_lengths({}, b * d, reverse, u.device)[1])
    return u.new_empty(b, n_saved, d, A.shape[1], dtype=torch.float32)


def _blocked_rows_like(t):
    """Empty (b, d, l) like t with the blocked kernels' output layout (fakes): ``_common.new_rows``."""
    return _common.new_rows(t.shape, device=t.device, dtype=t.dtype)


class SelectiveScanFn(torch.autograd.Function):
    """The ``_tuning`` path (tests, benchmarks): this file's kernels, or the blocked pair with ``blocked=True``."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, reverse, tuning, seq_idx):
        tuning = tuning or {}
        save = any(ctx.needs_input_grad)
        if tuning.get("blocked"):
            y, ht, states = _blocked_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, reverse,
                                         save, seq_idx, tuning=tuning)
        else:
            y, ht, states = _fwd(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, reverse,
                                 save_states=save, tile=tuning.get("tile", TILE),
                                 n_chunks=tuning.get("fwd_chunks"), num_warps=tuning.get("warps_fwd"),
                                 max_bd=tuning.get("bd_fwd"), programs=tuning.get("programs"),
                                 kernel=tuning.get("fwd_kernel"), seq_idx=seq_idx)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, states, seq_idx)
        ctx.softplus, ctx.reverse, ctx.tuning = softplus, reverse, tuning
        return y, ht

    @staticmethod
    def backward(ctx, dy, dht):
        u, delta, A, B, C, D, z, delta_bias, initial_state, states, seq_idx = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u)
        if ctx.tuning.get("blocked"):
            du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _blocked_bwd(
                u, delta, A, B, C, D, z, delta_bias, ctx.softplus, ctx.reverse, states, dy, dht, seq_idx,
                tuning=ctx.tuning)
        else:
            du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _bwd(
                u, delta, A, B, C, D, z, delta_bias, ctx.softplus, ctx.reverse, states, dy, dht,
                tile=ctx.tuning.get("tile", TILE), n_chunks=ctx.tuning.get("bwd_chunks"),
                n_splits=ctx.tuning.get("bwd_splits"), num_warps=ctx.tuning.get("warps_bwd"),
                max_bd=ctx.tuning.get("bd_bwd"), programs=ctx.tuning.get("programs_bwd"), seq_idx=seq_idx,
                fwd_kernel=ctx.tuning.get("fwd_kernel"), bwd_kernel=ctx.tuning.get("bwd_kernel"))
        dh0 = dh0.to(initial_state.dtype) if initial_state is not None else None
        return du, ddelta, dA, dB, dC, dD, dz, dbias, dh0, None, None, None, None


# ------------------------------------------------------------------ torch.library registration (torch.compile)
# The default path goes through two custom ops, so that torch.compile treats the scan as one opaque node with a
# registered backward (no graph break). ``blocked`` (an argument, fixed when the graph is traced) says which
# kernels run: the blocked pair (saved states: chunk states) or this file's (saved states: tile states). A copy
# of this module loaded under the Triton interpreter (tests) registers its own names.
_OPS = "seqmamba::selective_scan" + ("_interp" if __name__.endswith("__interpreted") else "")
_T = torch.Tensor


def _empty(ref):
    return ref.new_empty(0, dtype=torch.float32)


def _scan_fwd_impl(u: _T, delta: _T, A: _T, B: _T, C: _T, D: _T | None, z: _T | None, delta_bias: _T | None,
                   initial_state: _T | None, softplus: bool, reverse: bool, save_states: bool,
                   seq_idx: _T | None, blocked: bool = True) -> tuple[_T, _T, _T]:
    y, ht, states = (_blocked_fwd if blocked else _fwd)(u, delta, A, B, C, D, z, delta_bias, softplus,
                                                        initial_state, reverse, save_states, seq_idx=seq_idx)
    return y, ht.clone(memory_format=torch.contiguous_format), states if states is not None else _empty(u)


_scan_fwd_op = torch.library.custom_op(_OPS + "_fwd", _scan_fwd_impl, mutates_args=())


@_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, reverse, save_states, seq_idx, blocked=True):
    b, d, l = u.shape
    n = A.shape[1]
    if blocked:
        return _blocked_rows_like(u), u.new_empty(b, d, n, dtype=torch.float32), _blocked_states_like(u, A,
                                                                                                      save_states,
                                                                                                      reverse)
    n_tiles = max(triton.cdiv(l, TILE), 1)
    ts = u.new_empty(b, n_tiles, d, n, dtype=torch.float32) if save_states else _empty(u)
    return new_output(u, delta), u.new_empty(b, d, n, dtype=torch.float32), ts


def _scan_bwd_impl(u: _T, delta: _T, A: _T, B: _T, C: _T, D: _T | None, z: _T | None, delta_bias: _T | None,
                   initial_state: _T | None, states: _T, dy: _T, dht: _T | None, softplus: bool,
                   reverse: bool, seq_idx: _T | None, blocked: bool = True) -> list[_T]:
    grads = list((_blocked_bwd if blocked else _bwd)(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, states,
                                                     dy, dht, seq_idx=seq_idx))
    grads[-1] = grads[-1].to(initial_state.dtype) if initial_state is not None else None
    return [g if g is not None else _empty(u) for g in grads]


_scan_bwd_op = torch.library.custom_op(_OPS + "_bwd", _scan_bwd_impl, mutates_args=())


def _grads_like(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, blocked=False):
    """Empty gradients with the layouts the backward gives them (what the fake implementations must return):
    contiguous, except du, ddelta, dz: from the blocked backward in rows of padded_len(l), from the sequential
    one in delta's layout."""
    out = [t.new_empty(t.shape) if t is not None else _empty(u)
           for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)]
    if blocked:
        out[0], out[1] = _blocked_rows_like(u), _blocked_rows_like(delta)
        if z is not None:
            out[6] = _blocked_rows_like(z)
    elif _bwd_plan(u, delta, A, B, seq_idx, None, None, TILE):
        out[0], out[1] = new_output(u, delta), new_output(delta, delta)
        if z is not None:
            out[6] = new_output(z, delta)
    return out


@_scan_bwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, states, dy, dht, softplus, reverse, seq_idx,
      blocked=True):
    return _grads_like(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, blocked)


def _scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, reverse, _, seq_idx, blocked = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, output[2], seq_idx)
    ctx.softplus, ctx.reverse, ctx.blocked = softplus, reverse, blocked
    # the saved states' gradient (and an unused y's or final state's) arrives as None, not as zeros of its size
    # (0.8 GB of chunk states at b1 d1536 l2^20)
    ctx.set_materialize_grads(False)


def _scan_backward(ctx, dy, dht, _dstates):
    u, delta, A, B, C, D, z, delta_bias, initial_state, states, seq_idx = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(u)
    grads = _scan_bwd_call(u, delta, A, B, C, D, z, delta_bias, initial_state, states, dy, dht, ctx.softplus,
                           ctx.reverse, seq_idx, ctx.blocked)
    present = [u, delta, A, B, C, D, z, delta_bias, initial_state]
    grads = [g if t is not None else None for g, t in zip(grads, present)]
    return (*grads, None, None, None, None, None)


_scan_fwd_op.register_autograd(_scan_backward, setup_context=_scan_setup)
_scan_fwd_call = EagerCustomOp(_scan_fwd_op, _scan_fwd_impl, _scan_setup, _scan_backward)
_scan_bwd_call = EagerCustomOp(_scan_bwd_op, _scan_bwd_impl)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          initial_state=None, return_final_state=False, reverse=False, chunk_size=None,
                          seq_idx=None, _tuning=None):
    """Triton implementation with :func:`selective_scan_ref`'s signature (``chunk_size`` is ignored: the
    kernel picks its own tiling). Inputs fp32/bf16/fp16 on a CUDA device (or any device under
    TRITON_INTERPRET=1); arguments are assumed validated by the caller (``seq_idx``: an integer (b, l) tensor,
    see :func:`selective_scan`). It runs as the custom ops ``seqmamba::selective_scan_fwd/_bwd`` (torch.compile
    sees one node): the blocked kernels, or this file's in deterministic mode (module docstring). ``_tuning``
    (tests, benchmarks) takes the plain autograd.Function path instead, with a dict of any of tile, fwd_chunks,
    bwd_chunks, bwd_splits, warps_fwd, warps_bwd, bd_fwd, bd_bwd, programs, programs_bwd, fwd_kernel
    ('scan' | 'seq' | 'seqt' | 'auto'), bwd_kernel; or ``blocked=True`` with chunk, bd, warps (forward),
    bd_bwd, warps_bwd."""
    if _tuning is None:
        tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
        save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        y, ht, _ = _scan_fwd_call(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus),
                                  bool(reverse), save, seq_idx, blocked_default(delta, save))
    else:
        y, ht = SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus),
                                      bool(reverse), _tuning, seq_idx)
    return (y, ht) if return_final_state else y


# -------------------------------------------------------------- bidirectional: y = forward scan + reverse scan
# One call for a bidirectional layer (Caduceus' BiMamba): the forward direction writes y, the reverse direction
# (``reverse=True``: right to left by address, nothing flipped) adds its output into the same y in its final
# pass, so neither a flipped copy nor a second output exists. Each direction has its own inputs (they may be the
# same tensors: the gradients of a shared input are summed by autograd); the backward runs both directions'
# backward kernels on the one dy. ``blocked`` as for the one-direction ops.

_BI_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _bi_fwd_impl(u_f: _T, u_r: _T, delta_f: _T, delta_r: _T, A_f: _T, A_r: _T, B_f: _T, B_r: _T, C_f: _T, C_r: _T,
                 D_f: _T | None, D_r: _T | None, z_f: _T | None, z_r: _T | None, bias_f: _T | None,
                 bias_r: _T | None, softplus: bool, save_states: bool, seq_idx: _T | None,
                 blocked: bool = True) -> tuple[_T, _T, _T]:
    fwd = _blocked_fwd if blocked else _fwd
    y, _, ts_f = fwd(u_f, delta_f, A_f, B_f, C_f, D_f, z_f, bias_f, softplus, None, False, save_states,
                     seq_idx=seq_idx)
    y, _, ts_r = fwd(u_r, delta_r, A_r, B_r, C_r, D_r, z_r, bias_r, softplus, None, True, save_states,
                     seq_idx=seq_idx, out=y)
    return y, (ts_f if ts_f is not None else _empty(u_f)), (ts_r if ts_r is not None else _empty(u_f))


_bi_fwd_op = torch.library.custom_op(_OPS + "_bi_fwd", _bi_fwd_impl, mutates_args=())


@_bi_fwd_op.register_fake
def _(u_f, u_r, delta_f, delta_r, A_f, A_r, B_f, B_r, C_f, C_r, D_f, D_r, z_f, z_r, bias_f, bias_r, softplus,
      save_states, seq_idx, blocked=True):
    b, d, l = u_f.shape
    n = A_f.shape[1]
    if blocked:
        return (_blocked_rows_like(u_f), _blocked_states_like(u_f, A_f, save_states, False),
                _blocked_states_like(u_f, A_f, save_states, True))
    n_tiles = max(triton.cdiv(l, TILE), 1)
    ts = (lambda: u_f.new_empty(b, n_tiles, d, n, dtype=torch.float32)) if save_states else (lambda: _empty(u_f))
    return new_output(u_f, delta_f), ts(), ts()


def _bi_bwd_impl(u_f: _T, u_r: _T, delta_f: _T, delta_r: _T, A_f: _T, A_r: _T, B_f: _T, B_r: _T, C_f: _T, C_r: _T,
                 D_f: _T | None, D_r: _T | None, z_f: _T | None, z_r: _T | None, bias_f: _T | None,
                 bias_r: _T | None, ts_f: _T, ts_r: _T, dy: _T, softplus: bool, seq_idx: _T | None,
                 blocked: bool = True) -> list[_T]:
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()  # once for both directions
    bwd = _blocked_bwd if blocked else _bwd
    g_f = bwd(u_f, delta_f, A_f, B_f, C_f, D_f, z_f, bias_f, softplus, False, ts_f, dy, None, seq_idx=seq_idx)
    g_r = bwd(u_r, delta_r, A_r, B_r, C_r, D_r, z_r, bias_r, softplus, True, ts_r, dy, None, seq_idx=seq_idx)
    # interleaved like the inputs: du_f, du_r, ddelta_f, ... (dh0 dropped: no initial state)
    return [g if g is not None else _empty(u_f) for pair in zip(g_f[:-1], g_r[:-1]) for g in pair]


_bi_bwd_op = torch.library.custom_op(_OPS + "_bi_bwd", _bi_bwd_impl, mutates_args=())


@_bi_bwd_op.register_fake
def _(u_f, u_r, delta_f, delta_r, A_f, A_r, B_f, B_r, C_f, C_r, D_f, D_r, z_f, z_r, bias_f, bias_r, ts_f, ts_r,
      dy, softplus, seq_idx, blocked=True):
    g_f = _grads_like(u_f, delta_f, A_f, B_f, C_f, D_f, z_f, bias_f, None, seq_idx, blocked)
    g_r = _grads_like(u_r, delta_r, A_r, B_r, C_r, D_r, z_r, bias_r, None, seq_idx, blocked)
    return [g for pair in zip(g_f[:-1], g_r[:-1]) for g in pair]


def _bi_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:16], output[1], output[2], inputs[18])
    ctx.softplus, ctx.blocked = inputs[16], inputs[19]
    ctx.set_materialize_grads(False)  # no zero gradients the size of the saved states


def _bi_backward(ctx, dy, _dts_f, _dts_r):
    saved = ctx.saved_tensors
    grads = _bi_bwd_call(*saved[:18], dy, ctx.softplus, saved[18], ctx.blocked)
    grads = [g if t is not None else None for g, t in zip(grads, saved[:16])]
    return (*grads, None, None, None, None)


_bi_fwd_op.register_autograd(_bi_backward, setup_context=_bi_setup)
_bi_fwd_call = EagerCustomOp(_bi_fwd_op, _bi_fwd_impl, _bi_setup, _bi_backward)
_bi_bwd_call = EagerCustomOp(_bi_bwd_op, _bi_bwd_impl)


def selective_scan_bidirectional_triton(fwd: dict, rev: dict, delta_softplus=False, seq_idx=None):
    """y = selective_scan(**fwd) + selective_scan(**rev, reverse=True) through the Triton kernels, as the
    custom op ``seqmamba::selective_scan_bi_fwd/_bwd`` (blocked kernels; this file's in deterministic mode).
    ``fwd``/``rev``: dicts of u, delta, A, B, C and optionally D, z, delta_bias (validated by the caller; same
    shapes in both directions)."""
    args = [d.get(k) for k in _BI_NAMES for d in (fwd, rev)]
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
    y, _, _ = _bi_fwd_call(*args, bool(delta_softplus), save, seq_idx, blocked_default(fwd["delta"], save))
    return y
