"""The blocked selective-scan backward (``blocked_bwd.py``) against autograd of the float64 reference.

CPU: the kernel runs under the Triton interpreter on tiny shapes with a short chunk length, so every path (several
chunks, a ragged last chunk, reverse, seq_idx resets, groups, absent options) is taken; the chunk states it starts
from are the reference's final states on prefixes (the forward's contract). GPU (``-m gpu``): a realistic fp32
shape, and bf16 at a million positions.
"""
from __future__ import annotations

import pytest
import torch

from seqmamba.kernels.selective_scan import selective_scan_ref
from tests.kernels.interpret import load_interpreted
from tests.kernels.test_scan_blocked_fwd import piece_states
from tests.kernels.test_selective_scan import assert_close, make_inputs

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@pytest.fixture(scope="module")
def blocked():
    return load_interpreted("seqmamba.kernels.selective_scan.blocked_bwd")


def chunk_states(x, T, softplus, reverse, seq_idx):
    """(b, cdiv(padded_len(l), T), d, n) fp32: the forward's contract, from the reference
    (``test_scan_blocked_fwd.piece_states``)."""
    L = -(-x["u"].shape[-1] // 16) * 16
    return piece_states(x, T, softplus, reverse, seq_idx, L).float().contiguous()


def reference_grads(x, dy, dht, softplus, reverse, seq_idx):
    """Autograd of the float64 reference: {"d<name>": grad} for every input present."""
    x64 = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in x.items()}
    y, h = selective_scan_ref(**x64, delta_softplus=softplus, reverse=reverse, return_final_state=True,
                              seq_idx=seq_idx)
    loss = (y * dy.double()).sum() + ((h * dht.double()).sum() if dht is not None else 0.0)
    names = [k for k in NAMES if x64[k] is not None]
    grads = torch.autograd.grad(loss, [x64[k] for k in names])
    return {f"d{k}": g for k, g in zip(names, grads)}


def kernel_grads(impl, x, dy, dht, softplus, reverse, seq_idx, T, **tuning):
    cs = chunk_states(x, T, softplus, reverse, seq_idx)
    xs = {k: (v.detach() if v is not None else None) for k, v in x.items()}
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = impl(
        xs["u"], xs["delta"], xs["A"], xs["B"], xs["C"], xs["D"], xs["z"], xs["delta_bias"], softplus, reverse,
        cs, dy, dht, seq_idx, chunk_len=T, **tuning)
    got = dict(du=du, ddelta=ddelta, dA=dA, dB=dB, dC=dC, dD=dD, dz=dz, ddelta_bias=dbias, dinitial_state=dh0)
    return {k: v for k, v in got.items() if x[k[1:]] is not None}


