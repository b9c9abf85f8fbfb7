"""Single-pass Triton selective scan forward: positions spread over a program's threads (mamba_ssm's design).

Same math as :func:`seqmamba.kernels.selective_scan.ref.selective_scan_ref`:

    dt_t = softplus(delta_t + delta_bias)            (softplus and delta_bias optional)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t       h_{-1} = initial_state or 0
    y_t  = (sum_n C_t * h_t + D * u_t) * silu(z_t)          (D and z optional)

One program owns a block of ``BD`` channels of one batch row and walks the whole length in scan order, in
chunks of ``T`` positions, carrying the (BD, n) state from chunk to chunk (in its own slab of the final-state
buffer, see the kernel): ONE pass over the inputs, one exp per (channel, position, state), no chunk-summary
pass. Inside a chunk each thread holds R * V consecutive positions (R blocks of a 16-byte vector of V), and
for each state index the recurrence is solved in two passes over the registers around one scan across threads:
pass 1 runs each V-block's recurrence from 0 (one FMA a position; a block's decay is exp(A * sum dt), one exp a
block); the blocks' maps are scanned in the thread (``_prefix_combine``, which carries beside each prefix the
prefix without its last element), then the threads' maps across the warp with the carry folded into thread 0,
which gives the state after each thread, and one lane shift gives the state entering it (on more than one warp
the shift would cross warps, and the threads' scan carries the exclusive prefix too); pass 2 reruns each block's
recurrence from the state entering it (one FMA a position) and C * h is accumulated into y. Parallelism comes
from the b * d / BD programs. The state loop's last iteration is peeled off (where that does not spill): it
prefetches the next chunk's first B and C rows, so the others load at chunk-constant offsets.

``reverse=True`` scans right to left by address (chunk j covers addresses [l - (j+1) T, l - j T)) with the
same forward scan: each chunk is loaded as V-position blocks in descending block order, each
block ascending (still 16-byte loads), and every thread reverses its own V positions in registers
(``tl.flip`` over an in-thread axis), so the tile holds descending addresses; outputs go back the same way.
Nothing is flipped in memory, and no data crosses threads (Triton's reverse scan, which cost ~2.4x the
forward's time on an H100, is not used). ``seq_idx`` (b, l) resets the state where the sequence id
changes in scan order (dA = 0 at a new sequence's first position). Masked positions past either end are
identity steps (dt = 0, B = 0). Math is fp32 for every input dtype; all offsets are 64-bit.

Contract with the backward (``blocked_bwd.py``, whose chunk length is S): with ``save_states``,
``chunk_states`` (b, cdiv(l, S), d, n) fp32 holds the state ENTERING scan-order piece j of S positions, i.e.
after scan-order positions < j * S (``chunk_states[:, 0]`` = initial_state or 0), raw: before any seq_idx reset
at the piece's first position. S is the call's ``state_len`` (a power of two dividing T; default :func:`state_spacing` ``(tuning)``): the state after a piece's last position is stored
by the thread holding it, so pieces shorter than the forward's chunk cost one masked store per state and thread.
For ``reverse``, scan-order piece j covers addresses [max(L - (j+1) S, 0), L - j S), L = padded_len(l) below.

Lengths that are not a multiple of 16 run on copies of u, delta, z, B, C whose rows are padded with zeros to
L = ``padded_len(l)`` positions: rows that start unaligned would make every load scalar (~6x slower). The kernel
walks all L positions and treats the pad as identity steps (dt = 0), so a reverse scan starts with L - l of them
(its pieces count from L) and a forward one ends with them; y is written in rows of L and returned as a view.

H100, bf16, softplus + z (details and the sweep: the comment below): b8 d1536 l2048 0.31 ms, b1 d1536 l2^20
20.8 ms, b1 d512 l2^20 10 ms (session 11: 0.35 / 22.9 / 10.3; session 8: 0.41 / 27.2 / 10.5; chunk.py's
l-contiguous path: 0.96 / 90 / 31 ms). About 14 SASS instructions per (position, state) at 16 positions a
thread on one warp (229 a state, sm_90; 16 in session 9, 19 before), in both directions.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqmamba.kernels._dispatch import kernel_module
from seqmamba.kernels.selective_scan.ref import _grouped

LOG2E = 1.4426950408889634

# Tuning (H100, bf16 inputs, softplus + z, medians of do_bench, same run; session 9), as (channels per program,
# chunk T, warps) with the registers capped at MAXNREG:
#   b8 d1536 l2048:   1/512/1 0.341 ms, 1/1024/2 0.371; session 8's 2/1024/4 0.414
#   b1 d1536 l2^20:   1/512/1 23.1 ms,  1/1024/2 25.4;  session 8's 27.2
#   b1 d512  l2^20:   1/1024/2 9.8 ms,  1/512/1 17.6;   session 8's 1/1024/2 10.5
# Each thread should hold 16 consecutive positions (R = 2 V-blocks of 8 bf16): the in-thread passes are then 3
# FMA-pipe ops a (position, state) and the cross-lane scan is paid once per 16 positions; one-warp programs
# need no barrier in the state loop. With few (batch, channel) rows there are too few one-warp programs to hide
# the scan's latency, and 1024-position chunks on 2 warps win. (rows from, T, warps):
PLANS = ((1024, 512, 1), (0, 1024, 2))
# registers a thread: 168 lets 12 one-warp programs share an SM (b1 d1536: 1536 programs, one wave on 132 SMs);
# uncapped, ptxas takes ~205 and b1 d1536 l2^20 takes 39.7 ms instead of 23.1 (b8 0.407 / 0.341 ms)
MAXNREG = 168
# With more one-warp programs than one wave of 12 an SM, up to 16 an SM, 128 registers a thread (no spill in the
# no-grad state loop, 229 instructions) let one wave hold them all. H100, same run, b1 l2^19 no-grad forward ms, 168
# / 128 registers: d1792 19.19 / 14.96, d2048 19.57 / 15.25; one wave either way, d1536 10.40 / 13.93; two waves
# either way, d2560 19.61 / 27.00 (152 and 136 registers: slower than 168 at every row count measured).
MAXNREG_WIDE = 128
# the default spacing of saved states (state_len): divides every plan's chunk
STATE_LEN = 512
# B and C rows are the same for every channel of a group: the programs an SM holds (channels i, i + 132, ...) read
# them through its L1 while they walk the length in step (ncu, b1 d1536 l2^18: 74% L1 hit rate, L2 at 21% of
# peak). Loads carry eviction hints to keep it so: B/C evict_last, the per-channel streams (delta, u, z)
# evict_first (H100, session 11, same run: b1 d1536 l2^20 24.3 -> 22.8 ms with the new softplus, 24.0 without
# hints). That sharing is fragile: _common.sigmoid for the z gate, though 7 instructions shorter an element than
# tl.sigmoid, took 27.0 ms against 24.5 and the L1 hit rate fell to 62% (the programs drift apart), so the
# forward keeps tl.sigmoid.
UNROLL = 1          # state-loop unroll factor (2 measured slower: register pressure)
# B/C loads without masks where every chunk lies inside the rows (l a multiple of the chunk): no zero-fill or
# predicate a load (sm_90: 229 -> 223 instructions a state). Only without saved states and up to
# BC_FULL_MAX_CHUNKS chunks a row. H100, same run, no-grad forward ms, masked / mask-free: b8 d1536 l2048 0.308 /
# 0.297, b1 d1536 l65536 1.234 / 1.174, l131072 2.464 / 2.480, l262144 5.184 / 5.448, l2^20 19.72 / 20.51 (the
# programs an SM holds share B/C through its L1 only while they walk in step: see the B/C note above); saving
# states, fwd+bwd b8 l2048 2.023 / 2.005, b1 l65536 7.09 / 7.22, b2 l32768 8.04 / 8.18
BC_FULL_MAX_CHUNKS = 128
PAIRS = True        # bf16 B/C read as 32-bit pairs where aligned (-16 instructions a state, 3-6% faster)
# (B/C converted to fp32 rows ahead of the kernel, which leaves no unpacking: 43 fewer instructions a state but
# twice the bytes through L1, 1.75x slower at b1 d1536 l2^20; RESULTS session 15)
# load the next chunk's delta and u during the current one (16-bit inputs; fp32 ones would need the registers),
# except for a reverse scan at two channels a program, which it slowed (session 4). tuning["prefetch"] overrides.
PREFETCH_16BIT = True
# Reverse scans: mirrored V-blocks + in-thread tl.flip + the forward scan (_scan_order). Triton's reverse scan
# costs ~2.4x the forward's time on an H100 (b8 d1536 l2048 bf16: 0.98 vs 0.41 ms: butterfly shuffles of its
# inputs and output); an earlier inline-PTX in-thread reversal assumed a register layout Triton does not always
# pick (wrong results at unaligned lengths) and was removed. tl.flip is exact for any layout: where Triton cannot
# prove 16-byte alignment (l not a multiple of 16, odd strides) the V axis is not in-thread and the flip
# crosses threads (slower, still exact).


_common = kernel_module("seqmamba.kernels._triton_common", __name__)
_combine = _common.affine_combine


@triton.jit
def _load_addresses(k, seqlen, T: tl.constexpr, NT: tl.constexpr, V: tl.constexpr, REVERSE: tl.constexpr):
    """(T,) addresses of scan-order chunk k in load order. The tile is laid out as (R, NT, V) (repeats, threads,
    vector): element (r, q, v) holds V-block q * R + r, so each thread holds R * V consecutive positions; a block
    is ascending in memory (16-byte loads), and for a reverse scan the blocks run from the highest address down
    (negative past the start of a reverse scan's last chunk; < 2^31: the rows they are added to are int64)."""
    R: tl.constexpr = T // (NT * V)
    e = tl.arange(0, T)
    blk = (e // V) % NT * R + e // (NT * V)
    if REVERSE:
        return seqlen - k * T - (blk + 1) * V + e % V
    else:
        return k * T + blk * V + e % V


@triton.jit
def _scan_order(x, V: tl.constexpr, REVERSE: tl.constexpr):
    """(rows, T) tile in load order -> scan order (reverse each V block: descending addresses), or back (an
    involution). V is the thread's vector width, so the flip stays inside each thread's registers."""
    if REVERSE:
        R: tl.constexpr = x.shape[0]
        T: tl.constexpr = x.shape[1]
        return tl.reshape(tl.flip(tl.reshape(x, (R, T // V, V)), 2), (R, T))
    else:
        return x


@triton.jit
def _chunk_inputs(delta_ptr, u_ptr, dl_row, u_row, seqlen, k, n_chunks, T: tl.constexpr, NT: tl.constexpr,
                  V: tl.constexpr, REVERSE: tl.constexpr):
    """Raw (BD, T) delta and u of scan-order chunk k in load order (zero past either end, or when
    k >= n_chunks)."""
    t = _load_addresses(k, seqlen, T, NT, V, REVERSE)
    mask = ((t >= 0) & (t < seqlen) & (k < n_chunks))[None, :]
    dl = tl.load(delta_ptr + dl_row[:, None] + t[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
    u = tl.load(u_ptr + u_row[:, None] + t[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
    return dl, u


@triton.jit
def _bc_offsets(k, n_chunks, seqlen, T: tl.constexpr, NT: tl.constexpr, V: tl.constexpr, REVERSE: tl.constexpr,
                PAIRS: tl.constexpr, FULL: tl.constexpr):
    """Offsets in a B or C row of scan-order chunk k, in load order, and their mask (none when k >= n_chunks),
    for ``_bc_load``. With PAIRS (bf16 rows at even offsets, seqlen even, V >= 2) a row is read as T/2 32-bit
    words (offsets in words): a word is then wholly in or out of range. FULL (every chunk lies inside the rows,
    the loads take no mask): a chunk past the last one reads the last one instead (the peeled prefetch after the
    last chunk, whose rows nobody uses), so no load leaves the rows."""
    if FULL:
        k = tl.minimum(k, n_chunks - 1)
    if PAIRS:
        w = _load_addresses(k, seqlen // 2, T // 2, NT, V // 2, REVERSE)
        return w, (k < n_chunks) & (w >= 0) & (w < seqlen // 2)
    else:
        t = _load_addresses(k, seqlen, T, NT, V, REVERSE)
        return t, (k < n_chunks) & (t >= 0) & (t < seqlen)


@triton.jit
def _bc_load(B_row, C_row, w, m, FULL: tl.constexpr):
    """A state's B and C rows of one chunk as loaded (zero where masked), for ``_bc_row``: B_row, C_row point
    at the rows' starts (bf16, or int32 words with PAIRS), w and m from ``_bc_offsets``."""
    if FULL:  # no mask: no zero-fill of the registers and no predicate
        return (tl.load(B_row + w, eviction_policy="evict_last"), tl.load(C_row + w, eviction_policy="evict_last"))
    return (tl.load(B_row + w, mask=m, other=0, eviction_policy="evict_last"),
            tl.load(C_row + w, mask=m, other=0, eviction_policy="evict_last"))


@triton.jit
def _bc_row(x, T: tl.constexpr, NT: tl.constexpr, V: tl.constexpr, REVERSE: tl.constexpr, PAIRS: tl.constexpr):
    """A row from ``_bc_words`` as (1, R, NT, V) fp32 in scan order. bf16 pairs unpack with one integer op per
    value instead of the 1.5 that a bf16 -> fp32 conversion of packed registers costs."""
    if PAIRS:
        lo = (x << 16).to(tl.float32, bitcast=True)
        hi = (x & -65536).to(tl.float32, bitcast=True)
        x = tl.reshape(tl.join(lo, hi), (T,))
    else:
        x = x.to(tl.float32)
    R: tl.constexpr = T // (NT * V)
    return tl.reshape(_scan_order(x[None, :], V, REVERSE), (1, R, NT, V))


@triton.jit
def _state_scalars(A_ptr, hT_ptr, d_off, h_row, n, nstate):
    """State n's A[:, n] * log2(e) and carried state, (BD,) each (unmasked: past the last state, the last state's
    values, never used)."""
    nc = tl.minimum(n, nstate - 1)
    return tl.load(A_ptr + d_off * nstate + nc).to(tl.float32) * 1.4426950408889634, tl.load(hT_ptr + h_row + nc)


@triton.jit
def _prefix_combine(a1, b1, ea1, eb1, a2, b2, ea2, eb2):
    # (map of a run of positions, map of the run without its last element), composed in scan order (run 1 first):
    # the whole, and run 1 followed by run 2 without its last element
    return a1 * a2, a2 * b1 + b2, a1 * ea2, ea2 * b1 + eb2


@triton.jit
def _state_step(acc, n, k, a2, h_in, B_w, C_w, dt4, dtu4, dt_blk, keep, keep_blk, pb, d_off, h_row, hT_ptr, cs_ptr,
                dim, nstate, n_saved, HAS_SEQ: tl.constexpr, SAVE_STATES: tl.constexpr, S: tl.constexpr,
                T: tl.constexpr, NT: tl.constexpr, V: tl.constexpr, REVERSE: tl.constexpr, PAIRS: tl.constexpr):
    """State n of chunk k: solves the recurrence over the chunk's (BD, R, NT, V) tile from the carry ``h_in``
    (BD,), stores the state after the chunk (the next chunk's carry) and, with SAVE_STATES, the states entering
    its S-position pieces; returns ``acc`` + C h."""
    R: tl.constexpr = T // (NT * V)
    v4 = tl.arange(0, V)[None, None, None, :]
    r3 = tl.arange(0, R)[None, :, None]
    q3 = tl.arange(0, NT)[None, None, :]
    q2 = tl.arange(0, NT)[None, :]
    last_r = r3 == R - 1
    if SAVE_STATES:  # the state entering the chunk: the carry in, already in registers (one thread stores)
        tl.store(cs_ptr + (((pb * n_saved + k * (T // S)) * dim + d_off) * nstate + n)[:, None] + q2 * 0,
                 h_in[:, None] + 0.0 * q2, mask=q2 == 0)
    Bn = _bc_row(B_w, T, NT, V, REVERSE, PAIRS)
    Cn = _bc_row(C_w, T, NT, V, REVERSE, PAIRS)
    dA = tl.exp2(dt4 * a2[:, None, None, None])     # (BD, R, NT, V)
    P_blk = tl.exp2(dt_blk * a2[:, None, None])     # (BD, R, NT)
    if HAS_SEQ:
        dA = tl.where(keep, dA, 0.0)
        P_blk = tl.where(keep_blk, P_blk, 0.0)
    bx = dtu4 * Bn
    # pass 1, in registers: each V-block's scan from 0 (its end), then the blocks' prefixes in the thread
    # (a scan, not tl.reduce: the reduction's combine order over a thread's registers is not the
    # positions' order, and the affine combine does not commute)
    _, h_loc = tl.associative_scan((dA, bx), 3, _combine)
    h_blk = _common.pick(h_loc, v4 == V - 1, 3)
    P_in, H_in, Pe_in, He_in = tl.associative_scan((P_blk, h_blk, tl.full(P_blk.shape, 1.0, tl.float32),
                                                    _common.neg_zeros(P_blk.shape)), 1, _prefix_combine)
    P_thr = _common.pick(P_in, last_r, 1)                           # (BD, NT): the thread's whole map
    H_thr = _common.pick(H_in, last_r, 1)
    if NT <= 32:
        # across the warp's threads: the carry in folded into thread 0, scanned (the state after each thread),
        # then shifted by one lane (the state entering each thread): one shuffle
        H_thr = tl.where(q2 == 0, H_thr + P_thr * h_in[:, None], H_thr)
        _, h_exit = tl.associative_scan((P_thr, H_thr), 1, _combine)    # (BD, NT)
        h_enter = tl.gather(h_exit, tl.broadcast_to(tl.maximum(q2 - 1, 0), h_exit.shape), 1)
        h_enter = tl.where(q2 == 0, h_in[:, None], h_enter)
    else:
        # across warps the shift would be a shared-memory round trip: the scan carries each thread's exclusive
        # prefix beside the inclusive one instead
        P_ex, H_ex, Pe, He = tl.associative_scan((P_thr, H_thr, tl.full(P_thr.shape, 1.0, tl.float32),
                                                  _common.neg_zeros(P_thr.shape)), 1, _prefix_combine)
        h_enter = He + Pe * h_in[:, None]                               # (BD, NT)
        h_exit = H_ex + P_ex * h_in[:, None]
    tl.store(hT_ptr + (h_row + n)[:, None] + q2 * 0, h_exit, mask=q2 == NT - 1)   # the next chunk's carry
    h_blk_in = He_in + Pe_in * h_enter[:, None, :]                  # (BD, R, NT): state entering each block
    if SAVE_STATES and S < T and S % (R * V) == 0 and REVERSE:
        # pieces end where threads end: the state after such a thread, from the cross-thread scan. H100, T512 S128
        # one warp, same run, ms against the block states below: reverse b8 d1536 l2048 0.356 -> 0.320, b1 l65536
        # 1.571 -> 1.304, l2^20 30.98 -> 20.75; forward 0.360 -> 0.347, 1.447 -> 1.509, 23.77 -> 27.12 (sm_90
        # state loop 264 -> 244 reverse, 273 -> 244 forward: the forward at long lengths is not bound by its
        # instruction count, see the B/C note by the tuning constants), so forward scans keep the block states
        thr_end = (q2 + 1) * (R * V)                                    # (1, NT)
        j2 = k * (T // S) + thr_end // S
        tl.store(cs_ptr + ((pb * n_saved + j2) * dim + d_off[:, None]) * nstate + n, h_exit,
                 mask=(thr_end % S == 0) & (thr_end < T) & (j2 < n_saved))
    elif SAVE_STATES and S < T:
        # scan positions where each V-block ends (the thread's r-th block is block q * R + r): the state after a
        # block is saved where that position ends one of the chunk's S-position pieces (all but the chunk's last
        # piece: that state is the next chunk's, saved at its start); S is a multiple of V
        block_end = (q3 * R + r3 + 1) * V                                   # (1, R, NT)
        saves = (block_end % S == 0) & (block_end < T)
        j = k * (T // S) + block_end // S                               # the piece it enters
        tl.store(cs_ptr + ((pb * n_saved + j) * dim + d_off[:, None, None]) * nstate + n,
                 h_blk + P_blk * h_blk_in, mask=saves & (j < n_saved))
    # pass 2: each block's scan from the state entering it
    bx = tl.where(v4 == 0, bx + dA * h_blk_in[:, :, :, None], bx)
    _, h = tl.associative_scan((dA, bx), 3, _combine)
    return acc + h * Cn


@triton.jit
def _blocked_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, h0_ptr, hT_ptr, cs_ptr, seq_ptr,
    su_b, su_d, sdl_b, sdl_d, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, sz_b, sz_d, sy_b, sy_d, sy_l, ss_b,
    dim, nstate, seqlen, live_len, cpg, n_chunks, n_saved,
    HAS_H0: tl.constexpr, PADDED: tl.constexpr, SAVE_STATES: tl.constexpr, S: tl.constexpr, HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr,
    ACCUM: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr, NT: tl.constexpr,
    V: tl.constexpr, UNROLL: tl.constexpr, PAIRS: tl.constexpr, PREFETCH: tl.constexpr, BC_FULL: tl.constexpr = False,
):
    """One program: batch row pid // (d / BD), channels [BD * (pid % (d / BD)), + BD). u, delta, z, B, C have
    l-stride 1 (the launcher makes sure). States (b, [n_chunks,] d, n) fp32 contiguous. With PADDED the rows are
    ``seqlen`` long but hold ``live_len`` positions, then zeros: the pad is a run of identity steps (dt = 0), at
    the end of a forward scan and at the start of a reverse one, and seq_idx (b, live_len) is read unpadded.

    The carried state lives in the program's own slab of the final-state buffer hT (read and written by this
    program only; a barrier at each chunk start orders the writes of one chunk before the reads of the next).
    A chunk's tiles are viewed as (BD, R, NT, V) = (channels, repeats, threads, vector), the layout Triton gives
    a (BD, T) tile of 16-byte loads on NT threads; ``_load_addresses`` maps element (r, q, v) to position
    (q R + r) V + v, so the V and R axes are a thread's own registers and the passes over them need no data from
    other threads. Tiles are loaded and stored in load order and computed on in scan order (``_scan_order``; the
    same for a forward scan). The launch caps registers (MAXNREG) so that enough programs share an SM."""
    R: tl.constexpr = T // (NT * V)
    if PADDED:
        n_live = live_len
    else:
        n_live = seqlen
    pid = tl.program_id(0)
    ndb = dim // BD
    pb = (pid // ndb).to(tl.int64)
    dblk = pid % ndb
    d_off = (dblk * BD + tl.arange(0, BD)).to(tl.int64)           # (BD,)
    grp = ((dblk * BD) // cpg).to(tl.int64)                       # BD divides cpg: one group per program
    n_ar = tl.arange(0, BN)
    h_row = pb * dim * nstate + d_off * nstate                     # (BD,) this program's rows of hT
    dn_off = h_row[:, None] + n_ar[None, :]                        # (BD, BN)
    dn_mask = (n_ar < nstate)[None, :] & (d_off < dim)[:, None]

    if HAS_BIAS:
        bias = tl.load(bias_ptr + d_off).to(tl.float32)
    else:
        bias = tl.zeros([BD], dtype=tl.float32)  # unused (HAS_BIAS off): delta_to_dt takes an argument
    if HAS_D:
        Dv = tl.load(D_ptr + d_off).to(tl.float32)
    if HAS_H0:
        hc = tl.load(h0_ptr + dn_off, mask=dn_mask, other=0.0)
    else:
        hc = tl.zeros([BD, BN], dtype=tl.float32)
    tl.store(hT_ptr + dn_off, hc, mask=dn_mask)

    u_row = pb * su_b + d_off * su_d
    dl_row = pb * sdl_b + d_off * sdl_d
    z_row = pb * sz_b + d_off * sz_d
    y_row = pb * sy_b + d_off * sy_d
    if PAIRS:  # rows read as 32-bit words (even offsets and strides)
        B_base = B_ptr.to(tl.pointer_type(tl.int32)) + (pb * sB_b + grp * sB_g) // 2
        C_base = C_ptr.to(tl.pointer_type(tl.int32)) + (pb * sC_b + grp * sC_g) // 2
        sBn = sB_n // 2
        sCn = sC_n // 2
    else:
        B_base = B_ptr + pb * sB_b + grp * sB_g
        C_base = C_ptr + pb * sC_b + grp * sC_g
        sBn = sB_n
        sCn = sC_n

    # the state loop's last iteration is peeled off to prefetch the next chunk's first B and C rows, except where
    # that spills at the register cap (sm_90: saving states in reverse scans or on two warps); there each chunk
    # loads its first rows itself
    PEEL: tl.constexpr = 0 if SAVE_STATES and (REVERSE or NT > 32) else 1
    if PEEL:
        w0, m0 = _bc_offsets(0, n_chunks, seqlen, T, NT, V, REVERSE, PAIRS, BC_FULL)
        B_w, C_w = _bc_load(B_base, C_base, w0, m0, BC_FULL)
    a2_first = _state_scalars(A_ptr, hT_ptr, d_off, h_row, 0, nstate)[0]
    # chunk 0's delta and u; with PREFETCH each chunk then loads the next chunk's while it computes
    dl_x, u_x = _chunk_inputs(delta_ptr, u_ptr, dl_row, u_row, seqlen, 0, n_chunks, T, NT, V, REVERSE)
    for k in range(0, n_chunks):
        tl.debug_barrier()  # the previous chunk's carry writes (or the initial state) before this chunk's reads
        t = _load_addresses(k, seqlen, T, NT, V, REVERSE)  # load order
        valid = (t >= 0) & (t < seqlen)
        mask = valid[None, :]
        if REVERSE:  # scan order: element (r, q, v) is the chunk's scan position (q R + r) V + v
            ts = seqlen - k * T - 1 - _load_addresses(0, seqlen, T, NT, V, False)
        else:
            ts = t
        mask_s = ((ts >= 0) & (ts < n_live))[None, :]
        if PREFETCH:
            dl = dl_x.to(tl.float32)
            u = u_x.to(tl.float32)
            dl_x, u_x = _chunk_inputs(delta_ptr, u_ptr, dl_row, u_row, seqlen, k + 1, n_chunks, T, NT, V, REVERSE)
        else:
            dl_k, u_k = _chunk_inputs(delta_ptr, u_ptr, dl_row, u_row, seqlen, k, n_chunks, T, NT, V, REVERSE)
            dl = dl_k.to(tl.float32)
            u = u_k.to(tl.float32)
        if HAS_Z:  # loaded now, used after the state loop
            z_k = tl.load(z_ptr + z_row[:, None] + t[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        dl, u = _scan_order(dl, V, REVERSE), _scan_order(u, V, REVERSE)
        dl, dt = _common.delta_to_dt(dl, mask_s, bias, HAS_BIAS, SOFTPLUS)  # (BD, T); dt 0: an identity step
        dt4 = tl.reshape(dt, (BD, R, NT, V))
        dtu4 = tl.reshape(dt * u, (BD, R, NT, V))
        dt_blk = tl.sum(dt4, 3)                             # (BD, R, NT): a block's decay is exp(A * dt_blk)
        keep = 0  # placeholders without HAS_SEQ
        keep_blk = 0
        if HAS_SEQ:  # False where the scan predecessor belongs to another sequence (state reset)
            if REVERSE:
                tp = ts + 1
            else:
                tp = ts - 1
            ok = (ts >= 0) & (ts < n_live) & (tp >= 0) & (tp < n_live)
            s_t = tl.load(seq_ptr + pb * ss_b + ts, mask=ok, other=0)
            s_p = tl.load(seq_ptr + pb * ss_b + tp, mask=ok, other=0)
            keep = tl.reshape((s_t == s_p)[None, :], (1, R, NT, V))
            keep_blk = tl.min(keep.to(tl.int32), 3) != 0    # (1, R, NT): no reset inside the block
        if HAS_D:  # the skip term first: u is then dead during the state loop
            acc = tl.reshape(Dv[:, None] * u, (BD, R, NT, V))
        else:
            acc = tl.zeros([BD, R, NT, V], dtype=tl.float32)
        # each state loads the next one's operands while it computes (B and C rows across the chunk boundary, A and
        # the carry within the chunk: the carry slots read here were written in the previous chunk, before the
        # barrier above): the loads are L2 round trips that would otherwise stall every state
        h_in = _state_scalars(A_ptr, hT_ptr, d_off, h_row, 0, nstate)[1]
        a2 = a2_first
        # the offsets in this chunk's B and C rows (chunk-constant: no per-state address arithmetic)
        w_cur, m_cur = _bc_offsets(k, n_chunks, seqlen, T, NT, V, REVERSE, PAIRS, BC_FULL)
        if not PEEL:  # this chunk's first B and C rows
            B_w, C_w = _bc_load(B_base, C_base, w_cur, m_cur, BC_FULL)
        for n in tl.range(0, nstate - PEEL, loop_unroll_factor=UNROLL):
            if PEEL:
                B_x, C_x = _bc_load(B_base + (n + 1) * sBn, C_base + (n + 1) * sCn, w_cur, m_cur, BC_FULL)
            else:
                n_x = tl.minimum(n + 1, nstate - 1)  # the last state loads its own rows again (unused)
                B_x, C_x = _bc_load(B_base + n_x * sBn, C_base + n_x * sCn, w_cur, m_cur, BC_FULL)
            a2_x, h_x = _state_scalars(A_ptr, hT_ptr, d_off, h_row, n + 1, nstate)
            acc = _state_step(acc, n, k, a2, h_in, B_w, C_w, dt4, dtu4, dt_blk, keep, keep_blk, pb, d_off, h_row,
                              hT_ptr, cs_ptr, dim, nstate, n_saved, HAS_SEQ, SAVE_STATES, S, T, NT, V, REVERSE,
                              PAIRS)
            B_w, C_w, a2, h_in = B_x, C_x, a2_x, h_x
        if PEEL:  # the last state loads the next chunk's first B and C rows
            w_nxt, m_nxt = _bc_offsets(k + 1, n_chunks, seqlen, T, NT, V, REVERSE, PAIRS, BC_FULL)
            B_x, C_x = _bc_load(B_base, C_base, w_nxt, m_nxt, BC_FULL)
            acc = _state_step(acc, nstate - 1, k, a2, h_in, B_w, C_w, dt4, dtu4, dt_blk, keep, keep_blk, pb, d_off,
                              h_row, hT_ptr, cs_ptr, dim, nstate, n_saved, HAS_SEQ, SAVE_STATES, S, T, NT, V,
                              REVERSE, PAIRS)
            B_w, C_w = B_x, C_x
        acc = tl.reshape(acc, (BD, T))
        if HAS_Z:
            zz = _scan_order(z_k.to(tl.float32), V, REVERSE)
            acc = acc * zz * tl.sigmoid(zz)  # not _common.sigmoid: see the B/C note by the tuning constants
        acc = _scan_order(acc, V, REVERSE)                 # back to load order
        y_off = y_row[:, None] + t[None, :] * sy_l
        if ACCUM:  # add into what y holds (e.g. the other direction of a bidirectional layer)
            acc += tl.load(y_ptr + y_off, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask)


def tile_layout(T: int, warps: int, elt_size: int, S: int) -> tuple[int, int]:
    """(NT, V) of the kernel's (BD, T) tile: 16-byte vectors of ``elt_size``-byte inputs on NT = 32 * warps
    threads (at most T), repeated over T; V at most the saved-state spacing S, so that pieces end at thread
    boundaries."""
    nt = min(32 * warps, T)
    return nt, max(1, min(16 // elt_size, T // nt, S))


def state_spacing(tuning: dict | None = None) -> int:
    """S of a call made with ``tuning`` (the chunk_states contract): ``tuning["state_len"]``, else its
    ``chunk``, else STATE_LEN."""
    tuning = tuning or {}
    return int(tuning.get("state_len") or tuning.get("chunk") or STATE_LEN)


def default_plan(rows: int) -> tuple[int, int]:
    """(chunk T, warps) of a call on ``rows`` = b * d (batch, channel) rows without tuning (PLANS)."""
    return next((T, w) for min_rows, T, w in PLANS if rows >= min_rows)


def _plan(rows: int, cpg: int, elt_size: int, reverse: bool, tuning: dict) -> tuple[int, int, int, bool]:
    """(chunk T, channels per program, warps, prefetch) for a call on ``rows`` = b * d rows: the tuning's values
    where given (None: default), else the module's measured defaults (see the table at the top)."""
    plan_T, plan_warps = default_plan(rows)
    T = int(tuning.get("chunk") or plan_T)
    bd = _common.pow2_divisor(cpg, int(tuning.get("bd") or 1))
    warps = int(tuning.get("num_warps") or plan_warps)
    prefetch = tuning.get("prefetch")
    if prefetch is None:
        prefetch = PREFETCH_16BIT and elt_size <= 2 and (not reverse or bd == 1)
    return T, bd, warps, bool(prefetch)


def default_maxnreg(programs: int, warps: int, sms: int) -> int:
    """Registers a thread for ``programs`` programs of ``warps`` warps on ``sms`` SMs: MAXNREG, or MAXNREG_WIDE
    where one-warp programs fit one wave at MAXNREG_WIDE (16 an SM) but not at MAXNREG (12)."""
    per_sm = _common.warps_per_sm
    if warps == 1 and per_sm(MAXNREG) * sms < programs <= per_sm(MAXNREG_WIDE) * sms:
        return MAXNREG_WIDE
    return MAXNREG


def _mask_free(lp: int, T: int, save_states: bool, tuning: dict) -> bool:
    """Whether B/C load without masks: every chunk inside rows of ``lp`` positions, and ``tuning["bc_full"]``
    (None: without saved states, at most BC_FULL_MAX_CHUNKS chunks)."""
    forced = tuning.get("bc_full")
    if forced is None:
        forced = not save_states and lp // T <= BC_FULL_MAX_CHUNKS
    return lp % T == 0 and bool(forced)


def blocked_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False, initial_state=None,
                reverse=False, seq_idx=None, save_states=False, out=None, **tuning):
    """Selective scan forward in one pass. u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l);
    D, delta_bias: (d,); initial_state: (b, d, n); seq_idx: (b, l) integers (see
    :func:`seqmamba.kernels.selective_scan.selective_scan`). Inputs fp32/bf16/fp16 (A, D, delta_bias any float),
    on a CUDA device or under TRITON_INTERPRET=1; arguments are assumed validated by the caller.

    Returns ``(y, final_state, chunk_states)``: y (b, d, l) in u's dtype, l-contiguous, in rows of
    ``padded_len(l)`` (a view of aligned storage where l is not a multiple of 16: ``_common.aligned_rows``), or
    ``out`` with y added into it when ``out`` (a (b, d, l) tensor laid out like y) is given; final_state
    (b, d, n) fp32; chunk_states (b, cdiv(padded_len(l), S), d, n) fp32 when ``save_states`` (module docstring:
    the state entering each piece of S positions), else None. ``tuning`` (each optional, None = default):
    ``chunk`` (T, a power of two; default by the row count b * d, see PLANS), ``state_len`` (S, a power of two
    <= T; default :func:`state_spacing`), ``bd`` (channels per program, capped to a power of two dividing
    d // g), ``num_warps``, ``unroll`` (state loop), ``pairs``, ``prefetch``, ``bc_full`` (bools), ``maxnreg``
    (registers a thread, 0: uncapped; default :func:`default_maxnreg`).
    """
    b, d, l = u.shape
    n = A.shape[1]
    lp = _common.padded_len(l)  # the kernel's row length (aligned_rows)
    u, delta, z, B, C = (_common.aligned_rows(t, lp) for t in (u, delta, z, B, C))
    B4, C4 = _grouped(B), _grouped(C)
    cpg = d // B4.shape[1]
    T, bd, warps, prefetch = _plan(b * d, cpg, max(u.element_size(), delta.element_size()), reverse, tuning)
    if T < 1 or T & (T - 1):
        raise ValueError(f"blocked_fwd: chunk must be a power of two, got {T}")
    BN = max(triton.next_power_of_2(n), 2)
    n_chunks = triton.cdiv(lp, T)
    f32 = dict(device=u.device, dtype=torch.float32)
    accum = out
    if out is not None and lp != l and out.stride() != (d * lp, lp, 1):
        out = None  # not rows of aligned storage: y is added into it afterwards
    y = _common.new_rows((b, d, l), device=u.device, dtype=u.dtype) if out is None else out
    final = torch.empty(b, d, n, **f32)
    S = state_spacing(tuning)
    if S < 1 or S & (S - 1) or S > T:
        raise ValueError(f"blocked_fwd: state_len must be a power of two <= chunk ({T}), got {S}")
    n_saved = triton.cdiv(lp, S)
    states = torch.empty(b, n_saved, d, n, **f32) if save_states else final
    h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else None
    seq = seq_idx.contiguous() if seq_idx is not None else None
    dummy = final
    nt, vec = tile_layout(T, warps, max(t.element_size() for t in (u, delta, z, B, C) if t is not None), S)
    # bf16 B and C read as 32-bit pairs where every pair is aligned and wholly in or out of range (the V-blocks
    # must hold whole pairs: V >= 2)
    pairs = bool(tuning.get("pairs", PAIRS)) and B.dtype == C.dtype == torch.bfloat16 and vec >= 2 and all(
        s % 2 == 0 for s in (*B4.stride()[:3], *C4.stride()[:3], lp, B4.storage_offset(), C4.storage_offset()))
    if b * d == 0:
        return y, final.zero_() if h0 is None else final.copy_(h0), (states if save_states else None)
    maxnreg = tuning.get("maxnreg", default_maxnreg(b * (d // bd), warps, _common.sm_count(u.device)))
    _blocked_fwd_kernel[(b * (d // bd),)](
        u, delta, A.contiguous(), B4, C4, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, y, h0 if h0 is not None else dummy, final, states,
        seq if seq is not None else dummy,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B4.stride(0), B4.stride(1), B4.stride(2),
        C4.stride(0), C4.stride(1), C4.stride(2), *((z.stride(0), z.stride(1)) if z is not None else (0, 0)),
        y.stride(0), y.stride(1), y.stride(2), seq.stride(0) if seq is not None else 0,
        d, n, lp, l, cpg, n_chunks, n_saved,
        HAS_H0=h0 is not None, PADDED=lp != l, SAVE_STATES=bool(save_states), S=S, HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus), REVERSE=bool(reverse),
        HAS_SEQ=seq is not None, ACCUM=out is not None, BD=bd, BN=BN, T=T, NT=nt, V=vec,
        UNROLL=int(tuning.get("unroll") or UNROLL), PAIRS=pairs,
        PREFETCH=prefetch, BC_FULL=_mask_free(lp, T, save_states, tuning), num_warps=warps,
        **({"maxnreg": maxnreg} if maxnreg else {}))
    if accum is not None and out is None:
        y = accum.add_(y)
    return y, final, (states if save_states else None)
