"""Triton selective scan against the reference.

CPU: the kernels run under the Triton interpreter (tiny shapes, forced small tiles so that every multi-chunk
path, channel split and tail is taken). GPU (``-m gpu``): realistic shapes, bf16, 64-bit offsets, determinism,
and the core modules with ``backend="auto"`` against ``backend="ref"``.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from seqmamba.kernels.selective_scan import selective_scan, selective_scan_ref
from tests.kernels.interpret import load_interpreted
from tests.kernels.test_selective_scan import assert_close, detached, make_inputs, run_with_grads
from tests.utils import module_outputs_and_grads, outputs_and_grads

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def chunk():
    return load_interpreted("seqmamba.kernels.selective_scan.chunk")


@pytest.fixture
def small_chunks(chunk, monkeypatch):
    """The blocked kernels' chunk length cut to 4 positions for the default (custom-op) path, so that tiny
    inputs take several chunks."""
    monkeypatch.setattr(chunk, "GRAD_CHUNK", 4)
    return chunk


@contextlib.contextmanager
def deterministic_mode():
    """torch.use_deterministic_algorithms(True) (warn-only, so that other ops are not refused) for the block."""
    old, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old, warn_only=warn)


def triton_fn(impl, tuning=None, **kw):
    def fn(**x):
        return impl(**x, return_final_state=True, _tuning=tuning, **kw)
    return fn


def public_fn(**kw):
    def fn(**x):
        return selective_scan(**x, return_final_state=True, backend="triton", **kw)
    return fn


def ref_fn(**kw):
    def fn(**x):
        return selective_scan_ref(**x, return_final_state=True, **kw)
    return fn


# (name, make_inputs overrides, softplus, reverse, tuning)
CASES = [
    ("one-tile", dict(l=7), True, False, None),
    ("chunks+splits", dict(l=37, groups=2), True, False,
     dict(tile=4, fwd_chunks=3, bwd_chunks=4, bwd_splits=2, fwd_kernel="scan")),
    ("reverse-chunks", dict(l=37, groups=2), True, True,
     dict(tile=4, fwd_chunks=4, bwd_chunks=3, bwd_splits=1, fwd_kernel="scan")),
    ("3d-BC-no-options", dict(l=21, groups=None, z=False, D=False, delta_bias=False, h0=False), False, True,
     dict(tile=8, fwd_chunks=2, bwd_chunks=2)),
    ("groups4-n5", dict(l=18, groups=4, n=5), True, False, dict(tile=8, fwd_chunks=1, bwd_chunks=3)),
    ("length1", dict(l=1, groups=2), True, True, dict(tile=4)),
    ("seq-fwd-chunks", dict(l=37, groups=2), True, False,
     dict(tile=4, fwd_chunks=3, bwd_chunks=2, fwd_kernel="seq")),
    ("seq-fwd-reverse", dict(l=21, groups=None, h0=False), True, True,
     dict(tile=8, fwd_chunks=2, fwd_kernel="seq")),
    ("seqt-fwd-chunks", dict(l=37, groups=2, n=5), True, False,
     dict(tile=4, fwd_chunks=3, bwd_chunks=2, fwd_kernel="seqt", bd_fwd=2)),
    ("seqt-fwd-reverse-one-chunk", dict(l=21, groups=None), True, True,
     dict(tile=8, fwd_chunks=1, fwd_kernel="seqt")),
    ("seq-bwd-chunks", dict(l=37, groups=2, n=5), True, False,
     dict(tile=4, fwd_chunks=3, fwd_kernel="seqt", bwd_kernel="seq", bd_fwd=2)),
    ("seq-bwd-reverse-one-chunk", dict(l=21, groups=1), True, True,
     dict(tile=4, fwd_chunks=2, fwd_kernel="seqt", bwd_kernel="seq", programs_bwd=1)),
    ("seq-bwd-no-options", dict(l=19, groups=None, z=False, D=False, delta_bias=False, h0=False), False, False,
     dict(tile=8, fwd_kernel="seqt", bwd_kernel="seq")),
    ("seq-bwd-blocks-per-program", dict(d=6, l=23, groups=2), True, True,  # 3 blocks a group in 2 splits, 1 masked
     dict(tile=4, fwd_kernel="seqt", bwd_kernel="seq", bd_bwd=1, bwd_splits=2, programs_bwd=8)),
    ("blocked-chunks", dict(l=37, groups=2), True, False, dict(blocked=True, chunk=8, bd=2, bd_bwd=2)),
    ("blocked-reverse-one-chunk", dict(l=21, groups=None), True, True, dict(blocked=True, chunk=32)),
    ("blocked-state-len-capped", dict(l=37, groups=2), True, True,  # the backward's chunk and register cap
     dict(blocked=True, chunk=16, state_len=8, maxnreg_bwd=168)),
]


@pytest.mark.parametrize("name,over,softplus,reverse,tuning", CASES, ids=[c[0] for c in CASES])
def test_interpreted_matches_reference(chunk, name, over, softplus, reverse, tuning):
    """Outputs, final state and every gradient (dh0 included) of fp32 inputs against the float64 reference."""
    kw = dict(b=2, d=4, n=3, seed=len(name))
    kw.update(over)
    x = make_inputs(dtype=torch.float32, **kw)
    got = run_with_grads(triton_fn(chunk.selective_scan_triton, tuning, delta_softplus=softplus, reverse=reverse), x)
    want = run_with_grads(ref_fn(delta_softplus=softplus, reverse=reverse), detached(x, torch.float64))
    assert got["y"].dtype == torch.float32 and got["final_state"].dtype == torch.float32
    assert_close(got, want, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interpreted_low_precision(chunk, dtype):
    """bf16/fp16 u, delta, B, C, z (fp32 A, D, bias): y in the input dtype, gradients in each input's dtype,
    close to the fp32 reference on the same (rounded) inputs."""
    x = make_inputs(b=1, d=4, n=4, l=19, groups=2, dtype=dtype, seed=3)
    for k in ("A", "D", "delta_bias", "initial_state"):
        x[k] = x[k].detach().float().requires_grad_()
    got = run_with_grads(triton_fn(chunk.selective_scan_triton, dict(tile=4, fwd_chunks=2, bwd_chunks=2),
                                   delta_softplus=True), x)
    assert got["y"].dtype == dtype and got["du"].dtype == dtype and got["dA"].dtype == torch.float32
    want = run_with_grads(ref_fn(delta_softplus=True), detached(x, torch.float64))
    assert_close(got, want, rtol=2e-2 if dtype == torch.bfloat16 else 5e-3)


def one_output_grads(scan, x):
    """For a cotangent on y alone (no dht) and on the final state alone (no dy): ``scan``'s grads and the float64
    reference's, absent ones as zeros."""
    out = []
    for use in ("y", "state"):
        grads = []
        for fn, inp in ((scan, detached(x)), (ref_fn(delta_softplus=True), detached(x, torch.float64))):
            y, h = fn(**inp)
            loss = y.sum() if use == "y" else (h * torch.arange(h.numel()).view_as(h)).sum()
            gs = torch.autograd.grad(loss, list(inp.values()), allow_unused=True)
            grads.append({k: torch.zeros_like(v) if gr is None else gr for (k, v), gr in zip(inp.items(), gs)})
        out.append(grads)
    return out


