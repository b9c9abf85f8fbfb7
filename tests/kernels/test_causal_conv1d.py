"""causal_conv1d and causal_conv1d_update vs a float64 loop over positions."""
import pytest
import torch
import torch.nn.functional as F

from seqmamba.kernels.causal_conv1d import (
    causal_conv1d, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref)
from tests.utils import assert_all_close as assert_close

WIDTHS = [1, 2, 3, 4, 8]




def naive_conv(x, weight, bias=None, h0=None, activation=None, reverse=False):
    """Scan positions one by one (backwards if reverse) with a window of the last w inputs."""
    b, d, l = x.shape
    w = weight.shape[-1]
    weight = weight.reshape(d, w)
    buf = [h0[..., k] for k in range(w - 1)] if h0 is not None else [x.new_zeros(b, d)] * (w - 1)
    ys = [None] * l
    for t in (reversed(range(l)) if reverse else range(l)):
        window = buf + [x[..., t]]
        y = sum(weight[:, k] * window[k] for k in range(w))
        if bias is not None:
            y = y + bias
        ys[t] = F.silu(y) if activation == "silu" else y
        buf = window[1:]
    ht = torch.stack(buf, -1) if w > 1 else x.new_zeros(b, d, 0)
    return torch.stack(ys, -1), ht


def make_inputs(b, d, l, w, dtype=torch.float64, seed=0, with_bias=True, with_h0=True):
    g = torch.Generator().manual_seed(seed)
    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    x = rnd(b, d, l)
    weight = rnd(d, w, scale=w ** -0.5)
    bias = rnd(d) if with_bias else None
    h0 = rnd(b, d, w - 1) if with_h0 else None
    dy = torch.randn(b, d, l, generator=g, dtype=torch.float64)
    dht = torch.randn(b, d, w - 1, generator=g, dtype=torch.float64)
    return x, weight, bias, h0, dy, dht


def run_with_grads(fn, inputs, dy, dht):
    """y, ht and the gradients of (y*dy).sum() + (ht*dht).sum() w.r.t. every input that is not None."""
    y, ht = fn(*inputs)
    loss = (y.double() * dy).sum() + (ht.double() * dht).sum()
    leaves = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]
    return y, ht, grads


def grad_names(with_bias, with_h0):
    return ["dx", "dweight"] + (["dbias"] if with_bias else []) + (["dh0"] if with_h0 else [])


@pytest.mark.parametrize("w", WIDTHS)
@pytest.mark.parametrize("l", [1, 5, 50])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("reverse", [False, True])
def test_matches_naive_loop(w, l, activation, reverse):
    x, weight, bias, h0, dy, dht = make_inputs(2, 3, l, w, seed=w * 100 + l)
    op = lambda *a: causal_conv1d(*a[:4], return_final_state=True, activation=activation, reverse=reverse)
    ref = lambda *a: naive_conv(*a, activation=activation, reverse=reverse)
    y, ht, grads = run_with_grads(op, (x, weight, bias, h0), dy, dht)
    y_n, ht_n, grads_n = run_with_grads(ref, (x, weight, bias, h0), dy, dht)
    pairs = {"y": (y, y_n), "ht": (ht, ht_n)}
    pairs.update({n: (a, b) for n, a, b in zip(grad_names(True, True), grads, grads_n)})
    assert_close(pairs, rtol=1e-10)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("w", [1, 4])
def test_no_bias_no_initial_state(w, reverse):
    x, weight, _, _, dy, dht = make_inputs(2, 3, 7, w, with_bias=False, with_h0=False)
    op = lambda *a: causal_conv1d(*a, return_final_state=True, reverse=reverse)
    ref = lambda *a: naive_conv(*a, reverse=reverse)
    y, ht, grads = run_with_grads(op, (x, weight), dy, dht)
    y_n, ht_n, grads_n = run_with_grads(ref, (x, weight), dy, dht)
    pairs = {"y": (y, y_n), "ht": (ht, ht_n), "dx": (grads[0], grads_n[0]), "dweight": (grads[1], grads_n[1])}
    assert_close(pairs, rtol=1e-10)
    assert_close({"y (no state returned)": (causal_conv1d(x, weight, reverse=reverse), y_n)}, rtol=1e-10)