def packed_seq_idx(b, l, seed):
    """(b, l) non-decreasing sequence ids with a few resets (one at position 1, one near the end)."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.zeros(b, l, dtype=torch.long)
    for r in range(b):
        for p in torch.randint(1, l, (3,), generator=g).tolist() + [1, l - 1]:
            cuts[r, p] = 1
    return cuts.cumsum(1)


# (name, make_inputs overrides, softplus, reverse, seq_idx, dht, T, tuning)
CASES = [
    ("all-options-3-chunks", dict(l=21, groups=2), True, False, False, True, 8, {}),
    ("reverse-ragged", dict(l=19, groups=2), True, True, False, True, 4, dict(block_d=1)),
    ("no-options-3d-BC", dict(l=13, groups=None, z=False, D=False, delta_bias=False, h0=False), False, False,
     False, False, 4, {}),
    ("bias-no-softplus-groups4-n5", dict(l=17, groups=4, n=5, z=False), False, True, False, True, 8, {}),
    ("seq-idx", dict(l=23, groups=1), True, False, True, True, 4, dict(block_d=4)),
    ("seq-idx-reverse", dict(l=23, groups=2), True, True, True, False, 8, {}),
    ("one-chunk-length-1", dict(l=1, groups=2), True, False, False, True, 4, {}),
    ("exact-chunks", dict(l=16, groups=1, d=8), True, True, False, True, 4, dict(block_d=8, num_warps=2)),
    ("one-channel-seq-idx-reverse-n5", dict(l=19, groups=2, n=5), True, True, True, True, 4, dict(block_d=1)),
    # lengths that are multiples of 16 run unpadded (the others on rows padded to one, pad = identity steps)
    ("unpadded-seq-idx-reverse", dict(l=32, groups=2), True, True, True, True, 8, {}),
    ("unpadded-seq-idx", dict(l=48, groups=1), True, False, True, True, 8, {}),
]


@pytest.mark.parametrize("name,over,softplus,reverse,seq,dht,T,tuning", CASES, ids=[c[0] for c in CASES])
def test_interpreted_matches_reference_autograd(blocked, name, over, softplus, reverse, seq, dht, T, tuning):
    """Every gradient (dh0 included) from fp32 inputs against autograd of the float64 reference."""
    kw = dict(b=2, d=4, n=3, seed=len(name), dtype=torch.float32)
    kw.update(over)
    x = make_inputs(**kw)
    if not softplus and x["delta_bias"] is not None:  # raw delta without softplus: keep dt > 0 (decays <= 1)
        x["delta"] = torch.nn.functional.softplus(x["delta"].detach()) + 0.5
    b, d, l = x["u"].shape
    n = x["A"].shape[1]
    seq_idx = packed_seq_idx(b, l, len(name)) if seq and l > 1 else None
    gen = torch.Generator().manual_seed(7)
    dy = torch.randn(b, d, l, generator=gen)
    dh = torch.randn(b, d, n, generator=gen) if dht else None
    got = kernel_grads(blocked.blocked_bwd, x, dy, dh, softplus, reverse, seq_idx, T, **tuning)
    want = reference_grads(x, dy, dh, softplus, reverse, seq_idx)
    assert_close(got, want, rtol=2e-5)
    assert got["du"].stride(1) == -(-l // 16) * 16  # rows of aligned storage


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interpreted_low_precision(blocked, dtype):
    """bf16/fp16 u, delta, B, C, z, dy (fp32 A, D, bias, h0): each gradient in its input's dtype, close to the
    float64 reference on the same rounded inputs."""
    x = make_inputs(b=1, d=4, n=4, l=19, groups=2, dtype=torch.float32, seed=3)
    x = {k: (v.detach().to(dtype) if k in ("u", "delta", "B", "C", "z") else v.detach()) for k, v in x.items()}
    gen = torch.Generator().manual_seed(7)
    dy = torch.randn(1, 4, 19, generator=gen).to(dtype)
    dh = torch.randn(1, 4, 4, generator=gen)
    got = kernel_grads(blocked.blocked_bwd, x, dy, dh, True, False, None, 8)
    for k, v in got.items():
        want_dtype = torch.float32 if k == "dinitial_state" else x[k[1:]].dtype
        assert v.dtype == want_dtype, (k, v.dtype)
    want = reference_grads(x, dy.float(), dh, True, False, None)
    assert_close(got, want, rtol=2e-2 if dtype == torch.bfloat16 else 5e-3)


@pytest.mark.parametrize("dtype,T,reverse,seq,warps,tuning", [
    (torch.float32, 64, False, False, 1, {}), (torch.float32, 128, True, True, 1, {}),
    (torch.bfloat16, 128, False, True, 1, {}), (torch.bfloat16, 256, True, False, 1, {}),
    (torch.bfloat16, 512, False, True, 2, {}), (torch.float32, 256, True, False, 2, {}),
    # two channels a program (the plan from 2048 rows): g by gather in both directions, or by the suffix scan
    (torch.bfloat16, 128, False, True, 1, dict(block_d=2)), (torch.float32, 128, True, False, 1, dict(block_d=2)),
    (torch.bfloat16, 128, False, False, 1, dict(block_d=2, gather=False)),
    (torch.float32, 128, False, True, 1, dict(gather=True)),
    # 8 positions a thread on one warp (chunk 256, the plan up to one wave of rows): gather by default, both
    # directions, and the suffix scan
    (torch.bfloat16, 256, False, True, 1, {}), (torch.bfloat16, 256, True, True, 1, dict(gather=False)),
    # 1024 positions on four warps (the plan for up to two rows an SM)
    (torch.bfloat16, 1024, True, True, 4, {})])
def test_interpreted_full_warp_chunks(blocked, dtype, T, reverse, seq, warps, tuning):
    """Chunks on full warps with 2, 4 or 8 positions a thread, the layout the GPU kernels run (their reverse scans
    combine in-thread runs and per-thread maps: at the tiny chunks above every thread holds one position), both
    directions, a ragged end, packed sequences, one warp and two (where dA is kept as per-thread partials), one
    channel a program and two, either cross-lane form of the backward-running scan; every gradient against the
    float64 reference."""
    x = make_inputs(b=1, d=2, n=3, l=300, groups=1, dtype=torch.float32, seed=T)
    x = {k: (v.detach().to(dtype) if k in ("u", "delta", "B", "C", "z") else v.detach()) for k, v in x.items()}
    gen = torch.Generator().manual_seed(T)
    dy = torch.randn(1, 2, 300, generator=gen).to(dtype)
    dh = torch.randn(1, 2, 3, generator=gen)
    seq_idx = packed_seq_idx(1, 300, seed=T) if seq else None
    got = kernel_grads(blocked.blocked_bwd, x, dy, dh, True, reverse, seq_idx, T, num_warps=warps, **tuning)
    want = reference_grads(x, dy.float(), dh, True, reverse, seq_idx)
    assert_close(got, want, rtol=2e-2 if dtype == torch.bfloat16 else 2e-5)


def test_interpreted_strided_inputs(blocked):
    """Channel-last u, delta, z, dy views (the mixer's layout) give the same gradients as contiguous ones."""
    x = make_inputs(b=1, d=4, n=3, l=11, groups=1, dtype=torch.float32, seed=4)
    gen = torch.Generator().manual_seed(7)
    dy = torch.randn(1, 4, 11, generator=gen)
    got = kernel_grads(blocked.blocked_bwd, x, dy, None, True, False, None, 4)
    cl = {k: (v.detach().transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "delta", "z") else v)
          for k, v in x.items()}
    got_cl = kernel_grads(blocked.blocked_bwd, cl, dy.transpose(1, 2).contiguous().transpose(1, 2), None, True,
                          False, None, 4)
    assert_close(got_cl, got, rtol=1e-6)