def test_interpreted_y_only_and_state_only(chunk):
    """Cotangent on y alone (no dht) and on the final state alone (no dy) both give the reference's grads."""
    x = make_inputs(b=1, d=4, n=2, l=13, groups=1, dtype=torch.float32, seed=5)
    tuning = dict(tile=4, fwd_chunks=2, bwd_chunks=2)
    for got, want in one_output_grads(triton_fn(chunk.selective_scan_triton, tuning, delta_softplus=True), x):
        assert_close(got, want, rtol=2e-5)


@pytest.mark.parametrize("deterministic", [False, True])
def test_interpreted_default_op_y_only_and_state_only(small_chunks, deterministic):
    """The custom op's backward with one output unused (its cotangent arrives as None, not as zeros: the saved
    states' never materialise), blocked pair and deterministic kernels: the reference's grads."""
    x = make_inputs(b=1, d=4, n=2, l=13, groups=1, dtype=torch.float32, seed=6)
    with deterministic_mode() if deterministic else contextlib.nullcontext():
        pairs = one_output_grads(triton_fn(small_chunks.selective_scan_triton, delta_softplus=True), x)
    for got, want in pairs:
        assert_close(got, want, rtol=2e-5)


def test_interpreted_no_grad_returns_y_only(chunk):
    x = {k: v.detach().float() for k, v in make_inputs(b=1, d=4, n=2, l=9, seed=2).items()}
    y = chunk.selective_scan_triton(**x, delta_softplus=True)
    want = selective_scan_ref(**x, delta_softplus=True)
    assert isinstance(y, torch.Tensor)
    assert (y - want).abs().max() < 1e-5 * want.abs().max()


