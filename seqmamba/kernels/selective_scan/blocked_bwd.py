"""Triton selective-scan backward in the blocked design: positions across threads, one pass over the length.

Same math as :func:`seqmamba.kernels.selective_scan.ref.selective_scan_ref`; in scan order (position j has
address t = j, or l-1-j when ``reverse``; nothing is flipped in memory):

    dt_j = softplus(delta_j + bias)      a_j = exp(dt_j A) * keep_j      x_j = dt_j B_j u_j
    h_j  = a_j h_{j-1} + x_j              y_j = (sum_n C_j h_j + D u_j) * silu(z_j)

``keep_j`` is 0 where ``seq_idx`` starts a new sequence at j (1 elsewhere). With dy_pre = dy * silu(z) and
g_j = dL/dh_j (all paths):

    g_j  = C_j dy_pre_j + a_{j+1} g_{j+1}            g at the last position gets dht (a_l = 1)
    with xa_j = a_j h_{j-1} = h_j - x_j (no division, no shifted state):
    du_j     = dt_j sum_n g_j B_j + D dy_pre_j
    d dt_j   = sum_n g_j (B_j u_j + A xa_j)         ddelta = d dt * sigmoid(delta + bias) under softplus
    dA[n]    = sum_j g_j dt_j xa_j                  dD = sum_j u_j dy_pre_j      dbias = sum_j ddelta_j
    dB_j[n]  = sum_channels g_j dt_j u_j            dC_j[n] = sum_channels h_j dy_pre_j
    dz_j     = dy_j y_pre_j silu'(z_j)              dh0 = a_0 g_0

Input: the forward's ``chunk_states`` (b, n_chunks, d, n) fp32, the state ENTERING each chunk of ``T`` scan-order
positions, T being the forward's ``state_len`` (chunk_states[:, 0] = initial state or 0; raw, before any seq_idx
reset at the chunk's first position): the contract of ``blocked_fwd.py``.

One program per (batch, block of ``BD`` channels) walks the chunks in reverse scan order and carries, in a slab of
the dh0 buffer, w = a g at the first position of the chunk just done (BD, n): the term a_{j+1} g_{j+1} that
enters the g of the chunk's last position, and at scan position 0 dh0 itself (two-warp plans carry g and take
dh0 = a_0 g_0 at the end). Per chunk it loads u, delta, z,
dy (BD, T), and for each state index n (the next state's B, C and carries loading meanwhile): rescans h from
the chunk state (a forward ``tl.associative_scan``), scans g backward from the carry (``_reverse_scan``:
Triton's own reverse scan shuffles every element across lanes), and accumulates every gradient. One exp per
(position, channel, state): on one warp a_{j+1} is a_j moved over by one position (``_scan_successor``: moves
within each thread's registers and one shuffle a thread; H100, blocked_bwd alone, same run, against a second
exp from delta loaded one position later: b8 d1536 l2048 1.326 -> 1.192 ms, b4 l16384 5.09 -> 4.51, b1 l2^20
88.9 -> 86.7, reverse 104.8 -> 100.0; across warps the move would go through shared memory, so two-warp plans
keep the second exp). The chunk is short (under autograd chunk.py picks ``T`` = 256 on one warp, 8 positions a
thread, while one wave of such programs holds every (batch, channel) row, and T = 128 with more rows, 512 on two
warps with few, 1024 on four with very few; see chunk.py's _state_len): the forward saves the state entering
every T positions for it, however long its own chunks are.

Loads carry eviction hints on one-warp plans, as in the forward: B and C rows (the same for every channel of a
group, read through L1 by the programs an SM holds) evict_last, the per-channel streams evict_first (H100, same
run, with the reverse-direction gather below: b1 d1536 l2^20 kernel 93.4 -> 89.1 ms forward, 105.8 -> 90.8
reverse; on two warps they cost 1-3%, so those plans load without them).

dA, dD and dbias stay in registers and are written once per program as per-batch partials (summed by torch over
the batch). On more than one warp, the sum over a chunk's positions that dA takes per state would cross warps
through shared memory and a barrier; there each thread instead keeps its own running sums, one slot per
(channel, state, thread) of a buffer that torch sums (H100, b1 d512 l2^20, 2 warps: fwd+bwd 49.7 -> 45.7 ms; on
one warp, where the sum is 5 shuffles, the slots were 0-10% slower). dB and dC, sums over the channels of a
group, are summed over the program's BD channels and added into fp32 (b, g, n, l) buffers with
``tl.atomic_add``: the order of those additions varies from run to run, so this backward is NOT bitwise
deterministic (chunk.py keeps the deterministic kernels for ``torch.use_deterministic_algorithms(True)``).

Accumulation is fp32 for every input dtype; du, ddelta, dz are written in their inputs' dtypes (rows of
padded_len(l): lengths not a multiple of 16 run on zero-padded copies, as in ``blocked_fwd.py``, the pad being
identity steps); all offsets are 64-bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqmamba.kernels._dispatch import kernel_module
from seqmamba.kernels.selective_scan.ref import _grouped

LOG2E = 1.4426950408889634

# Channels per program and warps per chunk length T. H100 sweep (bf16, b1 d1536 l65536 and b8 d1536 l2048, bwd
# ms, before _reverse_scan and the state prefetch): one channel a program won at every T (two: 5-25% slower, more
# spills); warps T128:1 (10.4 / 2.12), T256:1 (13.8 / 2.39), T512:4 (11.4 / 2.31; 2 warps 12.4 / 2.61), T1024:4
# (12.9 / 2.65; 8 warps 20.8 / 3.95), T2048:8 (14.1 / 2.96). With both (session 8, same run, l65536 / l2^20 bwd
# ms): T128 one warp 6.7 / 105, two channels a program 8.7 / 139; T256 one warp 8.3 / 120, two warps 9.7 / 154;
# T512 two warps 8.0 / 125, four 10.5 / 168; T64 one warp, two channels 13.1 / 209. Which T a call gets: chunk.py.
# Session 22 (same run, blocked_bwd alone, T128 one warp, bf16, ms for 1 / 2 channels a program, forward / reverse
# scan): b1 d1536 l2^20 (1536 rows) 89.3 / 115.5, 98.6 / 99.1; b1 d2048 l2^18 (2048) 29.7 / 29.4, 31.4 / 24.0;
# b2 d1536 l32768 (3072) 6.63 / 6.54, 6.66 / 5.32; b4 d1536 l16384 (6144) 5.52 / 5.51, 5.49 / 4.52; b8 d1536 l2048
# (12288) 1.70 / 1.43, 1.69 / 1.21. Two channels hold both rows in each thread (~240 registers, 8 programs an SM):
# B and C load once for both and dB/dC take half the atomics, which pays once there are programs enough to fill
# the SMs. (from this many (batch, channel) rows, channels a program):
BLOCK_D_ROWS = ((2048, 2), (0, 1))
WARPS = {128: 1, 256: 1, 512: 2, 1024: 4, 2048: 8}
# The backward-running scan (g for a forward scan, h for a reverse one) crosses lanes by gather (_reverse_scan) at
# 8 positions a thread, and at V <= 4 except for a forward scan at one channel a program. H100, blocked_bwd alone,
# same run: the reverse scan's h by gather, b1 d1536 l2^20 105.8 -> 90.8 ms; the forward scan's g by gather
# (session 22, ms, suffix scan / gather), one channel a program: b1 d1536 l2^20 88.9 / 96.3, b8 d1536 l2048 1.67 /
# 1.65; two: b1 d2048 l2^18 29.4 / 27.0, b2 d1536 l32768 6.54 / 6.00, b8 l2048 1.42 / 1.32 (fp32 inputs 1.69 /
# 1.32). At 8 positions (T = 256, one warp; session 23, ms, suffix scan / gather, uncapped registers): b1 d1536
# l2^20 128.5 / 121.4, b1 d768 l2^20 57.6 / 54.2 (reverse 60.1 / 58.4), b1 d1024 l2^20 67.4 / 65.3 (reverse 68.8 /
# 65.6), b2 d512 l2^19 32.6 / 31.0 (reverse 32.9 / 31.3); capped at 168 registers, b1 d1536 l2^20 91.3 / 81.5
# (reverse 94.7 / 94.6).


def _gather(gather, reverse: bool, V: int, BD: int) -> bool:
    """Whether the backward-running scan crosses lanes by gather: ``gather`` if given, else the rule above."""
    if gather is not None:
        return bool(gather)
    return V == 8 or (V <= 4 and (bool(reverse) or BD > 1))


# Registers a thread of one-warp, one-channel programs by chunk length T: at T = 256 (8 positions a thread) ptxas
# takes 230 uncapped, so 8 programs share an SM; capped at 168 (no spills in the state loop, 370 SASS instructions
# a state against 373), 12 do. H100, blocked_bwd alone, same run (session 23), gather on, ms uncapped / capped:
# b1 d1536 l2^20 121.4 / 81.5, b1 d1280 l2^20 119.0 / 71.5 (reverse 121.8 / 77.7), b1 d1024 l2^20 65.3 / 55.4
# (reverse 65.6 / 65.8), b1 d768 l2^20 54.2 / 52.3 (reverse 58.4 / 57.7), b2 d512 l2^19 31.0 / 27.4 (reverse
# 31.3 / 32.1), b1 d1024 l65536 3.97 / 3.70 (reverse 4.03 / 4.15). Other plans run uncapped.
MAXNREG = {256: 168}


def default_maxnreg(T: int, warps: int, BD: int) -> int | None:
    """The register cap of a backward launch without ``maxnreg`` (MAXNREG; None: uncapped)."""
    return MAXNREG.get(T) if warps == 1 and BD == 1 else None


def _shift_decays(shift, NT: int) -> bool:
    """Whether a_{j+1} is moved over from a_j (SHIFT) rather than computed again: ``shift`` if given, else on one
    warp (NT <= 32; across warps the move would go through shared memory)."""
    return bool(shift if shift is not None else NT <= 32)


# dB/dC reductions without the chunk's mask where every chunk lies inside the rows (lp % T == 0): Triton wraps a
# masked atomic in a branch (sm_90 state loop 248 -> 242 instructions). H100, blocked_bwd alone, same run, masked
# / unmasked ms: one channel a program, b1 d1536 l65536 5.61 / 5.56 (reverse 5.90 / 5.68), l2^20 86.7 / 84.5
# (99.6 / 96.6); two, b8 d1536 l2048 1.193 / 1.212 (1.186 / 1.175), b4 l16384 4.50 / 4.59 (4.47 / 4.45): so only
# one-channel programs go unmasked
def _whole_chunks(whole, lp: int, T: int, BD: int) -> bool:
    """Whether the dB/dC reductions go unmasked: rows of ``lp`` positions in whole chunks, and ``whole`` if given,
    else at one channel a program (the note above)."""
    return lp % T == 0 and bool(whole if whole is not None else BD == 1)


def default_block_d(rows: int) -> int:
    """Channels a program for a call on ``rows`` = b * d rows (BLOCK_D_ROWS)."""
    return next(bd for min_rows, bd in BLOCK_D_ROWS if rows >= min_rows)


def default_warps(T: int) -> int:
    """Warps per program for chunk length T (the sweep's choice; 4 positions a thread elsewhere, 1 to 8 warps)."""
    return WARPS.get(T, min(max(T // 128, 1), 8))


def positions_per_thread(T: int, warps: int, elt_size: int) -> int:
    """V: the consecutive positions each thread holds in the kernel's (BD, T) tiles, as Triton lays them out for
    16-byte loads of ``elt_size``-byte inputs on 32 * warps threads."""
    return max(1, min(16 // elt_size, T // (32 * warps)))


_common = kernel_module("seqmamba.kernels._triton_common", __name__)
_combine, _keep = _common.affine_combine, _common.continues_sequence


@triton.jit
def _suffix_combine(a1, b1, ea1, eb1, a2, b2, ea2, eb2):
    # (map of a run of threads, map of the run without its first thread), composed for a reverse scan: Triton
    # passes the run nearer the scan's start (the right) first; dropping the left run's first thread leaves its
    # own remainder followed by the whole right run
    return a1 * a2, a2 * b1 + b2, a1 * ea2, ea2 * b1 + eb2


@triton.jit
def _reverse_scan(a, b, NT: tl.constexpr, V: tl.constexpr, GATHER: tl.constexpr):
    """Inclusive reverse affine scan along the positions (axis 1) of a (rows, T) tile: g_k = a_k g_{k+1} + b_k
    (0 past the end), i.e. ``tl.associative_scan((a, b), 1, _combine, reverse=True)[1]``, for a tile whose
    layout holds V consecutive positions in each of NT threads (any layout is exact; that one keeps the V axis
    in registers).

    Triton lowers a reverse scan by flipping its operands and result across lanes (~120 SHFL per (1, 256) tile
    on one warp at 8 positions a thread, even along an in-thread axis). Here each thread's V positions are
    flipped in registers and scanned forward, and only one map per thread crosses lanes: a reverse scan of the
    thread maps that carries, beside each suffix, the suffix without its first thread (``_suffix_combine``),
    i.e. the map of the threads after it. sm_90, one warp, T = 256: 32 SHFL against 138.

    With GATHER (one warp), the threads' maps are instead mirrored across the lanes by a gather (one shuffle a
    value; tl.flip takes five), scanned forward, and the scan is gathered back shifted by one thread: 27 SHFL
    against 39 in the backward's state loop at T = 128."""
    R: tl.constexpr = a.shape[0]
    a3 = tl.flip(tl.reshape(a, (R, NT, V)), 2)
    b3 = tl.flip(tl.reshape(b, (R, NT, V)), 2)
    A_loc, G_loc = tl.associative_scan((a3, b3), 2, _combine)      # in-thread suffixes, flipped
    A_loc = tl.flip(A_loc, 2)
    G_loc = tl.flip(G_loc, 2)
    k0 = tl.arange(0, V)[None, None, :] == 0
    A0 = _common.pick(A_loc, k0, 2)                                # (R, NT): each thread's map over its V
    G0 = _common.pick(G_loc, k0, 2)
    if GATHER and NT <= 32:
        q = tl.broadcast_to(tl.arange(0, NT)[None, :], A0.shape)
        _, G_in = tl.associative_scan((tl.gather(A0, NT - 1 - q, 1), tl.gather(G0, NT - 1 - q, 1)), 1, _combine)
        # G_in[p]: g entering thread NT-1-p; thread q's carry is what enters thread q + 1 (none after the last)
        carry = tl.where(q == NT - 1, 0.0, tl.gather(G_in, tl.maximum(NT - 2 - q, 0), 1))
    else:  # the suffix scan carries the map of the threads after each one
        ones = tl.full(A0.shape, 1.0, tl.float32)
        _, _, _, carry = tl.associative_scan((A0, G0, ones, _common.neg_zeros(G0.shape)), 1, _suffix_combine,
                                             reverse=True)
    return tl.reshape(G_loc + A_loc * carry[:, :, None], (R, NT * V))


@triton.jit
def _shift(x, edge, V: tl.constexpr, DOWN: tl.constexpr):
    """(R, NT, V) tile, each thread's V consecutive positions in its registers, moved by one position within each
    thread: y[v] = x[v + 1] with ``edge`` (R, NT) entering at v = V - 1 (DOWN), else y[v] = x[v - 1] with ``edge``
    at v = 0. Halving the V axis (tl.split) and interleaving the halves back (tl.join) keeps every value in its
    thread's registers: no instruction moves data between threads."""
    if V == 1:
        y = edge[:, :, None]
    else:
        R: tl.constexpr = x.shape[0]
        NT: tl.constexpr = x.shape[1]
        even, odd = tl.split(tl.reshape(x, (R, NT, V // 2, 2)))
        if DOWN:  # the even slots take the odd values, the odd ones the next even values
            y = tl.reshape(tl.join(odd, _shift(even, edge, V // 2, DOWN)), (R, NT, V))
        else:
            y = tl.reshape(tl.join(_shift(odd, edge, V // 2, DOWN), even), (R, NT, V))
    return y


@triton.jit
def _scan_successor(a, NT: tl.constexpr, V: tl.constexpr, REVERSE: tl.constexpr):
    """(R, T) tile -> the value at each position's successor in scan order (the next element, or the previous one
    for a reverse scan's ascending tile; the chunk's last scan position gets its own thread's neighbour, unused):
    in-thread moves (``_shift``) and one shuffle a value across lanes (one warp: NT <= 32)."""
    R: tl.constexpr = a.shape[0]
    a3 = tl.reshape(a, (R, NT, V))
    v = tl.arange(0, V)[None, None, :]
    q = tl.broadcast_to(tl.arange(0, NT)[None, :], (R, NT))
    if REVERSE:  # the previous thread's last value enters at v = 0
        edge = tl.gather(_common.pick(a3, v == V - 1, 2), tl.maximum(q - 1, 0), 1)
    else:  # the next thread's first value enters at v = V - 1
        edge = tl.gather(_common.pick(a3, v == 0, 2), tl.minimum(q + 1, NT - 1), 1)
    return tl.reshape(_shift(a3, edge, V, not REVERSE), (R, NT * V))


@triton.jit
def _state_operands(A_ptr, B_base, C_base, cs_ptr, g_ptr, A_row, cs_row, gc_row, t, valid, sB_n, sC_n, n, nstate,
                    EV_LAST: tl.constexpr):
    """State n's operands for one chunk (all zero when n >= nstate): A[:, n] (BD, 1), B and C rows (1, T), the
    state entering the chunk and the g carry after it (BD, 1) fp32."""
    ok = n < nstate
    An = tl.load(A_ptr + A_row + n, mask=ok, other=0.0).to(tl.float32)[:, None]
    Bn = tl.load(B_base + n * sB_n + t, mask=valid & ok, other=0.0, eviction_policy=EV_LAST).to(tl.float32)
    Cn = tl.load(C_base + n * sC_n + t, mask=valid & ok, other=0.0, eviction_policy=EV_LAST).to(tl.float32)
    h0 = tl.load(cs_ptr + cs_row + n, mask=ok, other=0.0)[:, None]
    gc = tl.load(g_ptr + gc_row + n, mask=ok, other=0.0)[:, None]
    return An, Bn, Cn, h0, gc


@triton.jit
def _dt(delta_ptr, offs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, EV_FIRST: tl.constexpr):
    """(BD, T) delta -> (delta + bias, dt); dt is 0 where masked (an identity step: a = 1, x = 0)."""
    dl = tl.load(delta_ptr + offs, mask=mask, other=0.0, eviction_policy=EV_FIRST).to(tl.float32)
    return _common.delta_to_dt(dl, mask, bias, HAS_BIAS, SOFTPLUS)


@triton.jit
def _blocked_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, cs_ptr, seq_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, g_ptr,
    su_b, su_d, sdl_b, sdl_d, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, sz_b, sz_d, so_b, so_d, ss_b, ss_l,
    dim, nstate, seqlen, live_len, cpg, ngroups, n_chunks,
    PADDED: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr, DA_PARTIALS: tl.constexpr,
    BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr,
    NT: tl.constexpr, V: tl.constexpr, HINTS: tl.constexpr, GATHER: tl.constexpr, SHIFT: tl.constexpr,
    WHOLE: tl.constexpr,
):
    """u, delta, z, dout, B, C have unit l-stride; du, ddelta, dz are contiguous (b, d, seqlen). ``g_ptr`` (b, d, n)
    fp32 holds dht (or 0) on entry: it carries g at the first position of the chunk last done, times its a with
    SHIFT (read by all threads in the next chunk, after a barrier), and is dh0 on exit. With PADDED the rows are
    ``seqlen`` long and hold ``live_len`` positions, then zeros (blocked_fwd's padding): identity steps (dt = 0)
    whose ddelta is not summed; seq_idx (b, live_len) is read unpadded."""
    # eviction hints on one-warp plans (module docstring)
    EV_LAST: tl.constexpr = "evict_last" if HINTS else ""
    EV_FIRST: tl.constexpr = "evict_first" if HINTS else ""
    if PADDED:
        n_live = live_len
    else:
        n_live = seqlen
    pid = tl.program_id(0)
    ndb = dim // BD
    pb = (pid // ndb).to(tl.int64)
    blk = pid % ndb
    d_off = (blk * BD + tl.arange(0, BD)).to(tl.int64)  # BD divides d // g: one group per program
    grp = ((blk * BD) // cpg).to(tl.int64)
    n_off = tl.arange(0, BN)
    n_mask = n_off < nstate
    dn_off = (pb * dim + d_off[:, None]) * nstate + n_off[None, :]   # (b, d, n) slots
    dn_mask = n_mask[None, :] & (d_off[:, None] < dim)
    ar = tl.arange(0, T)[None, :]                                    # (1, T): positions of the chunk
    first = ar == 0
    last = ar == T - 1

    bias = tl.zeros([BD], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d_off).to(tl.float32)
    Dv = tl.zeros([BD], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d_off).to(tl.float32)
    lane = tl.max(tl.reshape(tl.arange(0, T)[None, :], (1, NT, V)), 2) // V          # (1, NT): a thread's index
    v_ar = tl.arange(0, V)[None, None, :]
    if REVERSE:  # the thread and register holding the chunk's first position in scan order
        start_lane = lane == NT - 1
        start_v = v_ar == V - 1
    else:
        start_lane = lane == 0
        start_v = v_ar == 0
    if DA_PARTIALS:  # each thread's running sums, one slot per (channel, state, thread) of the (b, d, n, NT) buffer
        dA_row = ((pb * dim + d_off) * nstate)[:, None] * NT + lane
    else:
        dA_acc = tl.zeros([BD, BN], dtype=tl.float32)
    dD_acc = tl.zeros([BD], dtype=tl.float32)
    db_acc = tl.zeros([BD], dtype=tl.float32)

    u_row = (pb * su_b + d_off * su_d)[:, None]
    dl_row = (pb * sdl_b + d_off * sdl_d)[:, None]
    z_row = (pb * sz_b + d_off * sz_d)[:, None]
    o_row = (pb * so_b + d_off * so_d)[:, None]
    g_row = ((pb * dim + d_off) * seqlen)[:, None]           # du, ddelta, dz: contiguous (b, d, seqlen)
    B_base = B_ptr + pb * sB_b + grp * sB_g
    C_base = C_ptr + pb * sC_b + grp * sC_g
    bc_row = (pb * ngroups + grp) * nstate * seqlen         # dB, dC accumulators: contiguous (b, g, n, l)
    A_row = d_off * nstate
    gc_row = (pb * dim + d_off) * nstate                    # the g carry slab (b, d, n)
    seq_row = pb * ss_b

    for ci in range(0, n_chunks):
        c = n_chunks - 1 - ci
        if REVERSE:
            # the tile holds the chunk in ascending address order (vector loads, stores and atomics): element k is
            # scan position c*T + T-1-k, so h scans the tile right to left and g left to right
            t = seqlen - (c.to(tl.int64) + 1) * T + ar
            valid = t >= 0
            tn = t - 1
            valid_n = tn >= 0
            not_start = t < n_live - 1
        else:
            t = c.to(tl.int64) * T + ar
            valid = t < seqlen
            tn = t + 1
            valid_n = tn < seqlen
            not_start = t > 0
        dl, dt = _dt(delta_ptr, dl_row + t, valid, bias, HAS_BIAS, SOFTPLUS, EV_FIRST)
        if not SHIFT:  # dt one position later in scan order, for a_{j+1}
            _, dtn = _dt(delta_ptr, dl_row + tn, valid_n, bias, HAS_BIAS, SOFTPLUS, EV_FIRST)
        live = valid
        live_n = valid_n
        if PADDED:  # the pad: loaded (aligned loads), but identity steps
            live = valid & (t < n_live)
            dt = tl.where(live, dt, 0.0)
            if not SHIFT:
                live_n = valid_n & (tn < n_live)
                dtn = tl.where(live_n, dtn, 0.0)
        u = tl.load(u_ptr + u_row + t, mask=valid, other=0.0, eviction_policy=EV_FIRST).to(tl.float32)
        dy = tl.load(dout_ptr + o_row + t, mask=valid, other=0.0, eviction_policy=EV_FIRST).to(tl.float32)
        if HAS_Z:
            zz = tl.load(z_ptr + z_row + t, mask=valid, other=0.0, eviction_policy=EV_FIRST).to(tl.float32)
            sz = _common.sigmoid(zz)
            dyp = dy * zz * sz
        else:
            dyp = dy
        if HAS_SEQ:
            if REVERSE:
                tp = t + 1
            else:
                tp = t - 1
            keep = _keep(seq_ptr, seq_row, t, tp, live & not_start, ss_l)
            if not SHIFT:
                keep_n = _keep(seq_ptr, seq_row, tn, t, live_n & live, ss_l)
        dtu = dt * u
        ddt = tl.zeros([BD, T], dtype=tl.float32)
        sgB = tl.zeros([BD, T], dtype=tl.float32)
        ypre = tl.zeros([BD, T], dtype=tl.float32)
        cs_row = ((pb * n_chunks + c) * dim + d_off) * nstate
        bc_t = bc_row + t
        tl.debug_barrier()  # the previous chunk's g carries are written
        An, Bn, Cn, h0, gc = _state_operands(A_ptr, B_base, C_base, cs_ptr, g_ptr, A_row, cs_row, gc_row, t, valid,
                                             sB_n, sC_n, 0, nstate, EV_LAST)
        for n in range(0, nstate):
            # the next state's operands load while this one computes: they are L2 round trips, which stalled every
            # state (H100, b1 d1536 l2^20 fwd+bwd 196 ms without, 146 with); slot n + 1 of the g carry is
            # rewritten only in the next iteration
            An_x, Bn_x, Cn_x, h0_x, gc_x = _state_operands(A_ptr, B_base, C_base, cs_ptr, g_ptr, A_row, cs_row,
                                                           gc_row, t, valid, sB_n, sC_n, n + 1, nstate, EV_LAST)
            A2n = An * 1.4426950408889634
            a = tl.exp2(dt * A2n)
            if HAS_SEQ:
                a = tl.where(keep, a, 0.0)
            if SHIFT:  # a_{j+1} moved over from a; the carry is already w = a g of the next chunk's first position
                an = _scan_successor(a, NT, V, REVERSE)
                w_in = gc
            else:
                an = tl.exp2(dtn * A2n)                                                # a_{j+1}
                if HAS_SEQ:
                    an = tl.where(keep_n, an, 0.0)
                w_in = an * gc
            x = dtu * Bn
            # the carried state folded into the chunk's first step (in scan order), the carried g into its last
            beta = dyp * Cn
            if REVERSE:
                h = _reverse_scan(a, tl.where(last, x + a * h0, x), NT, V, GATHER)
                _, g = tl.associative_scan((an, tl.where(first, beta + w_in, beta)), 1, _combine)
            else:
                _, h = tl.associative_scan((a, tl.where(first, x + a * h0, x)), 1, _combine)
                g = _reverse_scan(an, tl.where(last, beta + w_in, beta), NT, V, GATHER)
            gxa = g * (h - x)                                                          # g_j a_j h_{j-1}
            sgB += g * Bn
            ddt += gxa * An
            # each thread's own positions first, in registers (a plain tl.sum over the tile cost ~14 more SASS
            # instructions a state on one warp)
            dA_part = tl.sum(tl.reshape(gxa * dt, (BD, NT, V)), 2)                    # (BD, NT)
            if DA_PARTIALS:
                dA_slot = dA_ptr + dA_row + n * NT
                tl.store(dA_slot, tl.load(dA_slot) + dA_part)
            else:
                dA_acc += tl.where(n_off[None, :] == n, tl.sum(dA_part, axis=1)[:, None], 0.0)
            if WHOLE:  # every chunk inside the rows: no mask, no branch around the reductions
                tl.atomic_add(dB_ptr + bc_t, tl.sum(g * dtu, axis=0)[None, :], sem="relaxed")
                tl.atomic_add(dC_ptr + bc_t, tl.sum(h * dyp, axis=0)[None, :], sem="relaxed")
            else:
                tl.atomic_add(dB_ptr + bc_t, tl.sum(g * dtu, axis=0)[None, :], mask=valid, sem="relaxed")
                tl.atomic_add(dC_ptr + bc_t, tl.sum(h * dyp, axis=0)[None, :], mask=valid, sem="relaxed")
            ypre += h * Cn
            # g at the chunk's first position, the next chunk's carry: stored by the thread that holds it, from its
            # own register (a masked store of the tile went through a shared-memory layout conversion every state)
            g_start = _common.pick(tl.reshape(g, (BD, NT, V)), start_v, 2)             # (BD, NT), in-thread
            if SHIFT:  # carried as w = a g
                g_start *= _common.pick(tl.reshape(a, (BD, NT, V)), start_v, 2)
            tl.store(g_ptr + (gc_row + n)[:, None] + lane * 0, g_start, mask=start_lane)
            bc_t += seqlen                                                             # next state's row
            An, Bn, Cn, h0, gc = An_x, Bn_x, Cn_x, h0_x, gc_x
        ddt += u * sgB
        du = dt * sgB + Dv[:, None] * dyp
        out_off = g_row + t
        tl.store(du_ptr + out_off, du.to(du_ptr.dtype.element_ty), mask=valid)
        if HAS_Z:
            ypre += Dv[:, None] * u
            dz = dy * ypre * sz * (1.0 + zz * (1.0 - sz))
            tl.store(dz_ptr + out_off, dz.to(dz_ptr.dtype.element_ty), mask=valid)
        if SOFTPLUS:
            ddt = ddt * _common.sigmoid(dl)
        ddt = tl.where(live, ddt, 0.0)
        tl.store(ddelta_ptr + out_off, ddt.to(ddelta_ptr.dtype.element_ty), mask=valid)
        db_acc += tl.sum(ddt, axis=1)
        dD_acc += tl.sum(u * dyp, axis=1)

    if not SHIFT:  # dh0 = a_0 g_0: the decay of scan position 0 (never a sequence start); with SHIFT the carry is it
        if REVERSE:
            t0 = seqlen - 1
        else:
            t0 = 0
        _, dt0 = _dt(delta_ptr, dl_row + t0 + tl.zeros([1, 1], dtype=tl.int64),
                     (d_off[:, None] < dim) & (t0 < n_live), bias, HAS_BIAS, SOFTPLUS, EV_FIRST)
        A2 = tl.load(A_ptr + A_row[:, None] + n_off[None, :], mask=dn_mask, other=0.0).to(tl.float32)
        A2 = A2 * 1.4426950408889634
        tl.debug_barrier()
        g0 = tl.load(g_ptr + dn_off, mask=dn_mask, other=0.0)
        tl.debug_barrier()  # every thread has read g_0 before it is overwritten
        tl.store(g_ptr + dn_off, g0 * tl.exp2(dt0 * A2), mask=dn_mask)
    if not DA_PARTIALS:
        tl.store(dA_ptr + dn_off, dA_acc, mask=dn_mask)
    tl.store(dD_ptr + pb * dim + d_off, dD_acc)
    tl.store(dbias_ptr + pb * dim + d_off, db_acc)


def blocked_bwd(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, chunk_states, dout, dht=None,
                seq_idx=None, *, chunk_len, block_d=None, num_warps=None, maxnreg=None, gather=None, shift=None,
                whole=None):
    """Gradients of the selective scan from the forward's ``chunk_states``.

    u, delta, z, dout: (b, d, l) (any strides; copied into aligned rows when not l-contiguous or l is not a
    multiple of 16); A: (d, n); B, C: (b, n, l) or (b, g, n, l); D, delta_bias: (d,) or None; chunk_states:
    (b, n_chunks, d, n) fp32 with n_chunks = cdiv(padded_len(l), chunk_len) (see the module docstring); dht:
    (b, d, n) or None; seq_idx: (b, l) ints or None. ``chunk_len`` (a power of two) is the forward's chunk length
    T; ``block_d`` channels per program (a power of two dividing d // g; default :func:`default_block_d`),
    ``num_warps`` (default :func:`default_warps`), ``maxnreg`` (registers a thread; 0: uncapped; default
    :func:`default_maxnreg`), ``gather``
    (the cross-lane part of the backward-running scan by gather, see ``_reverse_scan``; default by ``_gather``),
    ``shift`` (a_{j+1} moved over from a_j, not a second exp; default on one warp: ``_shift_decays``), ``whole``
    (dB/dC reductions unmasked where the rows hold whole chunks; default ``_whole_chunks``).

    Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0): du, ddelta, dz in u's, delta's, z's dtypes,
    l-contiguous in rows of ``padded_len(l)`` (views of aligned storage where l is not a multiple of 16); dA, dB,
    dC, dD, ddelta_bias in their inputs' dtypes, contiguous; dh0 (b, d, n) fp32; None for absent inputs.
    """
    b, d, l = u.shape
    n = A.shape[1]
    T = chunk_len
    if T < 1 or T & (T - 1):
        raise ValueError(f"blocked_bwd: chunk_len must be a power of two, got {T}")
    lp = _common.padded_len(l)  # blocked_fwd's row length
    n_chunks = triton.cdiv(lp, T)
    if chunk_states.shape != (b, n_chunks, d, n):
        raise ValueError(f"blocked_bwd: chunk_states must have shape (b, cdiv(padded_len(l), chunk_len), d, n) = "
                         f"{(b, n_chunks, d, n)}, got {tuple(chunk_states.shape)}")
    B4, C4 = _grouped(B), _grouped(C)
    g = B4.shape[1]
    cpg = d // g
    BD = _common.pow2_divisor(cpg, block_d or default_block_d(b * d))
    BN = max(triton.next_power_of_2(n), 2)
    u, delta, z, dout, B4, C4 = (_common.aligned_rows(t, lp) for t in (u, delta, z, dout, B4, C4))
    dev = u.device
    f32 = dict(device=dev, dtype=torch.float32)
    du = _common.new_rows((b, d, l), device=dev, dtype=u.dtype)
    ddelta = _common.new_rows((b, d, l), device=dev, dtype=delta.dtype)
    dz = _common.new_rows((b, d, l), device=dev, dtype=z.dtype) if z is not None else None
    dB = torch.zeros(b, g, n, lp, **f32)
    dC = torch.zeros(b, g, n, lp, **f32)
    warps = num_warps or default_warps(T)
    V = positions_per_thread(T, warps, max(t.element_size() for t in (u, delta, z, dout, B4, C4) if t is not None))
    partials = warps > 1
    if maxnreg is None:
        maxnreg = default_maxnreg(T, warps, BD)
    dA = torch.zeros(b, d, n, T // V if partials else 1, **f32)  # summed over its last dim below
    dD = torch.empty(b, d, **f32)
    dbias = torch.empty(b, d, **f32)
    # g carry slab: dht (or 0) in, dh0 out
    dh0 = dht.to(torch.float32, copy=True).contiguous() if dht is not None else torch.zeros(b, d, n, **f32)
    if l == 0:
        dD.zero_(), dbias.zero_()
    else:
        cs = chunk_states if chunk_states.is_contiguous() else chunk_states.contiguous()
        seq = (seq_idx, seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (dA, 0, 0)
        zs = (z.stride(0), z.stride(1)) if z is not None else (0, 0)
        _blocked_bwd_kernel[(b * (d // BD),)](
            u, delta, A.contiguous(), B4, C4, D if D is not None else dA, z if z is not None else dA,
            delta_bias if delta_bias is not None else dA, dout, cs, seq[0],
            du, ddelta, dz if dz is not None else dA, dB, dC, dA, dD, dbias, dh0,
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B4.stride(0), B4.stride(1),
            B4.stride(2), C4.stride(0), C4.stride(1), C4.stride(2), *zs, dout.stride(0), dout.stride(1),
            seq[1], seq[2], d, n, lp, l, cpg, g, n_chunks, PADDED=lp != l,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
            REVERSE=bool(reverse), HAS_SEQ=seq_idx is not None, DA_PARTIALS=partials, BD=BD, BN=BN, T=T, NT=T // V, V=V,
            HINTS=warps == 1, GATHER=_gather(gather, reverse, V, BD), SHIFT=_shift_decays(shift, T // V),
            WHOLE=_whole_chunks(whole, lp, T, BD),
            num_warps=warps, **({"maxnreg": maxnreg} if maxnreg else {}))
    dB, dC = (t[..., :l].to(x.dtype).contiguous().reshape(x.shape) for t, x in ((dB, B), (dC, C)))
    return (du, ddelta, dA.sum((0, 3)).to(A.dtype), dB, dC,
            dD.sum(0).to(D.dtype) if D is not None else None, dz,
            dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None, dh0)
