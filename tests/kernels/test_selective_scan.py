"""selective_scan / selective_scan_ref against a naive float64 per-step loop, plus chunking, reverse,
strong decay, low precision, state carry-over, dispatch and validation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqmamba.kernels.selective_scan import auto_chunk_size, selective_scan, selective_scan_ref
from tests.utils import assert_all_close

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


# ---------------------------------------------------------------- helpers

def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
               initial_state=None, reverse=False):
    """Plain per-position loop, written straight from the recurrence."""
    b, d, l = u.shape
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    dt = F.softplus(dt) if delta_softplus else dt
    Bd, Cd = (X[:, None] if X.dim() == 3 else X for X in (B, C))
    Bd, Cd = (X.repeat_interleave(d // X.shape[1], dim=1) for X in (Bd, Cd))   # (b, d, n, l)
    h = initial_state if initial_state is not None else u.new_zeros(b, d, A.shape[1])
    ys = [None] * l
    for t in (reversed(range(l)) if reverse else range(l)):
        h = torch.exp(dt[..., t, None] * A) * h + (dt[..., t] * u[..., t])[..., None] * Bd[..., t]
        y = (h * Cd[..., t]).sum(-1)
        if D is not None:
            y = y + D * u[..., t]
        ys[t] = y
    y = torch.stack(ys, dim=-1)
    if z is not None:
        y = y * F.silu(z)
    return y, h


def make_inputs(b=2, d=4, n=3, l=7, groups=1, z=True, D=True, delta_bias=True, h0=True,
                dtype=torch.float64, seed=0, A_scale=1.0):
    """Realistic ranges: dt ~ softplus(N(-2, 1)), A negative. groups=None gives the 3-D (b, n, l) B/C."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    bc = (b, n, l) if groups is None else (b, groups, n, l)
    x = dict(
        u=r(b, d, l),
        delta=F.softplus(r(b, d, l) - 2.0) if not delta_bias else r(b, d, l) - 2.0,
        A=-torch.exp(r(d, n) * 0.5) * A_scale,
        B=r(*bc), C=r(*bc),
        D=r(d) if D else None,
        z=r(b, d, l) if z else None,
        delta_bias=r(d) * 0.3 if delta_bias else None,
        initial_state=r(b, d, n) if h0 else None,
    )
    return {k: (None if v is None else v.to(dtype).requires_grad_()) for k, v in x.items()}


def run_with_grads(fn, x, seed=1):
    """Call fn(**x) -> (y, h); backprop (y*dy).sum() + (h*dh).sum() with fixed random cotangents."""
    y, h = fn(**x)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    dh = torch.randn(h.shape, generator=g, dtype=torch.float64).to(h.dtype)
    grads = torch.autograd.grad((y * dy).sum() + (h * dh).sum(), [v for v in x.values() if v is not None])
    out = {"y": y.detach(), "final_state": h.detach()}
    out.update({f"d{k}": gr for k, gr in zip([k for k, v in x.items() if v is not None], grads)})
    return out


def assert_close(got: dict, want: dict, rtol: float, atol: float = 0.0):
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    assert_all_close({k: (got[k], want[k]) for k in want}, rtol, atol)


def detached(x, dtype=None):
    return {k: (None if v is None else v.detach().to(dtype or v.dtype).requires_grad_()) for k, v in x.items()}


def ref_fn(**kw):
    def fn(**x):
        return selective_scan_ref(**x, return_final_state=True, **kw)
    return fn


def naive_fn(**kw):
    def fn(**x):
        return naive_scan(**x, **kw)
    return fn


OPTIONS = {
    "plain": dict(z=False, D=False, delta_bias=False, softplus=False),
    "full": dict(z=True, D=True, delta_bias=True, softplus=True),
    "z_D": dict(z=True, D=True, delta_bias=False, softplus=False),
    "bias_softplus_noh0": dict(z=False, D=False, delta_bias=True, softplus=True, h0=False),
}


# ---------------------------------------------------------------- exactness vs the naive loop

@pytest.mark.parametrize("l,chunk", [(1, None), (7, 4), (63, 16), (100, 32), (100, 25)])
@pytest.mark.parametrize("groups", [None, 1, 2])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_ref_matches_naive_float64(l, chunk, groups, reverse, opt):
    o = dict(OPTIONS[opt])
    softplus = o.pop("softplus")
    x = make_inputs(l=l, groups=groups, seed=l + 3 * (groups or 0), **o)
    got = run_with_grads(ref_fn(delta_softplus=softplus, reverse=reverse, chunk_size=chunk), x)
    want = run_with_grads(naive_fn(delta_softplus=softplus, reverse=reverse), detached(x))
    assert_close(got, want, rtol=1e-10)


