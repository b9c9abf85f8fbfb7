"""selective_scan_bidirectional (the fused forward + reverse scan) against two reference calls added.

CPU: the public op's reference path and validation; the Triton op under the interpreter on tiny shapes, with
the default blocked kernels (several chunks) and in deterministic mode with the tile-state kernels (the tile
scan on (b, d, l)-contiguous inputs, the sequential one on the mixer's channel-last delta/z, which also writes
a channel-last y), with a shared z and with seq_idx. GPU (``-m gpu``):
a realistic bf16 shape and the BiMamba module (fused path) against the reference backend.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from seqmamba.kernels.bidirectional import selective_scan_bidirectional, split_directions
from seqmamba.kernels.selective_scan import selective_scan_ref
from tests.kernels.interpret import load_interpreted
from tests.kernels.test_selective_scan import assert_close, make_inputs
from tests.kernels.test_selective_scan_triton import deterministic_mode

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SCAN = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.fixture(scope="module")
def chunk():
    return load_interpreted("seqmamba.kernels.selective_scan.chunk")


@pytest.fixture(params=["blocked", "deterministic"])
def mode(request, chunk, monkeypatch):
    """Which kernels the ops run: the blocked pair (default; its chunk length cut to 8 so tiny inputs take
    several chunks) or this file's tile-state kernels (deterministic mode)."""
    monkeypatch.setattr(chunk, "GRAD_CHUNK", 8)
    with deterministic_mode() if request.param == "deterministic" else contextlib.nullcontext():
        yield request.param


def make_pair(b, d, n, l, groups=1, shared_z=False, channel_last=False, dtype=torch.float32, seed=0):
    """Independent random inputs per direction (fresh each call), as leaves; z shared when asked. channel_last
    stores delta and z as transposed (b, l, d) tensors, the Mamba mixer's layout."""
    fwd, rev = (make_inputs(b=b, d=d, n=n, l=l, groups=groups, dtype=dtype, seed=seed + i, h0=False)
                for i in range(2))
    for x in (fwd, rev):
        x.pop("initial_state")
        if channel_last:
            for k in ("delta", "z"):
                x[k] = x[k].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    if shared_z:
        rev["z"] = fwd["z"]
    return fwd, rev


def grads_of(y, leaves, seed=1):
    """y and d(sum(y * dy))/d(each leaf) for a fixed random dy."""
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    names = list(leaves)
    gs = torch.autograd.grad((y * dy.to(y.device)).sum(), [leaves[k] for k in names])
    return {"y": y.detach(), **{f"d{k}": v for k, v in zip(names, gs)}}


def leaves_of(fwd, rev):
    out = {f"{k}_f": v for k, v in fwd.items() if v is not None}
    out.update({f"{k}_r": v for k, v in rev.items() if v is not None and v is not fwd[k]})
    return out


def two_call_reference(fwd, rev, softplus=True, seq_idx=None, dtype=torch.float64):
    """Detached copies in ``dtype`` (shared tensors stay shared), and the two-call reference y on them."""
    copies = {}

    def cast(v):
        if v is None:
            return None
        if id(v) not in copies:
            copies[id(v)] = v.detach().to(dtype).requires_grad_()
        return copies[id(v)]
    f64 = {k: cast(v) for k, v in fwd.items()}
    r64 = {k: cast(v) for k, v in rev.items()}
    y = selective_scan_ref(**f64, delta_softplus=softplus, seq_idx=seq_idx) + \
        selective_scan_ref(**r64, delta_softplus=softplus, reverse=True, seq_idx=seq_idx)
    return y, f64, r64


# (name, shape (b, d, n, l), groups, shared z, channel-last delta/z, seq_idx)
CASES = [
    ("tile-kernel-multichunk", (2, 4, 3, 37), 2, False, False, False),
    ("shared-z", (1, 4, 2, 21), 1, True, False, False),
    ("seq-kernel-channel-last", (1, 4, 2, 70), 1, True, True, False),
    ("packed", (2, 2, 2, 37), 1, False, False, True),
]


