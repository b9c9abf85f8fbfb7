"""EagerCustomOp: the custom op's own functions without the dispatcher in eager mode, the op under torch.compile."""
import pytest
import torch

from seqmamba.kernels._dispatch import EagerCustomOp

_T = torch.Tensor


def _pair_impl(x: _T, w: _T, scale: float) -> tuple[_T, _T]:
    return x * w * scale, (x * x).sum(-1)


def _list_impl(x: _T, w: _T, scale: float) -> list[_T]:
    return list(_pair_impl(x, w, scale))


def _setup(ctx, inputs, output):
    x, w, scale = inputs
    ctx.save_for_backward(x, w)
    ctx.scale = scale


def _bwd_impl(x: _T, w: _T, dy: _T, dsq: _T, scale: float) -> list[_T]:
    x.data_ptr()  # a real tensor: fake tensors (compile tracing) raise here, as a Triton launch would
    return [dy * w * scale + 2 * x * dsq[..., None], (dy * x * scale).sum(0)]


_bwd_op = torch.library.custom_op("seqmamba_test::pair_bwd", _bwd_impl, mutates_args=())
_bwd_op.register_fake(lambda x, w, dy, dsq, scale: [torch.empty_like(x), torch.empty_like(w)])
pair_bwd = EagerCustomOp(_bwd_op, _bwd_impl)


def _backward(ctx, dy, dsq):
    x, w = ctx.saved_tensors
    dx, dw = pair_bwd(x, w, dy, dsq if dsq is not None else x.new_zeros(x.shape[:-1]), ctx.scale)
    return dx, dw, None


_pair_op = torch.library.custom_op("seqmamba_test::pair", _pair_impl, mutates_args=())
_pair_op.register_fake(lambda x, w, scale: (torch.empty_like(x), x.new_empty(x.shape[:-1])))
_pair_op.register_autograd(_backward, setup_context=_setup)
_list_op = torch.library.custom_op("seqmamba_test::pair_list", _list_impl, mutates_args=())
_list_op.register_fake(lambda x, w, scale: [torch.empty_like(x), x.new_empty(x.shape[:-1])])
_list_op.register_autograd(lambda ctx, grads: _backward(ctx, *grads), setup_context=_setup)

pair = EagerCustomOp(_pair_op, _pair_impl, _setup, _backward)
pair_list = EagerCustomOp(_list_op, _list_impl, _setup, lambda ctx, grads: _backward(ctx, *grads), returns_list=True)


def _leaves(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, generator=g, requires_grad=True), torch.randn(5, generator=g, requires_grad=True)


@pytest.mark.parametrize("fast, op", [(pair, _pair_op), (pair_list, _list_op)], ids=["tuple", "list"])
def test_eager_matches_the_op_and_skips_the_dispatcher(fast, op):
    x, w = _leaves()
    got = fast(x, w, 0.5)
    ref = op(x, w, 0.5)
    assert type(got) is type(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the eager output hangs off the wrapper's own autograd.Function, not the op's
    assert type(got[0].grad_fn).__name__.startswith("Eager_")
    assert not type(ref[0].grad_fn).__name__.startswith("Eager_")
    dy, dsq = torch.randn_like(got[0]), torch.randn_like(got[1])
    g_fast = torch.autograd.grad(got, (x, w), (dy, dsq))
    g_ref = torch.autograd.grad(ref, (x, w), (dy, dsq))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # one output used: the other's gradient arrives as zeros in both paths (materialized), same result
    g1 = torch.autograd.grad(fast(x, w, 0.5)[0].sum(), (x, w))
    g2 = torch.autograd.grad(op(x, w, 0.5)[0].sum(), (x, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_no_grad_runs_the_implementation_directly():
    x, w = _leaves()
    with torch.no_grad():
        y, sq = pair(x, w, 2.0)
    assert y.grad_fn is None and not y.requires_grad
    torch.testing.assert_close(y, x.detach() * w.detach() * 2.0)
    # inputs that need no grad: no graph either, even with grad mode on
    y2, _ = pair(x.detach(), w.detach(), 2.0)
    assert y2.grad_fn is None


def test_compile_sees_the_custom_op_in_one_graph():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, w = _leaves()
    f = torch.compile(lambda x, w: pair(x, w, 0.5)[0].sum() + pair_list(x, w, 1.0)[1].sum(), backend=backend,
                      fullgraph=True)
    out = f(x.detach(), w.detach())
    torch.testing.assert_close(out, _pair_impl(x, w, 0.5)[0].sum() + _list_impl(x, w, 1.0)[1].sum())
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert any("seqmamba_test.pair.default" in t for t in targets), targets
    assert any("seqmamba_test.pair_list.default" in t for t in targets), targets


def test_compiled_backward_traces_the_backward_op():
    """AOT autograd traces the registered backward with fake tensors outside dynamo: the backward's own op
    must be called as the op there (its implementation cannot take fake tensors)."""
    x, w = _leaves()
    f = torch.compile(lambda x, w: pair(x, w, 0.5)[0].square().sum() + pair(x, w, 0.5)[1].sum(),
                      backend="aot_eager", fullgraph=True)
    g = torch.autograd.grad(f(x, w), (x, w))
    x2, w2 = _leaves()
    ref = torch.autograd.grad(_pair_op(x2, w2, 0.5)[0].square().sum() + _pair_op(x2, w2, 0.5)[1].sum(), (x2, w2))
    for a, b in zip(g, ref):
        torch.testing.assert_close(a, b)
