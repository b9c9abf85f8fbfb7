"""rms_norm_gated vs the formula written out per group in float64."""
import math

import pytest
import torch

from seqmamba.kernels.layernorm_gated import rms_norm_gated, rms_norm_gated_ref
from tests.utils import assert_all_close as assert_close

D = 16




def naive(x, weight, z, eps, group_size, norm_before_gate):
    """Each row, each group of channels: divide by the root mean square, scale, gate with z*sigmoid(z)."""
    d = x.shape[-1]
    group_size = group_size or d
    rows = x.reshape(-1, d)
    gates = z.reshape(-1, d) * torch.sigmoid(z.reshape(-1, d)) if z is not None else None
    out = []
    for i in range(rows.shape[0]):
        v = rows[i] * gates[i] if gates is not None and not norm_before_gate else rows[i]
        parts = []
        for s in range(0, d, group_size):
            block = v[s:s + group_size]
            parts.append(block / torch.sqrt((block * block).sum() / group_size + eps))
        y = torch.cat(parts) * weight
        out.append(y * gates[i] if gates is not None and norm_before_gate else y)
    return torch.stack(out).reshape(x.shape)


def make_inputs(dtype=torch.float64, seed=0, shape=(2, 3, D)):
    g = torch.Generator().manual_seed(seed)
    def rnd(*s, mean=0.0):
        return (mean + torch.randn(*s, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    return rnd(*shape), rnd(shape[-1], mean=1.0), rnd(*shape), torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("group_size", [None, D // 2, D // 4])
@pytest.mark.parametrize("with_z", [False, True])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_matches_formula(group_size, with_z, norm_before_gate):
    x, weight, z, dy = make_inputs(seed=(group_size or 0) + 2 * with_z + norm_before_gate)
    z = z if with_z else None
    leaves = [t for t in (x, weight, z) if t is not None]
    names = ["dx", "dweight", "dz"][:len(leaves)]
    y = rms_norm_gated(x, weight, z, 1e-5, group_size, norm_before_gate)
    y_n = naive(x, weight, z, 1e-5, group_size, norm_before_gate)
    grads = torch.autograd.grad((y * dy).sum(), leaves)
    grads_n = torch.autograd.grad((y_n * dy).sum(), leaves)
    pairs = {"y": (y, y_n), **{n: (a, b) for n, a, b in zip(names, grads, grads_n)}}
    assert_close(pairs, rtol=1e-10)


def test_gate_placement_matters():
    x, weight, z, _ = make_inputs(seed=5)
    a = rms_norm_gated(x, weight, z, norm_before_gate=False)
    b = rms_norm_gated(x, weight, z, norm_before_gate=True)
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_low_precision(dtype, rtol):
    x, weight, z, _ = make_inputs(dtype=dtype, seed=7)
    y = rms_norm_gated(x, weight, z, group_size=D // 4)
    assert y.dtype == dtype
    y_n = naive(*(t.detach().double() for t in (x, weight, z)), 1e-5, D // 4, False)
    assert_close({"y": (y, y_n)}, rtol=rtol)


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gradcheck(norm_before_gate):
    x, weight, z, _ = make_inputs(seed=11, shape=(2, 4))
    fn = lambda x, w, z: rms_norm_gated(x, w, z, 1e-5, 2, norm_before_gate)
    assert torch.autograd.gradcheck(fn, (x, weight, z))


def test_eps_is_used():
    x = torch.zeros(1, D, dtype=torch.float64)
    x[0, 0] = 1e-3
    y = rms_norm_gated(x, torch.ones(D, dtype=torch.float64), eps=1.0)
    assert math.isclose(y[0, 0].item(), 1e-3 / math.sqrt(1e-6 / D + 1.0), rel_tol=1e-12)


def test_bad_arguments_raise():
    x, weight, z, _ = make_inputs()
    with pytest.raises(ValueError, match="group_size"):
        rms_norm_gated(x, weight, z, group_size=5)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_gated(x, weight[:-1], z)
    with pytest.raises(ValueError, match="z"):
        rms_norm_gated(x, weight, z[..., :-1])
    with pytest.raises(RuntimeError, match="Triton"):
        rms_norm_gated(x, weight, z, backend="triton")
    assert torch.equal(rms_norm_gated(x, weight, z, backend="ref"), rms_norm_gated_ref(x, weight, z))
