"""Triton causal_conv1d against the reference: interpreted on CPU (tiny shapes, small blocks so tiles and
their edges are crossed), and on a GPU at realistic shapes (``-m gpu``)."""
from __future__ import annotations

import pytest
import torch

from seqmamba.kernels.causal_conv1d import causal_conv1d, causal_conv1d_ref
from tests.kernels.interpret import load_interpreted
from tests.utils import outputs_and_grads

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def conv():
    mod = load_interpreted("seqmamba.kernels.causal_conv1d_triton")
    mod.BLOCK_D, mod.BLOCK_T = 2, 4
    mod.BWD_PAD_MIN = 1  # the backward on padded rows at these sizes too (test_interpreted_row_layout: below it)
    return mod


def _inputs(b, d, l, w, bias, h0, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = dict(x=r(b, d, l), weight=r(d, 1, w), bias=r(d) if bias else None, initial_state=r(b, d, w - 1) if h0 else None)
    return {k: None if v is None else v.to(device=device, dtype=dtype if k == "x" else torch.float32)
            .requires_grad_() for k, v in x.items()}


def _run(fn, x, reverse, activation, seed=1):
    return outputs_and_grads(lambda **k: fn(**k, return_final_state=True, activation=activation, reverse=reverse),
                             x, seed)


def _reference(x, reverse, activation):
    """The float64 reference's outputs and gradients on the same inputs (_run)."""
    return _run(causal_conv1d_ref, {k: None if v is None else v.detach().double().requires_grad_()
                                    for k, v in x.items()}, reverse, activation)


def _compare(got, want, rtol):
    bad = []
    for k in want:
        g, w = got[k].double(), want[k].double()
        assert g.shape == w.shape, (k, g.shape, w.shape)
        err = (g - w).abs().max().item() if w.numel() else 0.0
        rel = err / max(w.abs().max().item() if w.numel() else 0.0, 1e-12)
        if not torch.isfinite(g).all() or rel > rtol:
            bad.append(f"{k}: rel {rel:.3g}")
    assert not bad, bad


CASES = [  # (w, l, bias, h0, activation, reverse)
    (2, 9, True, True, "silu", False), (3, 2, True, True, None, True), (4, 11, False, True, "silu", True),
    (5, 7, True, False, None, False), (8, 13, True, True, "silu", True), (8, 3, False, True, "silu", False),
    (1, 6, True, False, "silu", True),
]


@pytest.mark.parametrize("w,l,bias,h0,activation,reverse", CASES)
def test_interpreted_matches_reference(conv, w, l, bias, h0, activation, reverse):
    x = _inputs(2, 3, l, w, bias, h0, torch.float32, seed=w * 100 + l)
    got = _run(conv.causal_conv1d_triton, x, reverse, activation)
    want = _reference(x, reverse, activation)
    _compare(got, want, 1e-5)


def test_interpreted_bf16(conv):
    x = _inputs(1, 4, 10, 4, True, True, torch.bfloat16, seed=3)
    got = _run(conv.causal_conv1d_triton, x, False, "silu")
    assert got["y"].dtype == torch.bfloat16 and got["dx"].dtype == torch.bfloat16
    want = _reference(x, False, "silu")
    _compare(got, want, 2e-2)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("w", [2, 4, 8])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_reference(w, reverse, dtype):
    x = _inputs(4, 1536, 4099, w, True, True, dtype, device="cuda", seed=w)
    got = _run(lambda **k: causal_conv1d(**k, backend="triton"), x, reverse, "silu")
    want = _reference(x, reverse, "silu")
    _compare(got, want, 1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("reverse", [True, False])
def test_interpreted_custom_op_opcheck(conv, reverse):
    """Schema, autograd registration and fake tensors (same strides as the real outputs: padded rows forward,
    unpadded ones for an initial state in reverse)."""
    x = _inputs(1, 2, 5, 3, True, True, torch.float32, seed=4)
    args = (x["x"], x["weight"].squeeze(1).detach().requires_grad_(), x["bias"], x["initial_state"], True, reverse)
    torch.library.opcheck(conv._conv_fwd_op, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("reverse,h0", [(False, True), (True, False), (True, True)])
def test_interpreted_row_layout(conv, reverse, h0, monkeypatch):
    """Lengths that are not a multiple of 16 run on rows padded to one (y and dx are views of them, the pad of
    the padded input zeros), except an initial state in reverse (unpadded rows); aligned lengths stay
    contiguous. The backward pads from BWD_PAD_MIN elements (1 in this file; below it dx is contiguous)."""
    for l, row in ((21, 32), (32, 32)):
        x = _inputs(1, 3, l, 4, True, h0, torch.float32, seed=l)
        got = _run(conv.causal_conv1d_triton, x, reverse, "silu")
        want = _reference(x, reverse, "silu")
        _compare(got, want, 1e-5)
        expect = l if (reverse and h0) else row
        y = conv.causal_conv1d_triton(x["x"], x["weight"], x["bias"], x["initial_state"], activation="silu",
                                      reverse=reverse)
        dx, = torch.autograd.grad(y.sum(), x["x"])  # without the final state, whose gradient would add to it
        assert y.stride() == dx.stride() == (3 * expect, expect, 1), (l, y.stride(), dx.stride())
    monkeypatch.setattr(conv, "BWD_PAD_MIN", x["x"].numel() + 1)
    x = _inputs(1, 3, 21, 4, True, h0, torch.float32, seed=5)
    got = _run(conv.causal_conv1d_triton, x, reverse, "silu")
    want = _reference(x, reverse, "silu")
    _compare(got, want, 1e-5)
    y = conv.causal_conv1d_triton(x["x"], x["weight"], x["bias"], x["initial_state"], activation="silu",
                                  reverse=reverse)
    assert torch.autograd.grad(y.sum(), x["x"])[0].is_contiguous()