@pytest.mark.parametrize("reverse", [False, True])
def test_fp32_matches_float64_loop(reverse):
    x, weight, bias, h0, dy, dht = make_inputs(2, 4, 33, 4, dtype=torch.float32, seed=3)
    op = lambda *a: causal_conv1d(*a, return_final_state=True, activation="silu", reverse=reverse)
    y, ht, grads = run_with_grads(op, (x, weight, bias, h0), dy, dht)
    assert y.dtype == torch.float32 and ht.dtype == torch.float32
    as64 = [t.detach().double().requires_grad_() for t in (x, weight, bias, h0)]
    ref = lambda *a: naive_conv(*a, activation="silu", reverse=reverse)
    y_n, ht_n, grads_n = run_with_grads(ref, as64, dy, dht)
    pairs = {"y": (y, y_n), "ht": (ht, ht_n)}
    pairs.update({n: (a, b) for n, a, b in zip(grad_names(True, True), grads, grads_n)})
    assert_close(pairs, rtol=1e-5)


@pytest.mark.parametrize("w", [1, 3, 4])
@pytest.mark.parametrize("l", [2, 9])
def test_reverse_is_flip_op_flip(w, l):
    x, weight, bias, h0, dy, dht = make_inputs(2, 3, l, w, seed=7)
    rev = lambda *a: causal_conv1d(*a, return_final_state=True, activation="silu", reverse=True)
    def flipped(x, weight, bias, h0):
        y, ht = causal_conv1d(x.flip(-1), weight, bias, h0, return_final_state=True, activation="silu")
        return y.flip(-1), ht
    y, ht, grads = run_with_grads(rev, (x, weight, bias, h0), dy, dht)
    y_f, ht_f, grads_f = run_with_grads(flipped, (x, weight, bias, h0), dy, dht)
    pairs = {"y": (y, y_f), "ht": (ht, ht_f)}
    pairs.update({n: (a, b) for n, a, b in zip(grad_names(True, True), grads, grads_f)})
    assert_close(pairs, rtol=1e-12)


@pytest.mark.parametrize("w", [2, 4, 8])
@pytest.mark.parametrize("split", [1, 2, 6])
@pytest.mark.parametrize("reverse", [False, True])
def test_chunked_equals_one_shot(w, split, reverse):
    x, weight, bias, h0, _, _ = make_inputs(2, 3, 10, w, seed=11)
    kw = dict(return_final_state=True, activation="silu", reverse=reverse)
    y_full, ht_full = causal_conv1d(x, weight, bias, h0, **kw)
    first, second = x[..., :split], x[..., split:]
    if reverse:  # the scan visits the end of the sequence first
        first, second = second, first
    y1, h1 = causal_conv1d(first, weight, bias, h0, **kw)
    y2, h2 = causal_conv1d(second, weight, bias, h1, **kw)
    y = torch.cat([y2, y1] if reverse else [y1, y2], -1)
    assert_close({"y": (y, y_full), "ht": (h2, ht_full)}, rtol=1e-12)


@pytest.mark.parametrize("w", WIDTHS)
def test_update_steps_equal_full_op(w):
    x, weight, bias, h0, dy, dht = make_inputs(2, 3, 6, w, seed=13)
    def stepped(x, weight, bias, h0):
        state, ys = h0, []
        for t in range(x.shape[-1]):
            y_t, state = causal_conv1d_update(x[..., t], state, weight, bias, activation="silu")
            ys.append(y_t)
        return torch.stack(ys, -1), state
    full = lambda *a: causal_conv1d(*a, return_final_state=True, activation="silu")
    y, ht, grads = run_with_grads(stepped, (x, weight, bias, h0), dy, dht)
    y_f, ht_f, grads_f = run_with_grads(full, (x, weight, bias, h0), dy, dht)
    pairs = {"y": (y, y_f), "ht": (ht, ht_f)}
    pairs.update({n: (a, b) for n, a, b in zip(grad_names(True, True), grads, grads_f)})
    assert_close(pairs, rtol=1e-12)