def test_bad_chunk_states_is_one_error(blocked):
    x = {k: (v.detach() if v is not None else None) for k, v in make_inputs(l=9, dtype=torch.float32).items()}
    with pytest.raises(ValueError, match="chunk_states must have shape"):
        blocked.blocked_bwd(x["u"], x["delta"], x["A"], x["B"], x["C"], None, None, None, False, False,
                            torch.zeros(2, 2, 4, 3), torch.zeros_like(x["u"]), chunk_len=4)


# ---------------------------------------------------------------------------------------------- GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("reverse", [False, True])
def test_gpu_realistic_fp32(reverse):
    """b2 d64 n16 l3000 (several 1024-position chunks, ragged end), groups 2, all options: every gradient."""
    from seqmamba.kernels.selective_scan.blocked_bwd import blocked_bwd

    x = make_inputs(b=2, d=64, n=16, l=3000, groups=2, dtype=torch.float32, seed=11)
    x = {k: v.detach().cuda() for k, v in x.items()}
    gen = torch.Generator(device="cuda").manual_seed(7)
    dy = torch.randn(2, 64, 3000, generator=gen, device="cuda")
    dh = torch.randn(2, 64, 16, generator=gen, device="cuda")
    got = kernel_grads(blocked_bwd, x, dy, dh, True, reverse, None, 1024)
    want = reference_grads(x, dy, dh, True, reverse, None)
    assert_close(got, {k: v.float() for k, v in want.items()}, rtol=1e-4)


