"""Single-pass Triton selective scan forward: positions spread over a program's threads (mamba_ssm's design).

Same math as :func:`seqmamba.kernels.selective_scan.ref.selective_scan_ref`:

    dt_t = softplus(delta_t + delta_bias)            (softplus and delta_bias optional)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t       h_{-1} = initial_state or 0
    y_t  = (sum_n C_t * h_t + D * u_t) * silu(z_t)          (D and z optional)

One program owns a block of ``BD`` channels of one batch row and walks the whole length in scan order, in
chunks of ``T`` positions, carrying the (BD, n) state from chunk to chunk (in its own slab of the final-state
buffer, see the kernel): ONE pass over the inputs, one exp per (channel, position, state), no chunk-summary
pass. Inside a chunk the T positions are spread over the program's threads (each thread holds consecutive
positions); for each state index the (dA, dt*B*u) pairs are scanned with ``tl.associative_scan`` along the
positions (inside a thread first, then across lanes and warps), the carried state is applied, C*h is
accumulated into y, and the state at the chunk's last scan position becomes the next carry. Parallelism comes
from the b * d / BD programs.

``reverse=True`` scans right to left by address (chunk j covers addresses [l - (j+1) T, l - j T)) with the
same forward ``tl.associative_scan``: each chunk is loaded as V-position blocks in descending block order, each
block ascending (still 16-byte loads), and every thread reverses its own V positions in registers
(``tl.flip`` over an in-thread axis), so the tile holds descending addresses; outputs go back the same way.
Nothing is flipped in memory, and no data crosses threads (Triton's reverse scan, which cost ~2.4x the
forward's time on an H100, is not used). ``seq_idx`` (b, l) resets the state where the sequence id
changes in scan order (dA = 0 at a new sequence's first position). Masked positions past either end are
identity steps (dt = 0, B = 0). Math is fp32 for every input dtype; all offsets are 64-bit.

Contract with the backward (``blocked_bwd.py``, whose chunk length is S): with ``save_states``,
``chunk_states`` (b, cdiv(l, S), d, n) fp32 holds the state ENTERING scan-order piece j of S positions, i.e.
after scan-order positions < j * S (``chunk_states[:, 0]`` = initial_state or 0), raw: before any seq_idx reset
at the piece's first position. S is the call's ``state_len`` (a power of two dividing T; default T, which is
:func:`chunk_length` ``(tuning)``): the state after a piece's last position is stored from the thread holding
it, so pieces shorter than the forward's chunk cost one masked store per state and thread. For ``reverse``,
scan-order piece j covers addresses [max(l - (j+1) S, 0), l - j S).

H100, bf16, softplus + z (details and the sweep: the comment below): b8 d1536 l2048 0.41 ms, b1 d1536 l2^20
27 ms, b1 d512 l2^20 10.6 ms (chunk.py's earlier l-contiguous path: 0.96 / 90 / 31 ms). About 17 SASS
instructions per (position, state), issue-bound, in both directions; reverse takes the forward's time
(0.414 / 27.2 ms at the first two shapes, same run), Triton's reverse scan took 2.4x.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqmamba.kernels._dispatch import kernel_module
from seqmamba.kernels.selective_scan.ref import _grouped

LOG2E = 1.4426950408889634

# Tuning, from sweeps on one H100 (bf16 inputs, softplus + z, medians of do_bench; benchmarks in
# /work/notes/results3_m1fwd.md), as (channels per program BD, chunk T, warps):
#   b8 d1536 l2048:   2/256/1 0.380 ms, 2/512/2 0.393, 2/1024/4 0.415, 1/1024/2 0.49, 2/512/4 0.56
#   b1 d1536 l2^20:   2/512/2 25.2 ms,  2/1024/4 27.2, 1/512/1 27.6, 1/1024/2 28-33, 1/2048/4 30-35, 4/*/* 70-85
#   b1 d512  l2^20:   1/1024/2 10.5 ms, 1/1024/4 11.0, 2/1024/4 11.2, 1/2048/4 11.7, 2/512/2 18.7, 1/512/1 24
# (unrolling the state loop by 2 and one-warp programs with 2 channels lost everywhere: registers). Each thread
# should hold 16 positions of a row (fewer: the cross-thread scan dominates; more: registers spill) and the
# grid should hold >= ~8 warps per SM. One chunk length for every shape keeps chunk_length() shape-free (the
# backward and the fake implementations rely on it); T = 1024 costs ~5% at b1 d1536 against T = 512 and
# saves 40% at b1 d512. Two channels a program (B and C rows shared, half the L2 reads) once there are
# MIN_CHANNELS_BD2 channel rows, else one channel with 2 warps (twice the programs).
CHUNK = 1024
MIN_CHANNELS_BD2 = 1024
WARPS_BD2 = 4
WARPS_BD1 = 2
UNROLL = 1          # state-loop unroll factor (2 measured slower: register pressure)
PAIRS = True        # bf16 B/C read as 32-bit pairs where aligned (-16 instructions a state, 3-6% faster)
# load the next chunk's delta and u during the current one: 2-6% faster with 16-bit inputs (+50 registers);
# fp32 inputs would spill at 2 channels x 4 warps, so it is on for 16-bit inputs only
PREFETCH_16BIT = True
# ... except for a reverse scan at two channels a program, which it slows (H100, session 4, same run: reverse
# 0.507 / 32.2 ms with it, 0.414 / 27.2 without, the forward 0.414 / 27.2 either way at b8 l2048 / b1 l2^20;
# at one channel, b1 d512 l2^20, reverse 10.85 ms with it, 11.48 without). tuning["prefetch"] overrides.
# Reverse scans: mirrored V-blocks + in-thread tl.flip + the forward scan (_scan_order). Triton's reverse scan
# costs ~2.4x the forward's time on an H100 (b8 d1536 l2048 bf16: 0.98 vs 0.41 ms: butterfly shuffles of its
# inputs and output); an earlier inline-PTX in-thread reversal assumed a register layout Triton does not always
# pick (wrong results at unaligned lengths) and was removed. tl.flip is exact for any layout: where Triton cannot
# prove 16-byte alignment (l not a multiple of 16, odd strides) the V axis is not in-thread and the flip
# crosses threads (slower, still exact).


_common = kernel_module("seqmamba.kernels._triton_common", __name__)
_combine = _common.affine_combine


@triton.jit
def _load_addresses(k, seqlen, T: tl.constexpr, V: tl.constexpr, REVERSE: tl.constexpr):
    """(T,) addresses of scan-order chunk k in load order: ascending, or for a reverse scan the chunk's V-position
    blocks from the highest down, each block ascending (negative past the start of a reverse scan's last chunk;
    < 2^31: the rows they are added to are int64)."""
    ar = tl.arange(0, T)
    if REVERSE:
        return seqlen - k * T - (ar // V + 1) * V + ar % V
    else:
        return k * T + ar


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
def _chunk_inputs(delta_ptr, u_ptr, dl_row, u_row, seqlen, k, n_chunks, T: tl.constexpr, V: tl.constexpr,
                  REVERSE: tl.constexpr):
    """Raw (BD, T) delta and u of scan-order chunk k in load order (zero past either end, or when
    k >= n_chunks)."""
    t = _load_addresses(k, seqlen, T, V, REVERSE)
    mask = ((t >= 0) & (t < seqlen) & (k < n_chunks))[None, :]
    dl = tl.load(delta_ptr + dl_row[:, None] + t[None, :], mask=mask, other=0.0)
    u = tl.load(u_ptr + u_row[:, None] + t[None, :], mask=mask, other=0.0)
    return dl, u


@triton.jit
def _bf16_pairs(ptr, off, k, seqlen, ok, T: tl.constexpr, V: tl.constexpr, REVERSE: tl.constexpr):
    """The T bf16 values of chunk k of the row at element offset off, in load order (``_load_addresses``), as
    fp32, read as T/2 32-bit words (off and seqlen even, V >= 2: a word is wholly in or out of range). One
    integer op per value instead of the 1.5 that a bf16 -> fp32 conversion of packed registers costs."""
    w_off = _load_addresses(k, seqlen // 2, T // 2, V // 2, REVERSE)
    words = tl.load(ptr.to(tl.pointer_type(tl.int32)) + off // 2 + w_off,
                    mask=ok & (w_off >= 0) & (w_off < seqlen // 2), other=0)
    lo = (words << 16).to(tl.float32, bitcast=True)
    hi = (words & -65536).to(tl.float32, bitcast=True)
    return tl.reshape(tl.join(lo, hi), (T,))


@triton.jit
def _state_operands(A_ptr, hT_ptr, B_ptr, C_ptr, d_off, h_row, B_row, C_row, sB_n, sC_n, t, k, seqlen, valid,
                    n, nstate, T: tl.constexpr, V: tl.constexpr, REVERSE: tl.constexpr, PAIRS: tl.constexpr):
    """State n's operands for chunk k: A[:, n] * log2(e) (BD,), the carried state (BD,), B and C rows (1, T) in
    scan order (all zero when n >= nstate). t, valid: the chunk's load-order addresses and their mask."""
    ok = n < nstate
    a2 = tl.load(A_ptr + d_off * nstate + n, mask=ok, other=0.0).to(tl.float32) * 1.4426950408889634
    h_in = tl.load(hT_ptr + h_row + n, mask=ok, other=0.0)
    if PAIRS:
        Bn = _bf16_pairs(B_ptr, B_row + n * sB_n, k, seqlen, ok, T, V, REVERSE)
        Cn = _bf16_pairs(C_ptr, C_row + n * sC_n, k, seqlen, ok, T, V, REVERSE)
    else:
        Bn = tl.load(B_ptr + B_row + n * sB_n + t, mask=valid & ok, other=0.0).to(tl.float32)
        Cn = tl.load(C_ptr + C_row + n * sC_n + t, mask=valid & ok, other=0.0).to(tl.float32)
    return a2, h_in, _scan_order(Bn[None, :], V, REVERSE), _scan_order(Cn[None, :], V, REVERSE)