def test_public_op_matches_ref_and_returns_y_only():
    x = make_inputs(l=9)
    y = selective_scan(**x, delta_softplus=True, chunk_size=4)
    y_ref, _ = selective_scan_ref(**x, delta_softplus=True, return_final_state=True, chunk_size=4)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 4, 9)
    assert torch.equal(y, y_ref)


@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck(reverse):
    x = make_inputs(b=1, d=2, n=2, l=5, groups=2, seed=7)
    names = list(x)

    def f(*args):
        return selective_scan_ref(**dict(zip(names, args)), delta_softplus=True, return_final_state=True,
                                  reverse=reverse, chunk_size=2)
    assert torch.autograd.gradcheck(f, tuple(x.values()), eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------- chunking and reverse

@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("reverse", [False, True])
def test_chunked_equals_one_shot(dtype, rtol, reverse):
    x = make_inputs(b=2, d=4, n=4, l=50, groups=2, dtype=dtype, seed=11)
    fn = lambda c: ref_fn(delta_softplus=True, reverse=reverse, chunk_size=c)  # noqa: E731
    want = run_with_grads(fn(50), x)
    for c in (1, 3, 16, 32, None):
        assert_close(run_with_grads(fn(c), detached(x)), want, rtol=rtol)


def test_reverse_is_flip_op_flip():
    x = make_inputs(l=37, groups=2, seed=5)

    def flipped(**x):
        xf = {k: (v.flip(-1) if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
        y, h = selective_scan_ref(**xf, delta_softplus=True, return_final_state=True, chunk_size=16)
        return y.flip(-1), h

    got = run_with_grads(ref_fn(delta_softplus=True, reverse=True, chunk_size=8), x)
    assert_close(got, run_with_grads(flipped, detached(x)), rtol=1e-12)
    # and reverse really is different from the causal scan
    fwd = run_with_grads(ref_fn(delta_softplus=True, chunk_size=8), detached(x))
    assert (fwd["y"] - got["y"]).abs().max() > 1e-3


@pytest.mark.parametrize("reverse", [False, True])
def test_two_halves_equal_one_shot(reverse):
    x = make_inputs(l=40, groups=2, seed=9)

    def halves(**x):
        first, second = ({k: (v[..., s] if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
                         for s in (slice(0, 23), slice(23, 40)))
        if reverse:
            first, second = second, first
        y1, h = selective_scan_ref(**first, delta_softplus=True, return_final_state=True, reverse=reverse,
                                   chunk_size=8)
        y2, h = selective_scan_ref(**{**second, "initial_state": h}, delta_softplus=True,
                                   return_final_state=True, reverse=reverse, chunk_size=8)
        return torch.cat([y2, y1] if reverse else [y1, y2], dim=-1), h

    want = run_with_grads(ref_fn(delta_softplus=True, reverse=reverse, chunk_size=16), x)
    assert_close(run_with_grads(halves, detached(x)), want, rtol=1e-12)


# ---------------------------------------------------------------- numerics

@pytest.mark.parametrize("reverse", [False, True])
def test_strong_decay_fp32_matches_float64(reverse):
    # dt ~ 1 and |A| up to ~50: dt*|A| ~ 50 per step on the strong channels, ~0.01 on the weak ones.
    b, d, n, l = 2, 4, 4, 200
    g = torch.Generator().manual_seed(3)
    x = make_inputs(b=b, d=d, n=n, l=l, groups=2, delta_bias=False, seed=3)
    with torch.no_grad():
        x["delta"].copy_(0.8 + 0.4 * torch.rand(b, d, l, generator=g, dtype=torch.float64))
        x["A"].copy_(-torch.logspace(-2, 1.7, d * n, dtype=torch.float64).view(d, n))
    want = run_with_grads(ref_fn(reverse=reverse, chunk_size=64), x)
    got = run_with_grads(ref_fn(reverse=reverse, chunk_size=64), detached(x, torch.float32))
    assert got["y"].dtype == torch.float32 and got["final_state"].dtype == torch.float32
    assert_close(got, want, rtol=2e-5)


def test_bf16_inputs_give_bf16_output_close_to_fp32():
    x = make_inputs(l=64, groups=2, dtype=torch.bfloat16, seed=4)
    x["A"] = x["A"].detach().float().requires_grad_()
    y, h = selective_scan(**x, delta_softplus=True, return_final_state=True, chunk_size=16)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    y32, h32 = selective_scan(**detached(x, torch.float32), delta_softplus=True, return_final_state=True)
    assert_close({"y": y, "final_state": h}, {"y": y32, "final_state": h32}, rtol=1e-2)
    (y.float().sum() + h.sum()).backward()
    assert all(v.grad is not None and v.grad.dtype == v.dtype for v in x.values() if v is not None)


# ---------------------------------------------------------------- memory

def test_autograd_saves_chunk_boundaries_not_full_states():
    """Under autograd nothing of size (b, d, n, l) is kept for backward: the inputs and the
    chunk-boundary states only (counted by the storages they keep alive, so views count in full)."""
    b, d, n, l, T = 1, 8, 16, 1024, 64
    x = make_inputs(b=b, d=d, n=n, l=l, dtype=torch.float32, seed=2)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, h = selective_scan_ref(**x, delta_softplus=True, return_final_state=True, chunk_size=T)
    kept = sum(storages.values())
    assert kept < b * d * n * l, f"backward keeps {kept} elements alive, one full state is {b * d * n * l}"
    assert h.untyped_storage().nbytes() == h.numel() * h.element_size(), "final state pins a larger tensor"
    (y.sum() + h.sum()).backward()
    assert torch.isfinite(x["initial_state"].grad).all()


def test_auto_chunk_size():
    assert auto_chunk_size(1, 1, 1) == 2048
    assert auto_chunk_size(64, 1024, 64) == 16
    assert auto_chunk_size(2, 256, 16) == 128               # 2 * 256 * 16 * 128 = 2**20 on CPU
    assert auto_chunk_size(2, 256, 16, "cuda") == 1024      # 2**23 on a GPU
    x = make_inputs(l=33, groups=2, seed=6)
    with torch.no_grad():
        assert torch.allclose(selective_scan_ref(**x), selective_scan_ref(**x, chunk_size=5), rtol=1e-12)


# ---------------------------------------------------------------- dispatch and validation

def test_dispatch(monkeypatch):
    x = {k: v.detach() for k, v in make_inputs(l=5).items()}
    with pytest.raises(RuntimeError, match="Triton"):
        selective_scan(**x, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        selective_scan(**x, backend="bogus")
    want = selective_scan_ref(**x)
    monkeypatch.setenv("SEQMAMBA_BACKEND", "ref")
    assert torch.equal(selective_scan(**x), want)
    monkeypatch.setenv("SEQMAMBA_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SEQMAMBA_BACKEND"):
        selective_scan(**x)


def test_dispatch_dtype_rule(monkeypatch):
    """Where Triton could run, float64 inputs go to the reference under "auto" (also with SEQMAMBA_BACKEND=triton)
    and are an error for an explicit backend="triton"; fp32/bf16/fp16 go to Triton."""
    from types import SimpleNamespace

    from seqmamba.kernels import _dispatch
    monkeypatch.setattr(_dispatch, "_TRITON_AVAILABLE", True)
    on_gpu = SimpleNamespace(is_cuda=True)
    f32, bf16, f64 = (torch.zeros(1, dtype=t) for t in (torch.float32, torch.bfloat16, torch.float64))
    resolve = _dispatch.resolve_backend
    assert resolve("op", "auto", on_gpu, True, inputs=(f32, None, bf16)) == "triton"
    assert resolve("op", "auto", on_gpu, True, inputs=(f32, None, f64)) == "ref"
    with pytest.raises(RuntimeError, match="op: the Triton backend takes fp32/bf16/fp16"):
        resolve("op", "triton", on_gpu, True, inputs=(f64,))
    monkeypatch.setenv("SEQMAMBA_BACKEND", "triton")
    assert resolve("op", "auto", on_gpu, True, inputs=(f64,)) == "ref"
    assert resolve("op", "auto", on_gpu, True, inputs=(bf16,)) == "triton"


def _bad(name):
    x = {k: v.detach() for k, v in make_inputs(b=2, d=4, n=3, l=5, groups=2).items()}
    bad = {
        "u": torch.zeros(2, 4),
        "delta": torch.zeros(2, 4, 6, dtype=torch.float64),
        "A": torch.zeros(5, 3, dtype=torch.float64),
        "B": torch.zeros(2, 3, 3, 5, dtype=torch.float64),        # 4 % 3 != 0
        "C": torch.zeros(2, 2, 3, 4, dtype=torch.float64),        # wrong length
        "D": torch.zeros(3, dtype=torch.float64),
        "z": torch.zeros(2, 4, 4, dtype=torch.float64),
        "delta_bias": torch.zeros(4, 1, dtype=torch.float64),
        "initial_state": torch.zeros(2, 4, 4, dtype=torch.float64),
    }
    x[name] = bad[name]
    return x


@pytest.mark.parametrize("name", NAMES)
def test_bad_shapes_raise_value_error_naming_argument(name):
    with pytest.raises(ValueError, match=rf"\b{name}\b must have shape"):
        selective_scan(**_bad(name))


def test_bad_dtype_and_chunk_size():
    x = {k: v.detach() for k, v in make_inputs(l=5).items()}
    with pytest.raises(ValueError, match="B must be a floating-point"):
        selective_scan(**{**x, "B": x["B"].long()})
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan(**x, chunk_size=0)
