"""selective_state_update stepped over the positions equals the selective scan (values and gradients)."""
from __future__ import annotations

import pytest
import torch

from seqmamba.kernels.selective_scan import selective_scan_ref
from seqmamba.kernels.state_update import selective_state_update, selective_state_update_ref
from tests.utils import assert_all_close

SEQ = ("u", "delta", "z", "B", "C")


def make_inputs(b=2, d=4, n=3, l=6, groups=2, z=True, D=True, delta_bias=True, dtype=torch.float64, seed=0):
    """dt ~ softplus(N(-2, 1)) (bias + softplus in the op), A negative; groups=None -> (b, n, l) B/C."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    bc = (b, n, l) if groups is None else (b, groups, n, l)
    x = dict(u=r(b, d, l), delta=r(b, d, l) - 2.0, A=-torch.exp(r(d, n) * 0.5), B=r(*bc), C=r(*bc),
             D=r(d) if D else None, z=r(b, d, l) if z else None, delta_bias=r(d) * 0.3 if delta_bias else None,
             initial_state=r(b, d, n))
    return {k: (None if v is None else v.to(dtype).requires_grad_()) for k, v in x.items()}


def stepped(initial_state, **x):
    """Run selective_state_update once per position; returns (y (b, d, l), final state)."""
    h, ys = initial_state, []
    for t in range(x["u"].shape[-1]):
        xt = {k: (v[..., t] if k in SEQ and v is not None else v) for k, v in x.items()}
        y, h = selective_state_update(h, **xt, delta_softplus=True)
        ys.append(y)
    return torch.stack(ys, dim=-1), h


def scanned(initial_state, **x):
    return selective_scan_ref(**x, initial_state=initial_state, delta_softplus=True, return_final_state=True,
                              chunk_size=4)


def run_with_grads(fn, x, seed=1):
    y, h = fn(**x)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    dh = torch.randn(h.shape, generator=g, dtype=torch.float64).to(h.dtype)
    names = [k for k, v in x.items() if v is not None]
    grads = torch.autograd.grad((y * dy).sum() + (h * dh).sum(), [x[k] for k in names])
    return {"y": y.detach(), "final_state": h.detach(), **{f"d{k}": gr for k, gr in zip(names, grads)}}


def assert_close(got: dict, want: dict, rtol: float, atol: float = 0.0):
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    assert_all_close({k: (got[k], want[k]) for k in want}, rtol, atol)


def detached(x):
    return {k: (None if v is None else v.detach().clone().requires_grad_()) for k, v in x.items()}


@pytest.mark.parametrize("groups", [None, 1, 2, 4])
@pytest.mark.parametrize("opts", [dict(), dict(z=False, D=False, delta_bias=False)], ids=["z_D_bias", "plain"])
def test_steps_equal_scan_float64_with_grads(groups, opts):
    x = make_inputs(groups=groups, seed=groups or 0, **opts)
    assert_close(run_with_grads(stepped, x), run_with_grads(scanned, detached(x)), rtol=1e-12)


def test_steps_equal_scan_fp32():
    x = make_inputs(l=20, dtype=torch.float32, seed=3)
    with torch.no_grad():
        y, h = stepped(**x)
        y_ref, h_ref = scanned(**x)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    assert_close({"y": y, "final_state": h}, {"y": y_ref, "final_state": h_ref}, rtol=1e-5)


def test_bf16_dtypes_and_functional():
    x = {k: v.detach() for k, v in make_inputs(l=1, dtype=torch.bfloat16).items()}
    x = {k: (v[..., 0] if k in SEQ else v) for k, v in x.items()}
    state = x.pop("initial_state")
    before = {k: v.clone() for k, v in x.items()}, state.clone()
    y, h = selective_state_update(state, **x, delta_softplus=True)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 4) and h.dtype == torch.float32 and h.shape == (2, 4, 3)
    assert all(torch.equal(v, before[0][k]) for k, v in x.items()) and torch.equal(state, before[1])
    y32, h32 = selective_state_update(state.float(), **{k: v.float() for k, v in x.items()}, delta_softplus=True)
    assert_close({"y": y, "state": h}, {"y": y32, "state": h32}, rtol=1e-2)


def test_dispatch(monkeypatch):
    x = {k: v.detach()[..., 0] if k in SEQ else v.detach() for k, v in make_inputs(l=1).items()}
    state = x.pop("initial_state")
    with pytest.raises(RuntimeError, match="Triton"):
        selective_state_update(state, **x, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        selective_state_update(state, **x, backend="bogus")
    monkeypatch.setenv("SEQMAMBA_BACKEND", "ref")
    y, h = selective_state_update(state, **x)
    y_ref, h_ref = selective_state_update_ref(state, **x)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)
    monkeypatch.setenv("SEQMAMBA_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SEQMAMBA_BACKEND"):
        selective_state_update(state, **x)


@pytest.mark.parametrize("name,bad", [
    ("state", torch.zeros(2, 4, 5)), ("u", torch.zeros(2, 4, 1)), ("delta", torch.zeros(2, 3)),
    ("A", torch.zeros(4)), ("B", torch.zeros(2, 3, 3)), ("C", torch.zeros(2, 4)), ("D", torch.zeros(4, 1)),
    ("z", torch.zeros(1, 4)), ("delta_bias", torch.zeros(5)),
])
def test_bad_shapes_raise_value_error_naming_argument(name, bad):
    x = {k: v.detach()[..., 0] if k in SEQ else v.detach() for k, v in make_inputs(l=1).items()}
    x["state"] = x.pop("initial_state")
    x[name] = bad.double()
    with pytest.raises(ValueError, match=rf"\b{name}\b must have shape"):
        selective_state_update(**x)