@pytest.mark.parametrize("name,shape,groups,shared_z,channel_last,packed", CASES, ids=[c[0] for c in CASES])
def test_interpreted_matches_two_call_reference(chunk, mode, name, shape, groups, shared_z, channel_last, packed):
    """Output and every gradient of both directions' inputs (fp32) against two float64 reference calls, with
    either kernel family."""
    b, d, n, l = shape
    fwd, rev = make_pair(b, d, n, l, groups=groups, shared_z=shared_z, channel_last=channel_last,
                         seed=len(name))
    seq_idx = None
    if packed:
        seq_idx = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor(c))
                               for c in ([5, 20, l - 25], [1, l - 2, 1])][:b])
    y = chunk.selective_scan_bidirectional_triton(fwd, rev, delta_softplus=True, seq_idx=seq_idx)
    if channel_last and mode == "deterministic":
        assert y.stride(1) == 1, y.stride()  # the tile-state kernels' y follows delta's layout
    got = grads_of(y, leaves_of(fwd, rev))
    y_ref, f64, r64 = two_call_reference(fwd, rev, seq_idx=seq_idx)
    want = grads_of(y_ref, leaves_of(f64, r64))
    assert got["y"].dtype == torch.float32
    assert_close(got, want, rtol=2e-5)


def test_interpreted_state_first_variant_by_default_rule(chunk, monkeypatch):
    """Deterministic mode, with the state-first sequential kernel as the 'auto' variant (it writes the tile
    states in (n, d) order, which the backward must read back the same way): channel-last inputs, output and
    every gradient."""
    monkeypatch.setattr(chunk, "SEQ_VARIANT", "seqt")
    fwd, rev = make_pair(1, 4, 3, 70, shared_z=True, channel_last=True, seed=13)
    with deterministic_mode():
        y = chunk.selective_scan_bidirectional_triton(fwd, rev, delta_softplus=True)
        got = grads_of(y, leaves_of(fwd, rev))
    y_ref, f64, r64 = two_call_reference(fwd, rev)
    assert_close(got, grads_of(y_ref, leaves_of(f64, r64)), rtol=2e-5)