@pytest.mark.parametrize("pieces", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_interpreted_default_op_is_blocked(small_chunks, monkeypatch, reverse, pieces):
    """The default path (custom ops) runs the blocked pair: several 4-position chunks (or 8-position forward
    chunks saving the state every 2 positions, the backward's chunk), a ragged end, groups, initial state,
    final-state cotangent; output, final state and every gradient against the float64 reference. The tile-state
    kernels are not called."""
    chunk = small_chunks
    if pieces:
        monkeypatch.setattr(chunk, "GRAD_CHUNK", 8)
        monkeypatch.setattr(chunk, "GRAD_STATE_LENS", ((0, 2),))
    monkeypatch.setattr(chunk, "_fwd", None)
    monkeypatch.setattr(chunk, "_bwd", None)
    x = make_inputs(b=2, d=4, n=3, l=19, groups=2, dtype=torch.float32, seed=12)
    got = run_with_grads(triton_fn(chunk.selective_scan_triton, delta_softplus=True, reverse=reverse), x)
    want = run_with_grads(ref_fn(delta_softplus=True, reverse=reverse), detached(x, torch.float64))
    assert_close(got, want, rtol=2e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_interpreted_minus_inf_delta_rows_are_identity_steps(small_chunks, reverse):
    """Rows with delta = -inf under softplus, as BiMamba pads a length to a multiple of 16 (u, B, C, z there are
    whatever the conv and projections made), with no cotangent on their outputs, through the default op (the
    blocked pair, several chunks): y, the final state and every gradient of the real positions are those of the
    unpadded call; the pad's own gradients are exactly 0 (softplus(-inf) = 0 and its derivative 0, never NaN),
    in both scan directions."""
    l, pad = 19, 13  # 32 rows: aligned, while the unpadded call takes the kernels' own zero pad to 32
    x = make_inputs(b=2, d=4, n=3, l=l + pad, groups=2, dtype=torch.float32, seed=29)
    gen = torch.Generator().manual_seed(30)
    dy = torch.randn(2, 4, l + pad, generator=gen)
    dh = torch.randn(2, 4, 3, generator=gen)
    with torch.no_grad():
        x["delta"][..., l:] = float("-inf")
        dy[..., l:] = 0.0
    per_position = ("u", "delta", "B", "C", "z")
    real = {k: v.detach()[..., :l].clone().requires_grad_() if k in per_position else v for k, v in x.items()}
    fn = triton_fn(small_chunks.selective_scan_triton, delta_softplus=True, reverse=reverse)
    out = []
    for inp, cot in ((x, dy), (real, dy[..., :l])):
        y, h = fn(**inp)
        grads = torch.autograd.grad((y * cot).sum() + (h * dh).sum(), list(inp.values()))
        out.append({"y": y[..., :l], "final_state": h, **{f"d{k}": gr for k, gr in zip(inp, grads)}})
    for k in per_position:
        pad_grad = out[0][f"d{k}"][..., l:]
        assert torch.equal(pad_grad, torch.zeros_like(pad_grad)), k
        out[0][f"d{k}"] = out[0][f"d{k}"][..., :l]
    assert_close(out[0], out[1], rtol=2e-5)


def test_interpreted_deterministic_mode_runs_tile_kernels(small_chunks, monkeypatch):
    """In deterministic mode the custom ops run this file's kernels (no atomics): the blocked pair is not
    called, and the result is the reference's."""
    chunk = small_chunks
    monkeypatch.setattr(chunk, "_blocked_fwd", None)
    monkeypatch.setattr(chunk, "_blocked_bwd", None)
    x = make_inputs(b=1, d=4, n=3, l=21, groups=1, dtype=torch.float32, seed=13)
    with deterministic_mode():
        got = run_with_grads(triton_fn(chunk.selective_scan_triton, delta_softplus=True), x)
    want = run_with_grads(ref_fn(delta_softplus=True), detached(x, torch.float64))
    assert_close(got, want, rtol=2e-5)


@pytest.mark.parametrize("channel_last", [False, True])
def test_interpreted_no_grad_kernel_choice(small_chunks, monkeypatch, channel_last):
    """Without autograd, channel-last delta (the mixer's layout) runs this file's sequential forward (it reads
    that layout in place), l-contiguous delta the blocked forward; both give the reference's y."""
    chunk = small_chunks
    monkeypatch.setattr(chunk, "_fwd" if not channel_last else "_blocked_fwd", None)
    x = {k: v.detach() for k, v in make_inputs(b=1, d=4, n=3, l=70, groups=1, dtype=torch.float32, seed=14).items()}
    if channel_last:
        for k in ("delta", "z"):
            x[k] = x[k].transpose(1, 2).contiguous().transpose(1, 2)
    y = chunk.selective_scan_triton(**x, delta_softplus=True)
    want = selective_scan_ref(**{k: v.double() for k, v in x.items()}, delta_softplus=True)
    assert (y.double() - want).abs().max() < 1e-5 * want.abs().max()


def test_float64_on_auto_goes_to_reference():
    """backend='auto' never sends float64 to Triton (CPU here: the reference either way); 'triton' on CPU
    tensors is an error naming why."""
    x = {k: v.detach() for k, v in make_inputs(l=5).items()}
    assert torch.equal(selective_scan(**x), selective_scan_ref(**x))
    with pytest.raises(RuntimeError, match="not CUDA"):
        selective_scan(**x, backend="triton")


# ---------------------------------------------------------------------------------------------- GPU



def _cuda_inputs(b, d, n, l, groups=1, dtype=torch.float32, seed=0):
    x = make_inputs(b=b, d=d, n=n, l=l, groups=groups, dtype=torch.float32, seed=seed)
    x = {k: v.detach().cuda() for k, v in x.items()}
    for k in ("u", "delta", "B", "C", "z"):
        x[k] = x[k].to(dtype)
    return {k: v.requires_grad_() for k, v in x.items()}


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape,groups", [((2, 64, 16, 3000), 1), ((1, 96, 8, 70000), 3), ((3, 32, 32, 129), None),
                                          ((2, 1024, 16, 3000), 2)])  # 2048 rows: two channels a backward program