def test_update_is_functional():
    x, weight, bias, h0, _, _ = make_inputs(2, 3, 1, 4, seed=17)
    before = h0.detach().clone()
    _, new_state = causal_conv1d_update(x[..., 0], h0, weight, bias)
    assert torch.equal(h0.detach(), before)
    assert torch.equal(new_state.detach(), torch.cat([before[..., 1:], x.detach()[..., :1]], -1))


@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck(reverse):
    x, weight, bias, h0, _, _ = make_inputs(1, 2, 4, 3, seed=19)
    fn = lambda *a: causal_conv1d(*a, return_final_state=True, activation="silu", reverse=reverse)
    assert torch.autograd.gradcheck(fn, (x, weight, bias, h0))
    fn_step = lambda x, s, w_, b_: causal_conv1d_update(x, s, w_, b_, activation="silu")
    assert torch.autograd.gradcheck(fn_step, (x[..., 0].detach().requires_grad_(), h0, weight, bias))


def test_conv1d_weight_layout_accepted():
    x, weight, bias, h0, _, _ = make_inputs(2, 3, 5, 4, seed=23)
    y, ht = causal_conv1d(x, weight, bias, h0, return_final_state=True)
    y3, ht3 = causal_conv1d(x, weight.unsqueeze(1), bias, h0, return_final_state=True)
    y_s, s_s = causal_conv1d_update(x[..., 0], h0, weight, bias)
    y_s3, s_s3 = causal_conv1d_update(x[..., 0], h0, weight.unsqueeze(1), bias)
    assert_close({"y": (y3, y), "ht": (ht3, ht), "y_step": (y_s3, y_s), "state_step": (s_s3, s_s)}, rtol=0)
    # and it is the same conv nn.Conv1d(padding=w-1) computes when there is no initial state
    conv = torch.nn.Conv1d(3, 3, 4, groups=3, padding=3, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(weight.unsqueeze(1))
        conv.bias.copy_(bias)
        assert_close({"y vs nn.Conv1d": (causal_conv1d(x, conv.weight, conv.bias), conv(x)[..., :5])}, rtol=1e-12)


def test_bf16_out():
    x, weight, bias, h0, _, _ = make_inputs(2, 3, 8, 4, dtype=torch.bfloat16, seed=29)
    y, ht = causal_conv1d(x, weight, bias, h0, return_final_state=True, activation="silu")
    assert y.dtype == torch.bfloat16 and ht.dtype == torch.float32
    y_step, state = causal_conv1d_update(x[..., 0], h0, weight, bias, activation="silu")
    assert y_step.dtype == torch.bfloat16 and state.dtype == torch.float32
    y_n, ht_n = naive_conv(*(t.detach().double() for t in (x, weight, bias, h0)), activation="silu")
    assert_close({"y": (y, y_n), "ht": (ht, ht_n)}, rtol=1e-2)


def test_bad_arguments_raise():
    x, weight, bias, h0, _, _ = make_inputs(2, 3, 5, 4)
    with pytest.raises(ValueError, match="x"):
        causal_conv1d(x[0], weight)
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, weight[:2])
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, weight[..., None])
    with pytest.raises(ValueError, match="bias"):
        causal_conv1d(x, weight, bias[:2])
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x, weight, bias, h0[..., :2])
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, weight, activation="relu")
    with pytest.raises(ValueError, match="x"):
        causal_conv1d_update(x, h0, weight)
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_update(x[..., 0], h0[..., :1], weight)
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_update(x[..., 0], None, weight)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_update(x[..., 0], h0, weight, activation="gelu")
    with pytest.raises(ValueError, match="backend"):
        causal_conv1d(x, weight, backend="cuda")


def test_backends(monkeypatch):
    x, weight, bias, h0, _, _ = make_inputs(2, 3, 5, 4)
    with pytest.raises(RuntimeError, match="Triton"):
        causal_conv1d(x, weight, backend="triton")
    with pytest.raises(RuntimeError, match="Triton"):
        causal_conv1d_update(x[..., 0], h0, weight, backend="triton")
    monkeypatch.setenv("SEQMAMBA_BACKEND", "ref")
    assert torch.equal(causal_conv1d(x, weight, bias, h0), causal_conv1d_ref(x, weight, bias, h0))
    assert torch.equal(causal_conv1d_update(x[..., 0], h0, weight)[0],
                       causal_conv1d_update_ref(x[..., 0], h0, weight)[0])