@triton.jit
def _blocked_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, h0_ptr, hT_ptr, cs_ptr, seq_ptr,
    su_b, su_d, sdl_b, sdl_d, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, sz_b, sz_d, sy_b, sy_d, sy_l, ss_b,
    dim, nstate, seqlen, cpg, n_chunks, n_saved,
    HAS_H0: tl.constexpr, SAVE_STATES: tl.constexpr, S: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr,
    ACCUM: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr, NT: tl.constexpr,
    V: tl.constexpr, UNROLL: tl.constexpr, PAIRS: tl.constexpr, PREFETCH: tl.constexpr,
):
    """One program: batch row pid // (d / BD), channels [BD * (pid % (d / BD)), + BD). u, delta, z, B, C have
    l-stride 1 (the launcher makes sure). States (b, [n_chunks,] d, n) fp32 contiguous.

    The carried state lives in the program's own slab of the final-state buffer hT (read and written by this
    program only; a barrier at each chunk start orders the writes of one chunk before the reads of the next).
    A chunk's positions are viewed as (R, NT, V) = (repeats, threads, vector): the layout Triton gives a
    (BD, T) tile of 16-byte loads on NT threads, so the first and last positions of a thread's share are
    compile-time register indices: the carry is folded into the scan's first element and the state after the
    scan's last element is picked out of one thread without any cross-thread reduction. Tiles are loaded and
    stored in load order and computed on in scan order (``_scan_order``; the same for a forward scan)."""
    R: tl.constexpr = T // (NT * V)
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
    ar = tl.arange(0, T)
    r4 = tl.arange(0, R)[None, :, None, None]
    q4 = tl.arange(0, NT)[None, None, :, None]
    i4 = tl.arange(0, V)[None, None, None, :]
    q2 = tl.arange(0, NT)[None, :]
    # the scan's first and last positions (tiles in scan order)
    first = (r4 == 0) & (q4 == 0) & (i4 == 0)
    last_q = q2 == NT - 1
    # with SAVE_STATES, the state after a thread's last position is saved where that position ends one of the
    # chunk's S-position pieces (all but the chunk's last piece: that state is the next chunk's, saved at its
    # start); S is a multiple of V
    r3 = tl.arange(0, R)[None, :, None]
    q3 = tl.arange(0, NT)[None, None, :]
    piece_end = r3 * (NT * V) + (q3 + 1) * V                                # (1, R, NT) scan positions
    saves = (piece_end % S == 0) & (piece_end < T)

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
    B_row = pb * sB_b + grp * sB_g
    C_row = pb * sC_b + grp * sC_g

    # chunk 0's delta and u; with PREFETCH each chunk then loads the next chunk's while it computes
    dl_x, u_x = _chunk_inputs(delta_ptr, u_ptr, dl_row, u_row, seqlen, 0, n_chunks, T, V, REVERSE)
    for k in range(0, n_chunks):
        tl.debug_barrier()  # the previous chunk's carry writes (or the initial state) before this chunk's reads
        t = _load_addresses(k, seqlen, T, V, REVERSE)      # load order
        valid = (t >= 0) & (t < seqlen)
        mask = valid[None, :]
        if REVERSE:                                         # scan order
            ts = seqlen - k * T - 1 - ar
        else:
            ts = t
        mask_s = ((ts >= 0) & (ts < seqlen))[None, :]
        if PREFETCH:
            dl = dl_x.to(tl.float32)
            u = u_x.to(tl.float32)
            dl_x, u_x = _chunk_inputs(delta_ptr, u_ptr, dl_row, u_row, seqlen, k + 1, n_chunks, T, V, REVERSE)
        else:
            dl_k, u_k = _chunk_inputs(delta_ptr, u_ptr, dl_row, u_row, seqlen, k, n_chunks, T, V, REVERSE)
            dl = dl_k.to(tl.float32)
            u = u_k.to(tl.float32)
        dl, u = _scan_order(dl, V, REVERSE), _scan_order(u, V, REVERSE)
        dl, dt = _common.delta_to_dt(dl, mask_s, bias, HAS_BIAS, SOFTPLUS)  # (BD, T); dt 0: an identity step
        dtu = dt * u
        if HAS_SEQ:  # False where the scan predecessor belongs to another sequence (state reset)
            if REVERSE:
                tp = ts + 1
            else:
                tp = ts - 1
            ok = (ts >= 0) & (ts < seqlen) & (tp >= 0) & (tp < seqlen)
            s_t = tl.load(seq_ptr + pb * ss_b + ts, mask=ok, other=0)
            s_p = tl.load(seq_ptr + pb * ss_b + tp, mask=ok, other=0)
            keep = (s_t == s_p)[None, :]
        acc = tl.zeros([BD, T], dtype=tl.float32)
        # state 0's operands now; each iteration then loads the next state's while it computes (the loads are
        # L2 round trips that would otherwise stall every state; the carry slots read here were written in the
        # previous chunk, before the barrier above)
        a2, h_in, Bn, Cn = _state_operands(A_ptr, hT_ptr, B_ptr, C_ptr, d_off, h_row, B_row, C_row, sB_n, sC_n, t,
                                           k, seqlen, valid, 0, nstate, T, V, REVERSE, PAIRS)
        for n in tl.range(0, nstate, loop_unroll_factor=UNROLL):
            if SAVE_STATES:  # the state entering the chunk: the carry in, already in registers (one thread stores)
                tl.store(cs_ptr + (((pb * n_saved + k * (T // S)) * dim + d_off) * nstate + n)[:, None] + q2 * 0,
                         h_in[:, None] + 0.0 * q2, mask=q2 == 0)
            a2_x, h_x, B_x, C_x = _state_operands(A_ptr, hT_ptr, B_ptr, C_ptr, d_off, h_row, B_row, C_row, sB_n,
                                                  sC_n, t, k, seqlen, valid, n + 1, nstate, T, V, REVERSE, PAIRS)
            dA = tl.exp2(dt * a2[:, None])
            if HAS_SEQ:
                dA = tl.where(keep, dA, 0.0)
            bx = dtu * Bn
            # carry in: h = dA * h_in + bx at the scan's first position
            bx4 = tl.reshape(bx, (BD, R, NT, V))
            bx4 = tl.where(first, bx4 + tl.reshape(dA, (BD, R, NT, V)) * h_in[:, None, None, None], bx4)
            _, h = tl.associative_scan((dA, tl.reshape(bx4, (BD, T))), 1, _combine)
            # carry out: the state after the scan's last position (one thread holds it)
            h_end = tl.max(tl.where(i4 == V - 1, tl.reshape(h, (BD, R, NT, V)), float("-inf")), axis=3)
            hl = tl.max(tl.where(r3 == R - 1, h_end, float("-inf")), axis=1)   # (BD, NT)
            tl.store(hT_ptr + (h_row + n)[:, None] + q2 * 0, hl, mask=last_q)
            if SAVE_STATES and S < T:
                j = k * (T // S) + piece_end // S                                 # the piece it enters
                tl.store(cs_ptr + ((pb * n_saved + j) * dim + d_off[:, None, None]) * nstate + n, h_end,
                         mask=saves & (j < n_saved))
            acc += h * Cn
            a2, h_in, Bn, Cn = a2_x, h_x, B_x, C_x
        if HAS_D:
            acc += Dv[:, None] * u
        if HAS_Z:
            zz = tl.load(z_ptr + z_row[:, None] + t[None, :], mask=mask, other=0.0).to(tl.float32)
            zz = _scan_order(zz, V, REVERSE)
            acc = acc * zz * tl.sigmoid(zz)
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


def chunk_length(tuning: dict | None = None) -> int:
    """T of a call made with ``tuning`` (the chunk_states contract): ``tuning["chunk"]`` or CHUNK."""
    return int((tuning or {}).get("chunk") or CHUNK)


def _plan(b: int, d: int, cpg: int, elt_size: int, reverse: bool, tuning: dict) -> tuple[int, int, bool]:
    """(channels per program, warps, prefetch) for this call: the tuning's values where given (None: default),
    else the module's measured defaults (see the table at the top)."""
    bd = tuning.get("bd") or (2 if b * d >= MIN_CHANNELS_BD2 else 1)
    bd = _common.pow2_divisor(cpg, int(bd))
    warps = int(tuning.get("num_warps") or (WARPS_BD2 if bd >= 2 else WARPS_BD1))
    prefetch = tuning.get("prefetch")
    if prefetch is None:
        prefetch = PREFETCH_16BIT and elt_size <= 2 and (not reverse or bd == 1)
    return bd, warps, bool(prefetch)


def blocked_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False, initial_state=None,
                reverse=False, seq_idx=None, save_states=False, out=None, **tuning):
    """Selective scan forward in one pass. u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l);
    D, delta_bias: (d,); initial_state: (b, d, n); seq_idx: (b, l) integers (see
    :func:`seqmamba.kernels.selective_scan.selective_scan`). Inputs fp32/bf16/fp16 (A, D, delta_bias any float),
    on a CUDA device or under TRITON_INTERPRET=1; arguments are assumed validated by the caller.

    Returns ``(y, final_state, chunk_states)``: y (b, d, l) in u's dtype (l contiguous), or ``out`` itself
    with y added into it when ``out`` (a (b, d, l) tensor) is given; final_state (b, d, n) fp32; chunk_states
    (b, cdiv(l, S), d, n) fp32 when ``save_states`` (module docstring: the state entering each piece of S
    positions), else None. ``tuning`` (each optional, None = default): ``chunk`` (T, a power of two),
    ``state_len`` (S, a power of two <= T; default T), ``bd`` (channels per
    program, capped to a power of two dividing d // g), ``num_warps``, ``unroll`` (state loop), ``pairs``,
    ``prefetch`` (bools).
    """
    b, d, l = u.shape
    n = A.shape[1]
    T = chunk_length(tuning)
    if T < 1 or T & (T - 1):
        raise ValueError(f"blocked_fwd: chunk must be a power of two, got {T}")
    u, delta, z, B, C = (_common.unit_l(t) for t in (u, delta, z, B, C))
    B4, C4 = _grouped(B), _grouped(C)
    cpg = d // B4.shape[1]
    bd, warps, prefetch = _plan(b, d, cpg, max(u.element_size(), delta.element_size()), reverse, tuning)
    BN = max(triton.next_power_of_2(n), 2)
    n_chunks = triton.cdiv(l, T)
    f32 = dict(device=u.device, dtype=torch.float32)
    y = torch.empty((b, d, l), device=u.device, dtype=u.dtype) if out is None else out
    final = torch.empty(b, d, n, **f32)
    S = int(tuning.get("state_len") or T)
    if S < 1 or S & (S - 1) or S > T:
        raise ValueError(f"blocked_fwd: state_len must be a power of two <= chunk ({T}), got {S}")
    n_saved = triton.cdiv(l, S)
    states = torch.empty(b, n_saved, d, n, **f32) if save_states else final
    h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else None
    seq = seq_idx.contiguous() if seq_idx is not None else None
    dummy = final
    nt, vec = tile_layout(T, warps, max(t.element_size() for t in (u, delta, z, B, C) if t is not None), S)
    # bf16 B and C read as 32-bit pairs where every pair is aligned and wholly in or out of range (a reverse
    # scan's mirrored blocks must hold whole pairs: V >= 2)
    pairs = bool(tuning.get("pairs", PAIRS)) and B.dtype == C.dtype == torch.bfloat16 and T >= 2 and (
        vec >= 2 or not reverse) and all(
        s % 2 == 0 for s in (*B4.stride()[:3], *C4.stride()[:3], l, B4.storage_offset(), C4.storage_offset()))
    if b * d == 0:
        return y, final.zero_() if h0 is None else final.copy_(h0), (states if save_states else None)
    _blocked_fwd_kernel[(b * (d // bd),)](
        u, delta, A.contiguous(), B4, C4, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, y, h0 if h0 is not None else dummy, final, states,
        seq if seq is not None else dummy,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B4.stride(0), B4.stride(1), B4.stride(2),
        C4.stride(0), C4.stride(1), C4.stride(2), *((z.stride(0), z.stride(1)) if z is not None else (0, 0)),
        y.stride(0), y.stride(1), y.stride(2), seq.stride(0) if seq is not None else 0,
        d, n, l, cpg, n_chunks, n_saved,
        HAS_H0=h0 is not None, SAVE_STATES=bool(save_states), S=S, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus), REVERSE=bool(reverse),
        HAS_SEQ=seq is not None, ACCUM=out is not None, BD=bd, BN=BN, T=T, NT=nt, V=vec,
        UNROLL=int(tuning.get("unroll") or UNROLL), PAIRS=pairs,
        PREFETCH=prefetch, num_warps=warps)
    return y, final, (states if save_states else None)