@pytest.mark.parametrize("blocked", [True, False])
@pytest.mark.parametrize("channel_last", [False, True])
def test_interpreted_fake_layouts_match_real(chunk, channel_last, blocked, monkeypatch):
    """The bidirectional ops' fake implementations give every output the real one's shape, dtype and strides
    (torch.compile trusts them), with either kernel family."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setattr(chunk, "GRAD_CHUNK", 16)
    fwd, rev = make_pair(1, 2, 2, 70, channel_last=channel_last, seed=5)
    pairs = [t.detach() for k in SCAN for t in (fwd[k], rev[k])]
    fwd_args = (*pairs, True, True, None, blocked)
    y, ts_f, ts_r = chunk._bi_fwd_op(*fwd_args)
    bwd_args = (*pairs, ts_f, ts_r, torch.randn_like(y), True, None, blocked)
    for op, args in ((chunk._bi_fwd_op, fwd_args), (chunk._bi_bwd_op, bwd_args)):
        real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        assert [(t.shape, t.dtype, t.stride()) for t in real] == [(t.shape, t.dtype, t.stride()) for t in fake]


def test_interpreted_directions_save_states_at_their_own_spacing(chunk, monkeypatch):
    """Under autograd each direction saves states at its own spacing (forward scans at 256 positions where reverse
    ones take 128: chunk.py's _state_len): the fakes give the real shapes, and output and gradients match two
    float64 reference calls."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setattr(chunk, "GRAD_CHUNK", 256)
    monkeypatch.setattr(chunk, "GRAD_STATE_LENS", ((2, 128), (0, 512)))  # 2 rows: S = 128, forward scans 256
    fwd, rev = make_pair(1, 2, 2, 300, seed=17)
    pairs = [t.detach() for k in SCAN for t in (fwd[k], rev[k])]
    args = (*pairs, True, True, None, True)
    real = chunk._bi_fwd_op(*args)
    assert (real[1].shape[1], real[2].shape[1]) == (2, 3)  # cdiv(304, 256) and cdiv(304, 128) saved states
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = chunk._bi_fwd_op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert [t.shape for t in real] == [t.shape for t in fake]
    got = grads_of(chunk.selective_scan_bidirectional_triton(fwd, rev, delta_softplus=True), leaves_of(fwd, rev))
    y_ref, f64, r64 = two_call_reference(fwd, rev)
    assert_close(got, grads_of(y_ref, leaves_of(f64, r64)), rtol=2e-5)


def test_interpreted_no_grad_and_bf16(chunk):
    """bf16 activations (fp32 A, D, bias): y in bf16, close to the fp32 reference on the same inputs; no
    tile states are kept without autograd."""
    fwd, rev = make_pair(1, 4, 4, 19, dtype=torch.bfloat16, seed=3)
    for x in (fwd, rev):
        for k in ("A", "D", "delta_bias"):
            x[k] = x[k].detach().float()
    with torch.no_grad():
        y = chunk.selective_scan_bidirectional_triton(fwd, rev, delta_softplus=True)
        y_ref, _, _ = two_call_reference(fwd, rev, dtype=torch.float32)
    assert y.dtype == torch.bfloat16
    assert (y.float() - y_ref).norm() <= 1e-2 * y_ref.norm()


def test_public_reference_path_and_pairs():
    """backend='ref' is two reference calls added; a lone tensor is shared by both directions (its gradient is
    the sum of both directions')."""
    fwd, rev = make_pair(2, 4, 3, 11, shared_z=True, dtype=torch.float64, seed=7)
    args = {k: (fwd[k] if fwd[k] is rev[k] else (fwd[k], rev[k])) for k in SCAN}
    assert not isinstance(args["z"], tuple)
    y = selective_scan_bidirectional(**args, delta_softplus=True, backend="ref")
    got = grads_of(y, leaves_of(fwd, rev))
    y_ref, f64, r64 = two_call_reference(fwd, rev)
    want = grads_of(y_ref, leaves_of(f64, r64))
    assert_close(got, want, rtol=1e-12)


def test_auto_variant_follows_delta_layout(chunk):
    """'auto' takes the state-first sequential kernel for channel-last delta only (on l-contiguous inputs it
    measured 3x slower)."""
    fwd, _ = make_pair(1, 8, 2, 128, channel_last=True)
    assert chunk._fwd_plan(1, 8, 128, fwd["delta"], "auto", 16) == (True, True)
    assert chunk._fwd_plan(1, 8, 128, fwd["u"], "auto", 16) == (True, False)


def test_auto_backward_choice(chunk):
    """'auto' backward: sequential after the state-first forward while its dB/dC partials stay small; the tile
    kernel on (b, d, l) inputs, with seq_idx, or when the partials would pass the cap."""
    fwd, _ = make_pair(1, 8, 2, 128, channel_last=True)
    args = (fwd["u"], fwd["delta"], fwd["A"], fwd["B"])
    assert chunk._bwd_plan(*args, None, None, "auto", 16)
    assert not chunk._bwd_plan(fwd["u"], fwd["u"], fwd["A"], fwd["B"], None, None, "auto", 16)
    assert not chunk._bwd_plan(*args, torch.zeros(1, 128, dtype=torch.long), None, "auto", 16)
    assert not chunk._bwd_plan(*args, None, None, "tile", 16)
    cap = chunk.BWD_SEQ_MAX_PARTIAL_BYTES
    try:
        chunk.BWD_SEQ_MAX_PARTIAL_BYTES = 2 * 4 * 1 * 1 * 1 * 2 * 128 - 1  # one split, g 1, n 2, l 128
        assert not chunk._bwd_plan(*args, None, None, "auto", 16)
    finally:
        chunk.BWD_SEQ_MAX_PARTIAL_BYTES = cap


def test_bimamba_fuses_only_without_autograd_by_default(monkeypatch):
    """BiMamba calls the bidirectional scan without autograd (and under it when fused_scan=True); the output is
    the same either way."""
    import seqmamba.bimamba as bimamba_mod
    calls = []
    real = bimamba_mod.selective_scan_bidirectional
    monkeypatch.setattr(bimamba_mod, "selective_scan_bidirectional", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    m = bimamba_mod.BiMamba(8, d_state=4)
    x = torch.randn(2, 9, 8)
    y_grad = m(x)
    assert not calls
    with torch.no_grad():
        y_nograd = m(x)
    assert calls == [1]
    m.fused_scan = True
    m(x).sum().backward()
    assert calls == [1, 1]
    assert torch.allclose(y_grad, y_nograd, rtol=1e-5, atol=1e-6)


def test_validation_errors_name_the_argument():
    fwd, rev = make_pair(1, 4, 2, 5, dtype=torch.float64)
    args = {k: (fwd[k], rev[k]) for k in SCAN}
    with pytest.raises(ValueError, match="delta"):
        selective_scan_bidirectional(**{**args, "delta": (fwd["delta"], rev["delta"][..., :4])})
    with pytest.raises(ValueError, match="D is given for one direction only"):
        selective_scan_bidirectional(**{**args, "D": (fwd["D"], None)})
    with pytest.raises(ValueError, match="pair"):
        split_directions(u=(fwd["u"],))


# ---------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("channel_last", [False, True])
def test_gpu_bf16_realistic(channel_last):
    """b2 d1536 n16 l4096 bf16 (fp32 A, D, bias), shared z: y and every gradient within 2e-2 of the float64
    two-call reference (relative L2)."""
    fwd, rev = make_pair(2, 1536, 16, 4096, shared_z=True, channel_last=channel_last, seed=21)
    for x in (fwd, rev):
        for k in x:
            v = x[k].detach().cuda()
            if k in ("u", "delta", "B", "C", "z"):
                v = v.to(torch.bfloat16)
            x[k] = v
    rev["z"] = fwd["z"]
    for x in (fwd, rev):
        for v in x.values():
            v.requires_grad_()
    y = selective_scan_bidirectional(**{k: (fwd[k] if fwd[k] is rev[k] else (fwd[k], rev[k])) for k in SCAN},
                                     delta_softplus=True, backend="triton")
    assert y.dtype == torch.bfloat16
    got = grads_of(y, leaves_of(fwd, rev))
    y_ref, f64, r64 = two_call_reference(fwd, rev)
    want = grads_of(y_ref, leaves_of(f64, r64))
    for k in want:
        a, b_ = got[k].double(), want[k]
        assert torch.isfinite(a).all(), k
        assert (a - b_).norm() <= 2e-2 * b_.norm(), (k, ((a - b_).norm() / b_.norm()).item())


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("masked", [False, True])
def test_gpu_bimamba_fused_matches_reference_backend(masked):
    """BiMamba (tied projections, "add": the fused path) with backend auto vs ref: output, input gradient and
    every parameter gradient (fp32, rtol 1e-4), with and without a padding mask."""
    from seqmamba.bimamba import BiMamba
    torch.manual_seed(0)
    m_auto = BiMamba(64, backend="auto").cuda()
    m_ref = BiMamba(64, backend="ref").cuda()
    m_ref.load_state_dict(m_auto.state_dict())
    m_auto.fused_scan = True  # under autograd too (the default fuses only without it)
    x = torch.randn(2, 1500, 64, device="cuda")
    mask = None
    if masked:
        mask = torch.ones(2, 1500, dtype=torch.bool, device="cuda")
        mask[0, :100] = False
        mask[1, -300:] = False
    outs = []
    for m in (m_auto, m_ref):
        xi = x.clone().requires_grad_()
        y = m(xi, mask=mask)
        (y.square() * (1.0 if mask is None else mask[..., None])).sum().backward()
        outs.append({"y": y.detach() * (1.0 if mask is None else mask[..., None]), "dx": xi.grad,
                     **{n: p.grad for n, p in m.named_parameters()}})
    assert_close(outs[0], outs[1], rtol=1e-4)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mixer", ["mamba", "mamba2"])
def test_gpu_bimamba_alignment_pad_matches_unpadded(mixer, monkeypatch):
    """BiMamba on the Triton kernels at a length that is not a multiple of 16, padded to one (forced at this
    size) against unpadded: output, input gradient and every parameter gradient (fp32, rtol 1e-5). The pad rows
    are identity steps through dt = -inf, which the kernels' softplus must take to exactly 0 (and its
    derivative too) in both directions."""
    from seqmamba.bimamba import BiMamba
    torch.manual_seed(0)
    m = BiMamba(64, mixer=mixer).cuda()
    x = torch.randn(2, 1495, 64, device="cuda")
    outs = []
    for forced in (False, True):
        if forced:
            monkeypatch.setattr(m.mamba_fwd, "SPLIT_MIN_ELEMENTS", 1)
        assert m.alignment_pad(x) == (9 if forced else 0)
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.square().sum().backward()
        outs.append({"y": y.detach(), "dx": xi.grad, **{n: p.grad.clone() for n, p in m.named_parameters()}})
    assert_close(outs[1], outs[0], rtol=1e-5)
