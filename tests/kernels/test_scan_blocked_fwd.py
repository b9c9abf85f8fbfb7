"""Single-pass blocked selective scan forward (``blocked_fwd.py``) against the float64 reference.

CPU: the kernel runs under the Triton interpreter on tiny shapes with a small chunk T, so every run has several
chunks and a partial one: y, the final state and the chunk states (compared with the reference's final state on
scan-order prefixes) for every option. GPU (``-m gpu``): realistic shapes, 1M tokens in bf16, 64-bit offsets.
"""
from __future__ import annotations

import pytest
import torch

from seqmamba.kernels.selective_scan import selective_scan_ref
from tests.kernels.interpret import load_interpreted
from tests.kernels.test_selective_scan import make_inputs
from tests.utils import assert_all_close

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
L_ARGS = ("u", "delta", "z", "B", "C")


@pytest.fixture(scope="module")
def bf():
    return load_interpreted("seqmamba.kernels.selective_scan.blocked_fwd")


def inputs(dtype=torch.float32, **kw):
    return {k: (None if v is None else v.detach().to(dtype)) for k, v in make_inputs(dtype=torch.float64, **kw).items()}


def seq_ids(b, l, cuts, device="cpu"):
    """(b, l) int32 sequence ids, a new sequence starting at each position in ``cuts`` (row r shifted by r)."""
    s = torch.zeros(b, l, dtype=torch.int32, device=device)
    for r in range(b):
        for c in cuts:
            s[r, min(c + r, l - 1):] += 1
    return s


def prefix(x, seq_idx, m, l, reverse):
    """The inputs restricted to the first m positions in scan order (the last m addresses when reverse)."""
    sl = slice(l - m, l) if reverse else slice(0, m)
    x = {k: (v[..., sl] if k in L_ARGS and v is not None else v) for k, v in x.items()}
    return x, (None if seq_idx is None else seq_idx[:, sl])