def test_gpu_fp32_matches_reference(shape, groups, reverse):
    x = _cuda_inputs(*shape, groups=groups, seed=sum(shape))
    got = outputs_and_grads(public_fn(delta_softplus=True, reverse=reverse), x)
    want = outputs_and_grads(ref_fn(delta_softplus=True, reverse=reverse), detached(x, torch.float64))
    assert_close(got, want, rtol=1e-4)


@pytest.mark.gpu
@cuda
def test_gpu_bf16_realistic_shape():
    x = _cuda_inputs(8, 1536, 16, 2048, dtype=torch.bfloat16, seed=1)
    got = outputs_and_grads(public_fn(delta_softplus=True), x)
    want = outputs_and_grads(ref_fn(delta_softplus=True), detached(x, torch.float64))
    assert_close(got, want, rtol=2e-2)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("d", [1280, 256])
def test_gpu_bf16_one_wave_of_rows(d, reverse):
    """Rows that one wave of backward programs holds: 1280 (256-position programs, 8 positions a thread, registers
    capped, the backward-running scan by gather) and 256 (1024-position programs on four warps), in both
    directions, and a ragged end: every gradient."""
    x = _cuda_inputs(1, d, 16, 4000, dtype=torch.bfloat16, seed=5)
    got = outputs_and_grads(public_fn(delta_softplus=True, reverse=reverse), x)
    want = outputs_and_grads(ref_fn(delta_softplus=True, reverse=reverse), detached(x, torch.float64))
    assert_close(got, want, rtol=2e-2)


