"""The kernels' shared fp32 softplus and sigmoid against float64 torch over their whole range: interpreted on
CPU (the formulas: series truncation, range split, edge values), and on a GPU (``-m gpu``: the MUFU
approximations of exp2 and rsqrt that the compiled kernels use)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.interpret import load_interpreted

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

EDGES = [0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 0.8813736, -0.8813736, 20.0, -20.0, 87.0, -87.0, 88.8, -88.8,
         103.0, -103.0, 1e4, -1e4, 3e38, -3e38]


def _points(device):
    dense = torch.linspace(-110.0, 110.0, 400_001, dtype=torch.float64)
    # around the range split (e = sqrt(2) - 1 at |x| = ln(1 + sqrt(2)) = 0.88137...) and around 0, finely
    fine = torch.cat([0.8813736 + torch.linspace(-1e-4, 1e-4, 20_001, dtype=torch.float64),
                      -0.8813736 + torch.linspace(-1e-4, 1e-4, 20_001, dtype=torch.float64),
                      torch.linspace(-1e-3, 1e-3, 20_001, dtype=torch.float64)])
    x = torch.cat([dense, fine, torch.tensor(EDGES, dtype=torch.float64)]).to(torch.float32)
    return x.to(device)


def _check(apply, device, bound):
    """Relative error under ``bound`` * max(1, |x|) wherever the true value is a normal fp32 number (exp2 of the
    rounded fp32 product x log2(e) is off by up to |x| ulp of the argument: the growth of any fp32 exp); below
    that (the far left tails, where a GPU flushes subnormal results to zero) the result must be below the
    smallest normal."""
    x = _points(device)
    x64 = x.double().cpu()
    for name, want in (("softplus", F.softplus(x64)), ("sigmoid", torch.sigmoid(x64))):
        got = apply(name, x).double().cpu()
        assert torch.isfinite(got).all(), name
        normal = want.abs() >= torch.finfo(torch.float32).tiny
        rel = ((got - want).abs() / want.abs() / x64.abs().clamp_min(1.0))[normal]
        worst = rel.argmax()
        at = x64[normal][worst].item()
        assert rel.max() < bound, f"{name}: relative error / max(1, |x|) {rel.max():.2e} at x = {at!r}"
        assert (got[~normal].abs() < torch.finfo(torch.float32).tiny).all(), name
        assert (got >= 0).all(), name


def test_interpreted_softplus_and_sigmoid_match_float64():
    mod = load_interpreted("tests.kernels._math_kernels")
    _check(mod.apply, "cpu", 5e-7)


def test_softplus_nan_propagates_interpreted():
    mod = load_interpreted("tests.kernels._math_kernels")
    got = mod.apply("softplus", torch.tensor([float("nan"), 1.0]))
    assert torch.isnan(got[0]) and torch.isfinite(got[1])


@pytest.mark.gpu
@cuda
def test_gpu_softplus_and_sigmoid_match_float64():
    from tests.kernels import _math_kernels

    _check(_math_kernels.apply, "cuda", 1e-6)


@pytest.mark.parametrize("shape,transpose", [((2, 3, 37), False), ((2, 3, 37), True), ((1, 2, 3, 21), False)])
def test_aligned_rows_pads_with_zeros(shape, transpose):
    """The scan kernels' padded copies: the values, then zeros up to the next multiple of 16, from a contiguous,
    a channel-last (copied by torch) and a 4-d input; the pad must be zeros (a NaN there would reach the scan)."""
    common = load_interpreted("seqmamba.kernels._triton_common")
    g = torch.Generator().manual_seed(0)
    t = torch.randn(*shape, generator=g).to(torch.bfloat16)
    if transpose:
        t = t.transpose(1, 2).contiguous().transpose(1, 2)
    l = t.shape[-1]
    lp = common.padded_len(l)
    assert lp % 16 == 0 and l <= lp < l + 16 and common.padded_len(32) == 32
    # a view with unit l-stride whose rows are not l apart (e.g. z, half of the in_proj output)
    if len(shape) == 3 and not transpose:
        t = torch.cat([t, torch.randn(*shape, generator=g).to(t.dtype)], 1)[:, shape[1]:]
    out = common.aligned_rows(t, lp)
    assert out.shape == (*t.shape[:-1], lp) and out.is_contiguous()
    assert torch.equal(out[..., :l], t) and not out[..., l:].any()
    assert common.aligned_rows(out, lp) is out  # already aligned: no copy