def piece_states(x, T, softplus, reverse, seq_idx, L=None):
    """(b, cdiv(L, T), d, n) float64: the state entering each scan-order piece of T positions, from the
    reference on scan-order prefixes (piece 0 gets the initial state or 0). ``L``: the kernels' padded row length
    (``_common.padded_len``; default l): its L - l pad positions are identity steps at the end of a forward scan
    and at the start of a reverse one."""
    x64 = {k: (None if v is None else v.detach().double()) for k, v in x.items()}
    b, d, l = x64["u"].shape
    L = l if L is None else L
    lead = L - l if reverse else 0  # pad positions before the data in scan order
    states = []
    for j in range(-(-L // T)):
        m = min(max(j * T - lead, 0), l)  # data positions before piece j in scan order
        if m == 0:
            h0 = x64["initial_state"]
            states.append(h0 if h0 is not None else x64["u"].new_zeros(b, d, x64["A"].shape[1]))
            continue
        xp, sp = prefix(x64, seq_idx, m, l, reverse)
        with torch.no_grad():
            states.append(selective_scan_ref(**xp, delta_softplus=softplus, reverse=reverse, seq_idx=sp,
                                             return_final_state=True)[1])
    return torch.stack(states, 1) if states else x64["u"].new_zeros(b, 0, d, x64["A"].shape[1])


def reference(x, softplus, reverse, seq_idx, T, L=None):
    """float64 reference: y, final state and :func:`piece_states`."""
    x64 = {k: (None if v is None else v.double()) for k, v in x.items()}
    y, h = selective_scan_ref(**x64, delta_softplus=softplus, reverse=reverse, seq_idx=seq_idx,
                              return_final_state=True)
    return y, h, piece_states(x, T, softplus, reverse, seq_idx, L)


def check(bf, x, softplus=True, reverse=False, seq_idx=None, rtol=2e-5, **tuning):
    T = bf.state_spacing(tuning)   # the spacing of the saved states
    y, h, cs = bf.blocked_fwd(**{k: x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")},
                              softplus=softplus, initial_state=x["initial_state"], reverse=reverse,
                              seq_idx=seq_idx, save_states=True, **tuning)
    y_ref, h_ref, cs_ref = reference(x, softplus, reverse, seq_idx, T, bf._common.padded_len(x["u"].shape[-1]))
    assert y.dtype == x["u"].dtype and h.dtype == cs.dtype == torch.float32
    assert y.stride(-1) == 1 and cs.shape == cs_ref.shape
    # rows of aligned storage: l rounded up to a multiple of 16
    assert y.stride(1) == -(-x["u"].shape[-1] // 16) * 16
    assert_all_close({"y": (y, y_ref), "final_state": (h, h_ref), "chunk_states": (cs, cs_ref)}, rtol)


# (name, make_inputs overrides, softplus, reverse, seq_idx cuts or None, tuning)
CASES = [
    ("all-options", dict(l=37, groups=2), True, False, None, dict(chunk=8, bd=2)),
    ("all-options-reverse-prefetch", dict(l=37, groups=2), True, True, None, dict(chunk=8, bd=2, prefetch=True)),
    ("3d-BC-no-options", dict(l=21, groups=None, z=False, D=False, delta_bias=False, h0=False), False, False,
     None, dict(chunk=8)),
    ("3d-BC-no-options-reverse", dict(l=21, groups=None, z=False, D=False, delta_bias=False, h0=False), False,
     True, None, dict(chunk=4, num_warps=2)),
    ("groups4-n5-bd-capped-unroll2", dict(d=8, l=19, groups=4, n=5), True, False, None,
     dict(chunk=4, bd=8, unroll=2)),
    ("seq_idx", dict(l=45), True, False, [3, 16, 17, 30], dict(chunk=8, bd=4, num_warps=1, unroll=2)),
    ("seq_idx-reverse-prefetch", dict(l=45, groups=2), True, True, [5, 13, 29, 40], dict(chunk=8, prefetch=True)),
    ("seq_idx-reverse-full-warp", dict(l=304, groups=1, d=2), True, True, [5, 64, 65, 200],
     dict(chunk=128, num_warps=1)),
    ("exact-chunks", dict(l=32, groups=1), True, True, None, dict(chunk=16)),
    ("length1", dict(l=1, groups=2), True, False, None, dict(chunk=4)),
    # states saved every state_len positions, several per chunk
    ("pieces", dict(l=37, groups=2), True, False, None, dict(chunk=16, state_len=4, bd=2)),
    ("pieces-seq_idx-reverse", dict(l=45, groups=2), True, True, [5, 13, 29, 40], dict(chunk=16, state_len=8)),
    ("pieces-of-one", dict(l=11), True, True, None, dict(chunk=4, state_len=1, num_warps=1)),
    # lengths that are multiples of 16 run unpadded (the others on rows padded to one: see check)
    ("unpadded-pieces", dict(l=48, groups=2), True, False, None, dict(chunk=16, state_len=4, bd=2)),
    ("unpadded-pieces-seq_idx-reverse", dict(l=48, groups=2), True, True, [5, 13, 29, 40],
     dict(chunk=16, state_len=8)),
    # B/C loaded without masks (whole chunks only; by default only without saved states: forced here)
    ("mask-free-reverse", dict(l=32, groups=1), True, True, None, dict(chunk=16, bc_full=True)),
    ("mask-free-pieces-seq_idx", dict(l=48, groups=2), True, False, [5, 13, 29, 40],
     dict(chunk=16, state_len=4, bd=2, bc_full=True)),
]


@pytest.mark.parametrize("name,over,softplus,reverse,cuts,tuning", CASES, ids=[c[0] for c in CASES])
def test_interpreted_matches_reference(bf, name, over, softplus, reverse, cuts, tuning):
    """y, final state and chunk states of fp32 inputs against the float64 reference."""
    kw = dict(b=2, d=4, n=4, seed=len(name))
    kw.update(over)
    x = inputs(**kw)
    seq_idx = None if cuts is None else seq_ids(kw["b"], kw["l"], cuts)
    check(bf, x, softplus, reverse, seq_idx, **tuning)


@pytest.mark.parametrize("dtype,l,reverse", [(torch.bfloat16, 19, False), (torch.bfloat16, 22, True),
                                             (torch.bfloat16, 22, False), (torch.float16, 19, False)])
def test_interpreted_low_precision(bf, dtype, l, reverse):
    """bf16/fp16 u, delta, B, C, z with fp32 A, D, bias, initial state: y in the input dtype, close to the
    float64 reference on the same rounded inputs (bf16 B/C at even lengths: read as 32-bit pairs)."""
    x = inputs(b=1, d=4, n=4, l=l, groups=2, seed=3)
    x.update({k: x[k].to(dtype) for k in L_ARGS})
    check(bf, x, True, reverse, None, rtol=1e-2 if dtype == torch.bfloat16 else 2e-3, chunk=8)


@pytest.mark.parametrize("dtype,l,chunk,reverse", [(torch.bfloat16, 144, 64, True), (torch.bfloat16, 304, 256, True),
                                                   (torch.float32, 208, 128, True), (torch.bfloat16, 304, 256, False),
                                                   (torch.float32, 608, 256, True), (torch.bfloat16, 1100, 512, False),
                                                   (torch.float32, 1100, 512, True)])
def test_interpreted_full_warp_tiles(bf, dtype, l, chunk, reverse):
    """Chunks of 2, 4 and 8 positions a thread (one warp) in one V-block, and 16 positions a thread in 2 (bf16,
    the default plan's tile) and 4 (fp32) V-blocks: the passes over a thread's blocks at every vector width,
    mostly reverse, bf16 B/C read as pairs, a partial last chunk."""
    x = inputs(b=1, d=2, n=3, l=l, groups=1, seed=l)
    x.update({k: x[k].to(dtype) for k in L_ARGS})
    check(bf, x, True, reverse, None, rtol=1e-2 if dtype == torch.bfloat16 else 2e-5, chunk=chunk, num_warps=1)


@pytest.mark.parametrize("dtype,reverse,chunk,state_len", [
    (torch.bfloat16, False, 256, 64), (torch.bfloat16, True, 256, 64), (torch.float32, True, 256, 64),
    (torch.bfloat16, False, 512, 8), (torch.bfloat16, True, 512, 8)])
def test_interpreted_full_warp_pieces(bf, dtype, reverse, chunk, state_len):
    """Saved states inside the chunks on one warp, length not a multiple of either: every 64 positions of
    256-position chunks (8 bf16 / 4 fp32 positions a thread: pieces end at thread boundaries, stored from the
    cross-thread scan's results), and every 8 of 512-position chunks (16 positions a thread in two V-blocks:
    pieces end inside threads, stored from the blocks' states)."""
    x = inputs(b=1, d=2, n=3, l=600, groups=1, seed=5)
    x.update({k: x[k].to(dtype) for k in L_ARGS})
    check(bf, x, True, reverse, None, rtol=1e-2 if dtype == torch.bfloat16 else 2e-5, chunk=chunk,
          state_len=state_len, num_warps=1)


@pytest.mark.parametrize("dtype,l,chunk,reverse", [(torch.float32, 64, 16, False), (torch.float32, 64, 16, True),
                                                   (torch.bfloat16, 1024, 512, True)])
def test_interpreted_mask_free_without_states(bf, dtype, l, chunk, reverse):
    """A forward without saved states over whole chunks loads B/C without masks by default (bf16: as pairs, the
    default plan's tile): y and the final state against the float64 reference."""
    assert bf._mask_free(l, chunk, False, {}) and not bf._mask_free(l + chunk // 2, chunk, False, {})
    x = inputs(b=1, d=2, n=3, l=l, groups=1, seed=l + reverse)
    x.update({k: x[k].to(dtype) for k in L_ARGS})
    y, h, cs = bf.blocked_fwd(**{k: x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")},
                              softplus=True, initial_state=x["initial_state"], reverse=reverse, chunk=chunk,
                              num_warps=1)
    y_ref, h_ref = selective_scan_ref(**{k: v.double() for k, v in x.items()}, delta_softplus=True,
                                      reverse=reverse, return_final_state=True)
    assert cs is None
    assert_all_close({"y": (y, y_ref), "final_state": (h, h_ref)}, 1e-2 if dtype == torch.bfloat16 else 2e-5)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("pairs", [False, True])
def test_interpreted_mask_free_loads_stay_in_rows(reverse, pairs):
    """The chunk after the last one (the peeled prefetch at the end of the walk): with masks its loads are all
    masked off; without them (whole chunks) it reads the last chunk again, inside the rows."""
    mod = load_interpreted("tests.kernels._scan_kernels")
    T, NT, V, n_chunks = 32, 4, 4, 3
    seqlen = n_chunks * T
    words = seqlen // 2 if pairs else seqlen
    w, m = mod.bc_offsets(n_chunks, n_chunks, seqlen, T, NT, V, reverse, pairs, full=False)
    assert not m.any()
    w, m = mod.bc_offsets(n_chunks, n_chunks, seqlen, T, NT, V, reverse, pairs, full=True)
    last, _ = mod.bc_offsets(n_chunks - 1, n_chunks, seqlen, T, NT, V, reverse, pairs, full=True)
    assert 0 <= int(w.min()) and int(w.max()) < words
    assert torch.equal(w, last)


def test_interpreted_channel_last_inputs(bf):
    """(b, l, d) / (b, l, n) storage seen as (b, d, l) / (b, n, l) views gives the same result (the wrapper
    makes them l-contiguous)."""
    x = inputs(b=2, d=4, n=4, l=13, groups=None, seed=7)
    for k in ("u", "delta", "z", "B", "C"):
        x[k] = x[k].transpose(1, 2).contiguous().transpose(1, 2)
        assert x[k].stride(1) == 1
    check(bf, x, True, True, None, chunk=4, bd=2)


@pytest.mark.parametrize("reverse", [False, True])
def test_interpreted_accumulates_into_out(bf, reverse):
    """out=: y is added into the given tensor, which is returned."""
    x = inputs(b=2, d=4, n=4, l=11, groups=2, seed=9)
    base = torch.randn(2, 4, 11)
    out = base.clone()
    args = {k: x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")}
    y, h, cs = bf.blocked_fwd(**args, softplus=True, initial_state=x["initial_state"], reverse=reverse, out=out,
                              chunk=4)
    y_ref, h_ref = selective_scan_ref(**{k: v.double() for k, v in x.items()}, delta_softplus=True,
                                      reverse=reverse, return_final_state=True)
    assert y is out and cs is None
    assert_all_close({"y": (y, base.double() + y_ref), "final_state": (h, h_ref)}, 2e-5)


def test_interpreted_bad_chunk(bf):
    x = inputs(b=1, d=4, n=2, l=5)
    with pytest.raises(ValueError, match="power of two"):
        bf.blocked_fwd(x["u"], x["delta"], x["A"], x["B"], x["C"], chunk=12)
    with pytest.raises(ValueError, match="state_len must be a power of two <= chunk"):
        bf.blocked_fwd(x["u"], x["delta"], x["A"], x["B"], x["C"], chunk=8, state_len=16, save_states=True)


# ---------------------------------------------------------------------------------------------- GPU

def _compiled():
    from seqmamba.kernels.selective_scan import blocked_fwd
    return blocked_fwd


def _cuda(x, dtype=None):
    return {k: (None if v is None else v.cuda().to(dtype if (dtype and k in L_ARGS) else v.dtype))
            for k, v in x.items()}


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape,groups,cuts,tuning", [
    ((2, 64, 16, 3000), 1, None, {}), ((1, 96, 8, 70000), 3, None, {}),
    ((2, 64, 16, 5000), 2, [7, 1024, 1025, 4000], {}),
    ((2, 64, 16, 5000), 2, [7, 1024, 1025, 4000], dict(bd=2, chunk=256, num_warps=1, unroll=2)),
    ((1, 32, 16, 9000), 1, None, dict(bd=1, chunk=2048, num_warps=4, unroll=1)),
    ((2, 32, 16, 9000), 2, None, dict(bd=2, num_warps=4, prefetch=True))])
def test_gpu_fp32_matches_reference(shape, groups, cuts, tuning, reverse):
    """fp32 at realistic sizes (several chunks, a partial one, seq_idx; the default tuning and others) vs the
    float64 reference."""
    b, d, n, l = shape
    x = _cuda(inputs(b=b, d=d, n=n, l=l, groups=groups, seed=sum(shape)))
    seq_idx = None if cuts is None else seq_ids(b, l, cuts, "cuda")
    mod = _compiled()
    T = mod.state_spacing(tuning)
    y, h, cs = mod.blocked_fwd(**{k: x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")},
                               softplus=True, initial_state=x["initial_state"], reverse=reverse, seq_idx=seq_idx,
                               save_states=True, **tuning)
    y_ref, h_ref = selective_scan_ref(**{k: v.double() for k, v in x.items()}, delta_softplus=True,
                                      reverse=reverse, seq_idx=seq_idx, return_final_state=True)
    j = cs.shape[1] // 2
    lead = mod._common.padded_len(l) - l if reverse else 0  # a reverse scan starts with the pad (blocked_fwd)
    xp, sp = prefix({k: v.double() for k, v in x.items()}, seq_idx, j * T - lead, l, reverse)
    _, h_mid = selective_scan_ref(**xp, delta_softplus=True, reverse=reverse, seq_idx=sp, return_final_state=True)
    assert_all_close({"y": (y, y_ref), "final_state": (h, h_ref), "chunk_state_mid": (cs[:, j], h_mid)}, 1e-4)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("l,save_states", [(4000, True), (4001, True), (4096, False)])
@pytest.mark.parametrize("reverse", [False, True])
def test_gpu_bf16_default_tiles_match_reference(reverse, l, save_states):
    """bf16 at b2 d1536 (the default tiles for many channels: one channel and one warp a program, 16 positions a
    thread in two V-blocks, chunk prefetch, B/C pairs, capped registers; reverse: mirrored blocks flipped
    in-thread; an odd length: rows padded to 4016; whole chunks without saved states: B/C loads without masks)
    vs the float64 reference."""
    b, d, n = 2, 1536, 16
    x = _cuda(inputs(b=b, d=d, n=n, l=l, groups=1, seed=11), torch.bfloat16)
    y, h, cs = _compiled().blocked_fwd(**{k: x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")},
                                       softplus=True, initial_state=x["initial_state"], reverse=reverse,
                                       save_states=save_states)
    y_ref, h_ref = selective_scan_ref(**{k: v.double() for k, v in x.items()}, delta_softplus=True,
                                      reverse=reverse, return_final_state=True)
    assert_all_close({"y": (y, y_ref), "final_state": (h, h_ref)}, 1e-2)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("save_states", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_gpu_bf16_wide_rows_registers_capped_lower(reverse, save_states):
    """b1 d2048: more one-warp programs than 12 an SM hold, which run at 128 registers a thread (one wave of 16
    an SM): outputs and states bitwise equal to the 168-register launch, and close to the float64 reference."""
    x = _cuda(inputs(b=1, d=2048, n=16, l=1504, groups=1, seed=12), torch.bfloat16)
    args = {k: x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")}
    kw = dict(softplus=True, initial_state=x["initial_state"], reverse=reverse, save_states=save_states)
    blocked = _compiled()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if 12 * sms < 2048 <= 16 * sms:  # an H100 or H200 (132 SMs)
        assert blocked.default_maxnreg(2048, 1, sms) == 128
    got = blocked.blocked_fwd(**args, **kw)
    at_168 = blocked.blocked_fwd(**args, **kw, maxnreg=168)
    for a, c in zip(got, at_168):
        assert (a is None and c is None) or torch.equal(a, c)
    y_ref, h_ref = selective_scan_ref(**{k: v.double() for k, v in x.items()}, delta_softplus=True,
                                      reverse=reverse, return_final_state=True)
    assert_all_close({"y": (got[0], y_ref), "final_state": (got[1], h_ref)}, 1e-2)


@pytest.mark.gpu
@cuda
def test_gpu_bf16_1m_finite_and_two_halves():
    """bf16 b1 d1536 l2^20: finite, and two calls carrying the state equal one shot."""
    b, d, n, l = 1, 1536, 16, 1 << 20
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").to(torch.bfloat16)  # noqa: E731
    x = dict(u=r(b, d, l), delta=r(b, d, l), A=-torch.rand(d, n, device="cuda") - 0.1, B=r(b, n, l), C=r(b, n, l),
             D=torch.ones(d, device="cuda"), z=r(b, d, l), delta_bias=torch.full((d,), -3.0, device="cuda"))
    fwd = _compiled().blocked_fwd
    y, h, _ = fwd(**x, softplus=True)
    assert torch.isfinite(y.float()).all() and torch.isfinite(h).all()
    half = {k: (v[..., : l // 2] if k in L_ARGS else v) for k, v in x.items()}
    rest = {k: (v[..., l // 2:] if k in L_ARGS else v) for k, v in x.items()}
    y1, h1, _ = fwd(**half, softplus=True)
    y2, h2, _ = fwd(**rest, softplus=True, initial_state=h1)
    assert (h2 - h).abs().max() <= 1e-4 * h.abs().max()
    assert (torch.cat([y1, y2], -1).float() - y.float()).abs().max() <= 1e-2 * y.float().abs().max()


@pytest.mark.gpu
@cuda
def test_gpu_64bit_offsets_4m_tokens():
    """b1 d1536 l2^22 (6.4e9 elements per tensor, past 2^32 bytes): the last 2^15 positions match the reference
    started from the kernel's own chunk state just before them."""
    b, d, n, l, w = 1, 1536, 16, 1 << 22, 1 << 15
    mod = _compiled()
    assert w % mod.state_spacing() == 0
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").to(torch.bfloat16)  # noqa: E731
    x = dict(u=r(b, d, l), delta=r(b, d, l), A=-torch.rand(d, n, device="cuda") - 0.1, B=r(b, n, l), C=r(b, n, l),
             D=torch.ones(d, device="cuda"), z=r(b, d, l), delta_bias=torch.full((d,), -3.0, device="cuda"))
    with torch.no_grad():
        y, h, cs = mod.blocked_fwd(**x, softplus=True, save_states=True)
        h_before = cs[:, (l - w) // mod.state_spacing()]
        del cs
        tail = {k: (v[..., -w:] if k in L_ARGS else v) for k, v in x.items()}
        y_ref, h_ref = selective_scan_ref(**tail, delta_softplus=True, return_final_state=True,
                                          initial_state=h_before)
        assert (h - h_ref).abs().max() <= 1e-4 * h_ref.abs().max()
        err = (y[..., -w:].float() - y_ref.float()).abs().max()
        assert err <= 1e-2 * y_ref.float().abs().max(), err
        assert torch.isfinite(y[..., :w].float()).all()