@pytest.mark.gpu
@cuda
def test_gpu_bf16_million_positions_finite():
    """b1 d1536 n16 l2^20 bf16: the backward runs (64-bit offsets in (b, g, n, l)) and every gradient is finite."""
    from seqmamba.kernels.selective_scan.blocked_bwd import blocked_bwd

    b, d, n, l, T = 1, 1536, 16, 2 ** 20, 2048
    gen = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda")  # noqa: E731
    bf = torch.bfloat16
    u, delta, z, dy = r(b, d, l).to(bf), (r(b, d, l) - 2).to(bf), r(b, d, l).to(bf), r(b, d, l).to(bf)
    B, C = r(b, 1, n, l).to(bf), r(b, 1, n, l).to(bf)
    A, D, bias = -torch.exp(r(d, n) * 0.5), r(d), r(d) * 0.3
    cs = r(b, l // T, d, n) * 0.1
    grads = blocked_bwd(u, delta, A, B, C, D, z, bias, True, False, cs, dy, None, chunk_len=T)
    for gr in grads:
        assert torch.isfinite(gr.float()).all()


@pytest.mark.gpu
@cuda
def test_gpu_64bit_offsets_backward_last_window():
    """b1 d1024 l2^22 bf16 (4.3e9 elements per (b, d, l) tensor, offsets past 2^31): the gradients of the last
    2^12 positions equal the float64 reference's on that window started from the state before it (nothing to the
    right feeds them), and every gradient is finite."""
    from seqmamba.kernels.selective_scan.blocked_bwd import blocked_bwd
    from seqmamba.kernels.selective_scan.blocked_fwd import blocked_fwd

    torch.cuda.empty_cache()
    b, d, n, l, T, w = 1, 1024, 16, 1 << 22, 512, 1 << 12
    gen = torch.Generator(device="cuda").manual_seed(3)
    bf = torch.bfloat16
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda", dtype=bf)  # noqa: E731
    x = dict(u=r(b, d, l), delta=r(b, d, l), A=-torch.rand(d, n, device="cuda") - 0.1, B=r(b, 1, n, l),
             C=r(b, 1, n, l), D=torch.ones(d, device="cuda"), z=r(b, d, l),
             delta_bias=torch.full((d,), -3.0, device="cuda"))
    dy = r(b, d, l)
    _, _, cs = blocked_fwd(*x.values(), softplus=True, save_states=True, chunk=T)
    grads = blocked_bwd(*x.values(), True, False, cs, dy, None, chunk_len=T)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    for name, gr in zip(names, grads):
        # a NaN/inf anywhere makes the fp32 sum non-finite; isfinite(gr) would allocate 4.3 GB of bools
        assert torch.isfinite(gr.sum(dtype=torch.float32)), name
    got = {k: gr[..., -w:].clone() for k, gr in zip(names, grads) if k in ("u", "delta", "B", "C", "z")}
    dy_w = dy[..., -w:].clone()
    del grads, dy, cs
    with torch.no_grad():
        head = {k: (v[..., :-w] if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
        _, h_before, _ = blocked_fwd(*head.values(), softplus=True)
        del head
    win = {k: (v[..., -w:].double().requires_grad_() if k in ("u", "delta", "z", "B", "C") else None)
           for k, v in x.items()}
    fixed = {k: v.double() for k, v in x.items() if win[k] is None}
    y = selective_scan_ref(**{k: (win[k] if win[k] is not None else fixed[k]) for k in x}, delta_softplus=True,
                           initial_state=h_before.double())
    want = torch.autograd.grad((y * dy_w.double()).sum(), [win[k] for k in ("u", "delta", "B", "C", "z")])
    for k, wv in zip(("u", "delta", "B", "C", "z"), want):
        gv = got[k].double()
        assert (gv - wv).norm() <= 2e-2 * wv.norm(), (k, ((gv - wv).norm() / wv.norm()).item())