@pytest.mark.gpu
@cuda
def test_gpu_deterministic_backward():
    """torch.use_deterministic_algorithms(True): two runs give bitwise equal outputs and gradients."""
    x = _cuda_inputs(2, 256, 16, 8192, groups=2, dtype=torch.bfloat16, seed=4)
    with deterministic_mode():
        a = outputs_and_grads(public_fn(delta_softplus=True), x)
        b = outputs_and_grads(public_fn(delta_softplus=True), detached(x))
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.gpu
@cuda
def test_gpu_default_close_to_deterministic_mode():
    """The default (blocked, dB/dC by atomics) and deterministic mode (tile kernels) agree: fp32, groups,
    initial state, every gradient within 1e-5 (relative L2)."""
    x = _cuda_inputs(2, 256, 16, 8192, groups=2, seed=5)
    a = outputs_and_grads(public_fn(delta_softplus=True), x)
    with deterministic_mode():
        b = outputs_and_grads(public_fn(delta_softplus=True), detached(x))
    assert_close(a, b, rtol=1e-5)


@pytest.mark.gpu
@cuda
def test_gpu_long_bf16_backward_finite_and_chunked_state():
    """1M tokens: fwd+bwd finite in bf16; the scan in two halves carrying the state equals one shot."""
    b, d, n, l = 1, 256, 16, 1 << 20
    x = _cuda_inputs(b, d, n, l, dtype=torch.bfloat16, seed=6)
    out = outputs_and_grads(public_fn(delta_softplus=True), x)
    assert all(torch.isfinite(v).all() for v in out.values())
    with torch.no_grad():
        xs = {k: v.detach() for k, v in x.items()}
        y, h = selective_scan(**xs, delta_softplus=True, return_final_state=True)
        half = {k: (v[..., : l // 2] if k in ("u", "delta", "z", "B", "C") else v) for k, v in xs.items()}
        rest = {k: (v[..., l // 2:] if k in ("u", "delta", "z", "B", "C") else v) for k, v in xs.items()}
        y1, h1 = selective_scan(**half, delta_softplus=True, return_final_state=True)
        y2, h2 = selective_scan(**{**rest, "initial_state": h1}, delta_softplus=True, return_final_state=True)
        assert (h2 - h).abs().max() <= 1e-4 * h.abs().max()
        assert (torch.cat([y1, y2], -1).float() - y.float()).abs().max() <= 2e-2 * y.float().abs().max()


@pytest.mark.gpu
@cuda
def test_gpu_64bit_offsets_4m_tokens():
    """b1 d1536 l 2^22 (6.4e9 elements per tensor, past 2^32 bytes): the last 2^15 positions match the
    reference started from the Triton state just before them."""
    b, d, n, l, w = 1, 1536, 16, 1 << 22, 1 << 15
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    x = dict(u=r(b, d, l), delta=r(b, d, l), A=-torch.rand(d, n, device="cuda") - 0.1, B=r(b, n, l), C=r(b, n, l),
             D=torch.ones(d, device="cuda"), z=r(b, d, l), delta_bias=torch.full((d,), -3.0, device="cuda"))
    with torch.no_grad():
        y, h = selective_scan(**x, delta_softplus=True, return_final_state=True)
        head = {k: (v[..., :-w] if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
        _, h_before = selective_scan(**head, delta_softplus=True, return_final_state=True)
        del head
        tail = {k: (v[..., -w:] if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
        y_ref, h_ref = selective_scan_ref(**tail, delta_softplus=True, return_final_state=True,
                                          initial_state=h_before)
        assert (h - h_ref).abs().max() <= 1e-4 * h_ref.abs().max()
        err = (y[..., -w:].float() - y_ref.float()).abs().max()
        assert err <= 1e-2 * y_ref.float().abs().max(), err
        # the start of the sequence too (offsets that fit in 32 bits)
        assert torch.isfinite(y[..., :w].float()).all()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape,groups,bd", [((2, 64, 16, 3000), 1, None), ((1, 96, 8, 70000), 3, 32)])
def test_gpu_state_first_kernel_fp32(shape, groups, bd, reverse):
    """The state-first sequential forward ("seqt": tile states in (n, d) order, read back by the backward;
    with the sequential backward at the second shape): fp32 vs the float64 reference, several chunks, initial
    state, every gradient."""
    b, d, n, l = shape
    x = _cuda_inputs(b, d, n, l, groups=groups, seed=17)
    tuning = dict(fwd_kernel="seqt", **({"bd_fwd": bd} if bd else {}))
    if bd:  # the sequential backward as well
        tuning["bwd_kernel"] = "seq"
    got = outputs_and_grads(triton_fn(selective_scan_triton_compiled(), tuning, delta_softplus=True,
                                        reverse=reverse), x)
    want = outputs_and_grads(ref_fn(delta_softplus=True, reverse=reverse), detached(x, torch.float64))
    assert_close(got, want, rtol=1e-4)


@pytest.mark.gpu
@cuda
def test_gpu_state_first_kernel_bf16_channel_last():
    """bf16 b8 d1536 l2048 in the mixer's layout (channel-last delta/z): "seqt" y and final state within 1e-2 of
    the fp32 reference; y comes back channel-last."""
    x = {k: v.detach() for k, v in _cuda_inputs(8, 1536, 16, 2048, dtype=torch.bfloat16, seed=19).items()}
    for k in ("delta", "z"):
        x[k] = x[k].transpose(1, 2).contiguous().transpose(1, 2)
    y, h = selective_scan_triton_compiled()(**x, delta_softplus=True, return_final_state=True,
                                            _tuning=dict(fwd_kernel="seqt"))
    y_ref, h_ref = selective_scan_ref(**{k: v.float() for k, v in x.items()}, delta_softplus=True,
                                      return_final_state=True)
    assert y.stride(1) == 1
    assert (y.float() - y_ref).norm() <= 1e-2 * y_ref.norm()
    assert (h - h_ref).norm() <= 1e-3 * h_ref.norm()


def selective_scan_triton_compiled():
    from seqmamba.kernels.selective_scan.chunk import selective_scan_triton
    return selective_scan_triton


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("module", ["mamba", "mamba_rev", "bimamba"])
def test_gpu_modules_auto_matches_ref(module):
    from seqmamba.bimamba import BiMamba
    from seqmamba.mamba import Mamba
    torch.manual_seed(0)
    make = {"mamba": lambda be: Mamba(64, backend=be), "mamba_rev": lambda be: Mamba(64, reverse=True, backend=be),
            "bimamba": lambda be: BiMamba(64, backend=be)}[module]
    try:
        m_auto = make("auto").cuda()
    except TypeError:
        pytest.skip(f"{module} takes no backend argument")
    m_ref = make("ref").cuda()
    m_ref.load_state_dict(m_auto.state_dict())
    x = torch.randn(2, 777, 64, device="cuda")
    outs = [module_outputs_and_grads(m, x) for m in (m_auto, m_ref)]
    assert_close(outs[0], outs[1], rtol=1e-4)


SEQ = [0] * 5 + [1] * 9 + [2] * 1 + [3] * 8  # lengths 5, 9, 1, 8 packed in a row of 23


def test_packed_reference_equals_separate_sequences():
    """seq_idx: the reference on a packed row equals the naive loop run per sequence (initial_state into the
    first sequence in scan order, final state from the last), both directions."""
    from tests.kernels.test_selective_scan import naive_scan
    bounds = [(0, 5), (5, 14), (14, 15), (15, 23)]
    for reverse in (False, True):
        x = {k: v.detach() for k, v in make_inputs(b=1, d=3, n=2, l=23, groups=1, seed=4).items()}
        y, h = selective_scan(**x, delta_softplus=True, return_final_state=True, reverse=reverse,
                              seq_idx=torch.tensor([SEQ]), chunk_size=4)
        ys = {}
        for i, (a, e) in enumerate(bounds[::-1] if reverse else bounds):
            part = {k: (v[..., a:e] if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
            if i:
                part["initial_state"] = None
            ys[a], h_last = naive_scan(**part, delta_softplus=True, reverse=reverse)
        assert torch.allclose(y, torch.cat([ys[a] for a, _ in bounds], -1), rtol=1e-12, atol=1e-12)
        assert torch.allclose(h, h_last, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("fwd_kernel", ["scan", "seq", "seqt", "blocked"])
def test_interpreted_packed_matches_reference(chunk, reverse, fwd_kernel):
    """Packed rows (a different packing per batch row) through the Triton kernels, all gradients."""
    x = make_inputs(b=2, d=2, n=2, l=23, groups=1, dtype=torch.float32, seed=9)
    seq_idx = torch.tensor([SEQ, [0] * 12 + [1] * 11])
    tuning = (dict(blocked=True, chunk=4) if fwd_kernel == "blocked"
              else dict(tile=4, fwd_chunks=3, bwd_chunks=2, fwd_kernel=fwd_kernel))
    got = run_with_grads(triton_fn(chunk.selective_scan_triton, tuning, delta_softplus=True, reverse=reverse,
                                   seq_idx=seq_idx), x)
    want = run_with_grads(ref_fn(delta_softplus=True, reverse=reverse, seq_idx=seq_idx),
                          detached(x, torch.float64))
    assert_close(got, want, rtol=2e-5)


@pytest.mark.parametrize("blocked", [True, False])
def test_interpreted_custom_op_opcheck(chunk, blocked):
    """The torch.library registration (fake tensors, autograd, schema) passes torch's own checks, with either
    kernel family."""
    x = make_inputs(b=1, d=2, n=2, l=5, groups=1, dtype=torch.float32, seed=8)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], x["initial_state"],
            True, False, True, None, blocked)
    torch.library.opcheck(chunk._scan_fwd_op, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("blocked", [True, False])
@pytest.mark.parametrize("channel_last", [False, True])
def test_interpreted_custom_op_opcheck_layouts(small_chunks, channel_last, blocked, monkeypatch):
    """Fake and real agree on every output's layout, forward and backward op, in the mixer's layout too
    (channel-last delta/z; this file's kernels: state-first forward, sequential backward, channel-last
    y/du/ddelta/dz; the blocked pair: y, du, ddelta, dz in rows of padded_len(l))."""
    chunk = small_chunks
    # states every 2 positions of the 4-position chunks (the bucket of 1-2 rows; 4 from 3 rows up)
    monkeypatch.setattr(chunk, "GRAD_STATE_LENS", ((3, 4), (0, 2)))
    x = {k: v.detach() for k, v in make_inputs(b=1, d=2, n=2, l=70, groups=1, dtype=torch.float32, seed=8).items()}
    if channel_last:
        for k in ("delta", "z"):
            x[k] = x[k].transpose(1, 2).contiguous().transpose(1, 2)
    order = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    fwd_args = (*(x[k] for k in order), True, False, True, None, blocked)
    torch.library.opcheck(chunk._scan_fwd_op, fwd_args, test_utils=("test_schema", "test_faketensor"))
    y, h, ts = chunk._scan_fwd_op(*fwd_args)
    bwd_args = (*(x[k] for k in order), ts, torch.randn_like(y), torch.randn_like(h), True, False, None, blocked)
    torch.library.opcheck(chunk._scan_bwd_op, bwd_args, test_utils=("test_schema", "test_faketensor"))
    # opcheck compares shapes and dtypes; the strides must agree as well (compiled graphs trust the fake's)
    from torch._subclasses.fake_tensor import FakeTensorMode
    for op, args in ((chunk._scan_fwd_op, fwd_args), (chunk._scan_bwd_op, bwd_args)):
        real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        assert [t.stride() for t in real] == [t.stride() for t in fake], (op, [t.stride() for t in real])
    if blocked:
        assert ts.shape[1] == 40  # chunk states: cdiv(80, 2), 70 positions in rows padded to 80
        # y, du, ddelta: l-contiguous rows of aligned storage
        assert all(t.stride() == (2 * 80, 80, 1) for t in (y, real[0], real[1]))
    elif channel_last:
        assert y.stride(1) == 1 and real[0].stride(1) == 1 and real[1].stride(1) == 1  # y, du, ddelta


@pytest.mark.gpu
@cuda
def test_gpu_torch_compile_no_graph_break():
    """The ops compile as single nodes: a function of causal_conv1d + selective_scan compiles with
    fullgraph=True and matches eager, forward and backward; a whole Mamba layer has no graph break that
    names them."""
    from seqmamba.kernels import causal_conv1d
    from seqmamba.mamba import Mamba
    x = _cuda_inputs(2, 64, 16, 1000, dtype=torch.bfloat16, seed=3)
    w = torch.randn(64, 4, device="cuda", requires_grad=True)

    def f(u, delta, A, B, C, D, z, delta_bias, initial_state):
        u = causal_conv1d(u, w, None, activation="silu")
        y, h = selective_scan(u, delta, A, B, C, D, z, delta_bias, True, initial_state, True)
        return y.float().square().sum() + h.sum()

    eager = f(**x)
    ge = torch.autograd.grad(eager, list(x.values()))
    compiled = torch.compile(f, fullgraph=True)
    xc = detached(x)
    out = compiled(**xc)
    gc = torch.autograd.grad(out, list(xc.values()))
    assert torch.allclose(out, eager, rtol=1e-3)
    for a, b in zip(gc, ge):
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=1e-2 * b.float().abs().max().item())

    m = Mamba(64).cuda()
    xm = torch.randn(2, 300, 64, device="cuda")
    explain = torch._dynamo.explain(m)(xm)
    reasons = [str(r.reason) for r in explain.break_reasons]
    ours = [r for r in reasons if any(k in r for k in ("selective", "causal_conv", "seqmamba::", "triton"))]
    assert not ours, reasons
    ym = torch.compile(m)(xm)
    assert torch.allclose(ym, m(xm), rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("reverse", [False, True])
def test_gpu_packed_matches_reference(reverse):
    """Four sequences of uneven lengths packed in each of two rows, at a length where both forward kernels
    run several chunks."""
    l = 50000
    x = _cuda_inputs(2, 64, 16, l, seed=11)
    cuts = torch.tensor([[0, 7, 20000, 20001, l], [0, 30000, 30100, 49999, l]])
    seq_idx = torch.stack([torch.repeat_interleave(torch.arange(4), (c[1:] - c[:-1])) for c in cuts]).cuda()
    got = outputs_and_grads(public_fn(delta_softplus=True, reverse=reverse, seq_idx=seq_idx), x)
    want = outputs_and_grads(ref_fn(delta_softplus=True, reverse=reverse, seq_idx=seq_idx),
                               detached(x, torch.float64))
    assert_close(got, want, rtol=1e-4)
