"""Triton gated RMSNorm against the reference: interpreted on CPU (tiny shapes, rows that do not fill a block,
several backward programs), and on a GPU at the Mamba-2 mixer's shape (``-m gpu``)."""
from __future__ import annotations

import pytest
import torch

from seqmamba.kernels.layernorm_gated import rms_norm_gated, rms_norm_gated_ref
from tests.kernels.interpret import load_interpreted
from tests.utils import assert_all_close

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def norm():
    mod = load_interpreted("seqmamba.kernels.layernorm_gated_triton")
    mod.BWD_PROGRAMS = 3  # several backward programs, each over several row blocks, and a ragged last one
    return mod


def _inputs(shape, dtype, z_slice, device="cpu", seed=0):
    """x, weight, z (a column slice of a wider tensor when z_slice: a row stride that is not d) and dy."""
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = r(*shape).to(device=device, dtype=dtype).requires_grad_()
    w = (1.0 + 0.3 * r(d)).to(device=device, dtype=torch.float32).requires_grad_()
    wide = r(*shape[:-1], d + 5 if z_slice else d).to(device=device, dtype=dtype)
    o = 2 if z_slice else 0
    z = wide[..., o:o + d].detach().requires_grad_()  # a leaf with the slice's strides
    assert z.stride(-2) == (d + 5 if z_slice else d)
    return x, w, z, r(*shape).to(device=device, dtype=dtype)


def _grads(fn, x, w, z, dy, **kw):
    leaves = [t for t in (x, w, z) if t is not None]
    y = fn(x, w, z, **kw)
    grads = torch.autograd.grad((y.double() * dy.double()).sum(), leaves)
    return {"y": y, **{n: gr for n, gr in zip(("dx", "dweight", "dz"), grads)}}


def _reference(x, w, z, dy, **kw):
    as64 = lambda t: t.detach().double().requires_grad_() if t is not None else None  # noqa: E731
    return _grads(rms_norm_gated_ref, as64(x), as64(w), as64(z), dy, **kw)


@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("with_z,before", [(False, False), (True, False), (True, True)])
def test_interpreted_matches_reference(norm, group_size, with_z, before):
    """fp32, rows not a multiple of the row block, z a strided slice: y and every gradient."""
    x, w, z, dy = _inputs((3, 7, 24), torch.float32, z_slice=True, seed=group_size or 1)
    z = z if with_z else None
    kw = dict(eps=1e-5, group_size=group_size, norm_before_gate=before)
    got = _grads(norm.rms_norm_gated_triton, x, w, z, dy, **kw)
    want = _reference(x, w, z, dy, **kw)
    assert_all_close({k: (got[k], want[k]) for k in want}, rtol=1e-5)


def test_interpreted_group_not_a_power_of_two_and_bf16(norm):
    """Groups of 12 channels (a padded block), bf16 x/z/dy: outputs and gradients in the inputs' dtypes."""
    x, w, z, dy = _inputs((2, 5, 36), torch.bfloat16, z_slice=False, seed=4)
    kw = dict(eps=1e-5, group_size=12, norm_before_gate=False)
    got = _grads(norm.rms_norm_gated_triton, x, w, z, dy, **kw)
    assert got["y"].dtype == got["dx"].dtype == got["dz"].dtype == torch.bfloat16
    assert got["dweight"].dtype == torch.float32
    want = _reference(x, w, z, dy, **kw)
    assert_all_close({k: (got[k], want[k]) for k in want}, rtol=2e-2)


def test_float64_and_cpu_take_the_reference():
    x, w, z, _ = _inputs((2, 3, 16), torch.float64, z_slice=False)
    assert torch.equal(rms_norm_gated(x, w.double(), z), rms_norm_gated_ref(x, w.double(), z))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("shape,dtype,group_size,before,rtol", [
    ((2, 3000, 1536), torch.bfloat16, None, False, 2e-2), ((2, 3000, 1536), torch.bfloat16, 192, True, 2e-2),
    ((2, 3000, 1536), torch.bfloat16, 192, False, 2e-2), ((4, 1000, 256), torch.float32, 64, False, 1e-5)])
def test_gpu_matches_reference(shape, dtype, group_size, before, rtol):
    """Mamba-2's shape (b2 l3000 d1536 bf16, z a slice of a (.., d + 5) in_proj-like output), one group and 8,
    both gate placements; fp32 tight."""
    x, w, z, dy = _inputs(shape, dtype, z_slice=True, device="cuda", seed=7)
    kw = dict(eps=1e-5, group_size=group_size, norm_before_gate=before)
    got = _grads(lambda *a, **k: rms_norm_gated(*a, **k, backend="triton"), x, w, z, dy, **kw)
    want = _reference(x, w, z, dy, **kw)
    assert_all_close({k: (got[k], want[k]) for k in want}, rtol=rtol)


@pytest.mark.gpu
@cuda
def test_gpu_torch_compile_fullgraph():
    """A function using rms_norm_gated compiles with fullgraph=True (the kernels are torch.library ops) and
    matches eager, forward and backward."""
    x, w, z, dy = _inputs((2, 300, 256), torch.bfloat16, z_slice=True, device="cuda", seed=5)
    f = lambda x, w, z: rms_norm_gated(x, w, z, group_size=64) * 2.0  # noqa: E731
    eager = _grads(f, x, w, z, dy)
    compiled = _grads(torch.compile(f, fullgraph=True), x, w, z, dy)
    assert_all_close({k: (compiled[k], eager[k]) for k in eager}, rtol=1e-2)
