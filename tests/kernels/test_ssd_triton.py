"""Triton SSD scan against the reference.

CPU: the kernels run under the Triton interpreter on tiny shapes with a small chunk and block (so that several
chunks, several blocks per chunk and a padded tail are taken), against the float64 reference or the float64
per-step loop of test_ssd. GPU (``-m gpu``): realistic shapes, bf16, 1M tokens, 64-bit offsets, determinism,
the Mamba2 module with ``backend="auto"`` against ``backend="ref"``, and torch.compile.
"""
from __future__ import annotations

import pytest
import torch

from seqmamba.kernels.ssd import ssd_scan, ssd_scan_ref
from tests.kernels.interpret import load_interpreted
from tests.utils import assert_all_close, module_outputs_and_grads, rel_err
from tests.kernels.test_ssd import (compare, make_inputs, naive_ssd, packed_seq_idx, run_with_grads,
                                    strong_decay_inputs)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SMALL = dict(chunk=32, blk=16)  # 2 blocks per chunk


@pytest.fixture(scope="module")
def chunk():
    return load_interpreted("seqmamba.kernels.ssd.chunk")


def triton_op(impl, tuning=SMALL, **kw):
    return lambda **i: impl(**i, return_final_state=True, _tuning=tuning, **kw)


def ref_op(**kw):
    return lambda **i: ssd_scan_ref(**i, chunk_size=16, return_final_state=True, **kw)


def as64(inp):
    return {k: None if v is None else v.detach().double().requires_grad_() for k, v in inp.items()}


# name: (l, make_inputs options, reverse, packed lengths per row or None, tuning)
CASES = {
    "plain-g1": (50, dict(g=1), False, None, SMALL),
    "all-Dh": (50, dict(g=2, D="h", z=True, dt_bias=True, softplus=True), False, None, SMALL),
    "all-Dhp-reverse": (50, dict(g=2, D="hp", z=True, dt_bias=True, softplus=True), True, None, SMALL),
    "bias-nosoftplus-no-h0-rev": (37, dict(g=1, D="h", dt_bias=True, h0=False), True, None, SMALL),
    "packed": (50, dict(g=2, D="h", z=True, dt_bias=True, softplus=True), False, ([3, 13, 1, 33], [16, 34]),
               SMALL),
    "packed-reverse": (50, dict(g=2, D="hp", dt_bias=True, softplus=True), True, ([20, 30], [5, 12, 33]),
                       SMALL),
    "one-block-chunks": (40, dict(g=4, z=True), False, None, dict(chunk=16, blk=16)),
    "short": (7, dict(g=2, D="h", softplus=True), True, None, SMALL),
    "heads-looped": (45, dict(g=1, D="hp", z=True, dt_bias=True, softplus=True), True, ([10, 35], [45]),
                     dict(SMALL, splits=1)),  # one backward program walks all 4 heads of the group
    "heads-split": (45, dict(g=1, z=True), False, None, dict(SMALL, splits=2)),
    "backward-block": (45, dict(g=2, D="h", dt_bias=True, softplus=True), True, None,
                       dict(chunk=32, blk=32, blk_bwd=16)),  # the backward cuts chunks into 2 blocks, not 1
}


def case_inputs(name, h, seed):
    """CASES[name]'s fp32 inputs (b 2, p 3, n 5, ``h`` heads), cotangents dy and dht, and the call's flags."""
    l, opt, reverse, packed, _ = CASES[name]
    inp, dy, dht = make_inputs(2, l, h, 3, n=5, seed=seed, dtype=torch.float32, **opt)
    seq_idx = None if packed is None else torch.stack([packed_seq_idx(r, i) for i, r in enumerate(packed)])
    return inp, dy, dht, dict(dt_softplus=opt.get("softplus", False), reverse=reverse, seq_idx=seq_idx)


def check_case(chunk, name, h, seed, tuning=None):
    """Runs CASES[name] (``case_inputs``; ``tuning`` overrides the case's) through the interpreted kernels and
    compares y, the final state and every gradient with the float64 reference. Returns the kernels' (y, final
    state, grads)."""
    inp, dy, dht, flags = case_inputs(name, h, seed)
    got = run_with_grads(triton_op(chunk.ssd_scan_triton, dict(CASES[name][4], **(tuning or {})), **flags), inp,
                         dy, dht)
    compare(got, run_with_grads(ref_op(**flags), as64(inp), dy, dht), 2e-5)
    return got


@pytest.mark.parametrize("name", CASES)
def test_interpreted_matches_float64(chunk, name):
    """y, final state and every gradient (initial_state and the path through the final state included) of
    fp32 inputs, against the float64 reference."""
    got = check_case(chunk, name, h=4, seed=len(name))
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32


@pytest.mark.parametrize("factor", [True, False])
def test_interpreted_matches_naive_loop(chunk, factor, monkeypatch):
    """The same against test_ssd's float64 per-step loop (independent of the reference's chunked algebra),
    with the off-diagonal decay tiles factorised (default) and not."""
    monkeypatch.setattr(chunk, "FACTOR", factor)
    inp, dy, dht = make_inputs(1, 45, 4, 2, g=2, n=3, seed=7, dtype=torch.float32, D="hp", z=True,
                               dt_bias=True, softplus=True)
    got = run_with_grads(triton_op(chunk.ssd_scan_triton, dt_softplus=True), inp, dy, dht)
    compare(got, run_with_grads(lambda **i: naive_ssd(**i, dt_softplus=True), as64(inp), dy, dht), 2e-5)


def test_interpreted_chunk_first_grids(chunk, monkeypatch):
    """The path the default (HEADS_FIRST) does not take: the 2-d grids whose consecutive programs are the
    chunks (or blocks) of one head, or of one group of heads."""
    monkeypatch.setattr(chunk, "HEADS_FIRST", False)
    check_case(chunk, "packed", h=4, seed=17)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("name", ["all-Dhp-reverse", "packed", "heads-looped"])
def test_interpreted_heads_per_program(chunk, heads, name, monkeypatch):
    """The forward's output kernel at one head a program (``_chunk_out_kernel``) and at two
    (``_chunk_out_pair_kernel``, the default where the groups have an even number of heads): with packed rows,
    reverse, D per head and channel, and z; one backward program per group walks all its heads."""
    monkeypatch.setattr(chunk, "OUT_HEADS", heads)
    monkeypatch.setattr(chunk, "TARGET_PROGRAMS", 1)
    check_case(chunk, name, h=8, seed=23)


@pytest.mark.parametrize("name", ["all-Dhp-reverse", "packed"])
def test_interpreted_backward_heads_not_power_of_two(chunk, name, monkeypatch):
    """One backward program per group of 3 heads: the dC kernel keeps its per-head sums in tiles of 4 heads
    (HB), one of them unused, across its loops over s blocks and heads."""
    monkeypatch.setattr(chunk, "TARGET_PROGRAMS", 1)
    check_case(chunk, name, h=6, seed=29)


@pytest.mark.parametrize("name", ["all-Dhp-reverse", "packed", "bias-nosoftplus-no-h0-rev"])
def test_interpreted_dt_head_blocks(chunk, name, monkeypatch):
    """The kernels over dt (dt' and cs forward, ddt backward) in blocks of 4 heads: 6 heads make a full block
    and a block with 2 heads masked off (and groups of 3 heads take the one-head output kernel)."""
    monkeypatch.setattr(chunk, "DT_HEADS", 4)
    check_case(chunk, name, h=6, seed=41)


@pytest.mark.parametrize("unroll", [1, 2])
@pytest.mark.parametrize("name", ["all-Dhp-reverse", "packed-reverse", "one-block-chunks"])
def test_interpreted_state_pass_unroll(chunk, unroll, name, monkeypatch):
    """The forward's and the backward's passes over chunk states one chunk a load and two (groups with the next
    one prefetched, a partial last group): 3 or 4 chunks, sequence resets, reverse."""
    monkeypatch.setattr(chunk, "STATE_UNROLL", unroll)
    check_case(chunk, name, h=4, seed=31, tuning=dict(chunk=16, blk=16))  # 3 or 4 chunks


@pytest.mark.parametrize("name,run", [("all-Dhp-reverse", 2), ("all-Dhp-reverse", 3), ("packed", 2), ("packed", 3),
                                      ("packed-reverse", 3), ("bias-nosoftplus-no-h0-rev", 2)])
def test_interpreted_states_in_runs(chunk, name, run, monkeypatch):
    """The forward in runs of chunks: ``_chunk_state_run_kernel`` (each run's end state), the pass over runs, and
    ``_run_out_kernel`` walking each run in blocks of 8 (two a chunk of 16) from its entering state. 3-4 chunks
    in runs of 2 or 3 (partial last runs), sequence resets inside runs, chunks and blocks, both directions, with
    and without an initial state; y, the final state and every gradient, and y and the final state without
    autograd, against the float64 reference; the run path's kernels are the ones launched."""
    monkeypatch.setattr(chunk, "STATE_RUN", run)
    monkeypatch.setattr(chunk, "RUN_OUT_SHORTEST", run)
    monkeypatch.setattr(chunk, "RUN_OUT_MIN_PROGRAMS", 1)
    launched = []
    for kernel in ("_chunk_state_run_kernel", "_run_out_kernel", "_chunk_out_kernel", "_chunk_out_pair_kernel"):
        monkeypatch.setattr(chunk, kernel, _Spy(getattr(chunk, kernel), kernel, launched))
    tuning = dict(chunk=16, blk=8)
    path = ["_chunk_state_run_kernel", "_run_out_kernel"]
    check_case(chunk, name, h=4, seed=37, tuning=tuning)
    assert launched == path
    inp, _, _, flags = case_inputs(name, h=4, seed=37)
    with torch.no_grad():
        got = triton_op(chunk.ssd_scan_triton, tuning, **flags)(**inp)
        want = ref_op(**flags)(**as64(inp))
    assert launched == path * 2
    assert_all_close({"y": (got[0], want[0]), "ht": (got[1], want[1])}, 2e-5)


class _Spy:
    """A launcher's stand-in that records the name of each kernel launched and forwards the launch."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


@pytest.mark.parametrize("reverse", [False, True])
def test_interpreted_minus_inf_dt_rows_are_identity_steps(chunk, reverse):
    """Rows with dt = -inf under softplus, as BiMamba(Mamba2) pads a length to a multiple of 16 (x, B, C, z
    there are whatever the conv and projections made), with no cotangent on their outputs: y, the final state
    and every gradient of the real rows are those of the unpadded call, the pad rows' own gradients are exactly
    0 (softplus(-inf) = 0 and its derivative 0, never NaN), in both scan directions."""
    l, pad = 37, 11
    inp, dy, dht = make_inputs(2, l + pad, 6, 3, g=2, n=5, seed=53, dtype=torch.float32, D="h", z=True,
                               dt_bias=True, softplus=True)
    with torch.no_grad():
        inp["dt"][:, l:] = float("-inf")
        dy[:, l:] = 0.0
    op = triton_op(chunk.ssd_scan_triton, dt_softplus=True, reverse=reverse)
    y, ht, grads = run_with_grads(op, inp, dy, dht)
    rows = {"d" + k for k in ("x", "dt", "B", "C", "z")}  # the per-position inputs' gradients
    real = {k: v.detach()[:, :l].clone().requires_grad_() if "d" + k in rows else v for k, v in inp.items()}
    y2, ht2, grads2 = run_with_grads(op, real, dy[:, :l], dht)
    for k in rows:
        assert torch.equal(grads[k][:, l:], torch.zeros_like(grads[k][:, l:])), k
    compare((y[:, :l], ht, {k: g[:, :l] if k in rows else g for k, g in grads.items()}), (y2, ht2, grads2), 2e-5)


def test_interpreted_strong_decay_is_finite_and_accurate(chunk):
    """dt |A| up to ~55 a step at random positions: the decay over a chunk reaches thousands (exp of the
    cumulative sums themselves would overflow or underflow) while neighbouring positions stay O(1) apart."""
    inp, dy, dht = strong_decay_inputs(70)
    got = run_with_grads(triton_op(chunk.ssd_scan_triton), inp, dy, dht)
    compare(got, run_with_grads(ref_op(), as64(inp), dy, dht), 2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interpreted_low_precision(chunk, dtype):
    """bf16/fp16 x, dt, B, C, z (fp32 A, D, dt_bias, initial_state): y and gradients in each input's dtype,
    close to the fp32 reference on the same rounded inputs."""
    inp, dy, dht = make_inputs(1, 40, 4, 4, g=2, n=8, seed=61, D="h", z=True, dt_bias=True, softplus=True,
                               dtype=torch.float32)
    low = {k: v.detach().to(dtype).requires_grad_() if k in ("x", "dt", "B", "C", "z") else v
           for k, v in inp.items()}
    y, ht, grads = run_with_grads(triton_op(chunk.ssd_scan_triton, dt_softplus=True), low, dy, dht)
    assert y.dtype == dtype and ht.dtype == torch.float32
    assert all(grads[f"d{k}"].dtype == dtype for k in ("x", "dt", "B", "C", "z"))
    assert grads["dA"].dtype == torch.float32
    want = run_with_grads(ref_op(dt_softplus=True), as64(low), dy, dht)
    compare((y, ht, grads), want, 1e-2 if dtype == torch.bfloat16 else 3e-3)


def test_interpreted_y_only_and_state_only(chunk):
    """A loss on y alone (no gradient reaches the final state) and on the final state alone (dy is None)."""
    inp, _, _ = make_inputs(1, 37, 2, 3, g=1, n=4, seed=5, dtype=torch.float32, D="h", dt_bias=True,
                            softplus=True)
    for use in ("y", "state"):
        grads = []
        for fn, x in ((triton_op(chunk.ssd_scan_triton, dt_softplus=True), inp), (ref_op(dt_softplus=True),
                                                                                   as64(inp))):
            x = {k: v.detach().clone().requires_grad_() for k, v in x.items() if v is not None}
            y, h = fn(**x)
            out = y.sum() if use == "y" else (h * torch.arange(h.numel()).view_as(h)).sum()
            gs = torch.autograd.grad(out, list(x.values()), allow_unused=True)
            grads.append({k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(x.items(), gs)})
        compare((torch.zeros(1), torch.zeros(1), grads[0]), (torch.zeros(1), torch.zeros(1), grads[1]), 2e-5)


def test_interpreted_no_grad_returns_y_only(chunk):
    inp, _, _ = make_inputs(1, 20, 2, 2, g=1, n=3, seed=2, dtype=torch.float32, D="h")
    x = {k: v.detach() for k, v in inp.items() if v is not None}
    y = chunk.ssd_scan_triton(**x, _tuning=SMALL)
    assert isinstance(y, torch.Tensor)
    want = ssd_scan_ref(**x)
    assert (y - want).abs().max() <= 1e-5 * want.abs().max()


def test_interpreted_custom_op_opcheck(chunk):
    """The torch.library registration (schema, fake tensors, autograd) passes torch's own checks."""
    inp, _, _ = make_inputs(1, 20, 2, 2, g=1, n=3, seed=8, dtype=torch.float32, D="h", z=True, dt_bias=True,
                            softplus=True)
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"], inp["dt_bias"],
            inp["initial_state"], None, True, False, True, 16, 16, 4, 16, 4, 0)
    torch.library.opcheck(chunk._ssd_fwd_op, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_float64_and_cpu_dispatch():
    """backend='auto' sends float64 (and CPU tensors) to the reference; 'triton' on CPU says why it cannot."""
    inp, _, _ = make_inputs(1, 9, 2, 2, g=1, n=3, seed=91)
    x = {k: v.detach() for k, v in inp.items() if v is not None}
    assert torch.equal(ssd_scan(**x, chunk_size=4), ssd_scan_ref(**x, chunk_size=4))
    with pytest.raises(RuntimeError, match="not CUDA"):
        ssd_scan(**x, backend="triton")


# ---------------------------------------------------------------------------------------------- GPU

def cuda_inputs(b, l, h, p, g, n, dtype=torch.bfloat16, seed=0, **kw):
    """make_inputs drawn on the GPU (fp32 A, D, dt_bias, initial_state; x, dt, B, C, z in ``dtype``)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda")  # noqa: E731
    inp = {"x": r(b, l, h, p), "dt": r(b, l, h) - 2, "A": -(0.5 + 4 * torch.rand(h, generator=gen, device="cuda")),
           "B": r(b, l, g, n), "C": r(b, l, g, n), "D": r(h) if kw.get("D", True) else None,
           "z": r(b, l, h, p) if kw.get("z", True) else None, "dt_bias": 0.5 * r(h),
           "initial_state": r(b, h, p, n) if kw.get("h0", True) else None}
    for k in ("x", "dt", "B", "C", "z"):
        if inp[k] is not None:
            inp[k] = inp[k].to(dtype)
    return {k: None if v is None else v.requires_grad_() for k, v in inp.items()}


def grads_cuda(fn, inp, seed=1):
    """y, final state and the gradients of <y, dy> + <ht, dht> for random cotangents."""
    y, ht = fn(**inp)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    # rounded to bf16 for every run, so that runs of different dtypes get the same cotangent
    dy = torch.randn(y.shape, generator=gen, device="cuda").bfloat16().to(y.dtype)
    dht = torch.randn(ht.shape, generator=gen, device="cuda")
    names = [k for k, v in inp.items() if v is not None]
    grads = torch.autograd.grad((y * dy).float().sum() + (ht * dht).sum(), [inp[k] for k in names])
    return y.detach(), ht.detach(), {f"d{k}": g for k, g in zip(names, grads)}


def cuda_seq_idx(cuts):
    """(b, l) seq_idx on the GPU from each row's 5 sequence boundaries (0, three cuts, l): sequences 0-3."""
    return torch.stack([torch.repeat_interleave(torch.arange(4), c[1:] - c[:-1]) for c in cuts]).cuda()


def public(**kw):
    return lambda **i: ssd_scan(**i, dt_softplus=True, return_final_state=True, backend="triton", **kw)


def reference(**kw):
    return lambda **i: ssd_scan_ref(**i, dt_softplus=True, return_final_state=True, **kw)


def upcast(inp, dtype=torch.float64):
    return {k: None if v is None else v.detach().to(dtype).requires_grad_() for k, v in inp.items()}


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("reverse,packed", [(False, False), (True, False), (False, True), (True, True)])
def test_gpu_fp32_matches_float64(reverse, packed):
    b, l = 2, 3000
    inp = cuda_inputs(b, l, 8, 32, 2, 64, dtype=torch.float32, seed=reverse + 2 * packed)
    seq_idx = None
    if packed:
        cuts = torch.tensor([[0, 7, 1000, 1001, l], [0, 256, 257, 2999, l]])
        seq_idx = cuda_seq_idx(cuts)
    got = grads_cuda(public(reverse=reverse, seq_idx=seq_idx), inp)
    compare(got, grads_cuda(reference(reverse=reverse, seq_idx=seq_idx), upcast(inp)), 1e-4)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("reverse,packed", [(False, False), (True, True)])
def test_gpu_output_prefetch_changes_nothing(reverse, packed, monkeypatch):
    """The pair output kernel's L2 prefetches (inline PTX, GPU only) take the path on bf16 inputs at the realistic
    head size, with a length that ends inside a block; y and the final state are bitwise those of the kernel
    without them."""
    from seqmamba.kernels.ssd import chunk as ssd_chunk

    b, l = 2, 3000
    inp = cuda_inputs(b, l, 8, 64, 1, 128, seed=7 + reverse)
    x, B, C = inp["x"], inp["B"], inp["C"]
    assert ssd_chunk._prefetch_ok(x, B, C, ssd_chunk._Cfg(x, B, ssd_chunk.CHUNK, ssd_chunk.BLOCK, ssd_chunk.WARPS))
    seq_idx = None
    if packed:
        cuts = torch.tensor([[0, 7, 1000, 1001, l], [0, 256, 257, 2999, l]])
        seq_idx = cuda_seq_idx(cuts)
    with torch.no_grad():
        y, ht = public(reverse=reverse, seq_idx=seq_idx)(**inp)
        monkeypatch.setattr(ssd_chunk, "OUT_PREFETCH", False)
        y0, ht0 = public(reverse=reverse, seq_idx=seq_idx)(**inp)
    assert torch.equal(y, y0) and torch.equal(ht, ht0)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("run_out", [False, True])
@pytest.mark.parametrize("reverse,packed", [(False, False), (True, True)])
def test_gpu_states_in_runs_long_memory(reverse, packed, run_out, monkeypatch):
    """The forward by chunk, or (``run_out``) in runs of 4 chunks (forced; 32 chunks) through ``_run_out_kernel``
    in its fp32 block, on fp32 inputs whose decays keep memory across tens of chunks (A scaled by 1e-3): y, the
    final state and every gradient against the float64 reference, and y and the final state without autograd."""
    from seqmamba.kernels.ssd import chunk as ssd_chunk

    monkeypatch.setattr(ssd_chunk, "STATE_RUN", 4)
    monkeypatch.setattr(ssd_chunk, "RUN_OUT", run_out)
    monkeypatch.setattr(ssd_chunk, "RUN_OUT_SHORTEST", 4)
    monkeypatch.setattr(ssd_chunk, "RUN_OUT_MIN_PROGRAMS", 1)
    b, l = 2, 8192
    inp = cuda_inputs(b, l, 8, 32, 2, 64, dtype=torch.float32, seed=5 + reverse)
    with torch.no_grad():
        inp["A"].mul_(1e-3)
    seq_idx = None
    if packed:  # boundaries inside a run, at a chunk's edge, and inside a chunk
        cuts = torch.tensor([[0, 700, 1024, 5000, l], [0, 256, 3333, 3334, l]])
        seq_idx = cuda_seq_idx(cuts)
    flags = dict(reverse=reverse, seq_idx=seq_idx)
    dtp = torch.nn.functional.softplus(inp["dt"].detach() + inp["dt_bias"].detach())
    assert torch.exp(inp["A"].detach() * dtp[:, :512].sum(1)).min() > 0.3  # decay over two chunks
    want = grads_cuda(reference(**flags), upcast(inp))
    compare(grads_cuda(public(**flags), inp), want, 1e-4)
    with torch.no_grad():
        y, ht = public(**flags)(**{k: None if v is None else v.detach() for k, v in inp.items()})
    assert_all_close({"y": (y, want[0]), "ht": (ht, want[1])}, 1e-4)


@pytest.fixture
def tf32_matmuls():
    """torch.backends.cuda.matmul.fp32_precision = "tf32" for the test, restored afterwards."""
    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    yield
    torch.backends.cuda.matmul.fp32_precision = saved


def max_rel_errors(got, want):
    (y, ht, grads), (y2, ht2, grads2) = got, want
    pairs = {"y": (y, y2), "ht": (ht, ht2), **{k: (grads[k], grads2[k]) for k in grads}}
    return {k: rel_err(a, b) for k, (a, b) in pairs.items()}


@pytest.mark.gpu
@cuda
def test_gpu_fp32_products_follow_torch_tf32_switch(tf32_matmuls):
    """fp32 inputs at the realistic head size (the default 3xTF32 products are as accurate as IEEE ones there),
    and under torch's TF32 switch one TF32 product: errors of TF32's size, well above the default's."""
    inp = cuda_inputs(1, 2048, 8, 64, 1, 128, dtype=torch.float32, seed=11)
    want = grads_cuda(reference(), upcast(inp))
    tf32 = max_rel_errors(grads_cuda(public(), inp), want)
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    exact = max_rel_errors(grads_cuda(public(), inp), want)
    print("max relative errors, fp32 products:", {k: f"{v:.1e}" for k, v in exact.items()},
          "TF32:", {k: f"{v:.1e}" for k, v in tf32.items()})
    sums = {"dA", "ddt_bias"}  # sums of b*l terms of both signs: their rounding does not shrink with the sum
    assert all(v < (5e-5 if k in sums else 2e-5) for k, v in exact.items()), exact
    assert 1e-4 < tf32["y"] < 1e-2 and max(tf32.values()) < 2e-2, tf32


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("runs", [False, True])
def test_gpu_bf16_realistic_shape(runs, monkeypatch):
    """b2 l4096 h24 p64 n128, bf16, against the reference on the same rounded inputs in fp32; the forward by
    chunk, or (``runs``) through ``_run_out_kernel`` in runs of 8 chunks."""
    from seqmamba.kernels.ssd import chunk as ssd_chunk

    if runs:
        monkeypatch.setattr(ssd_chunk, "RUN_OUT_MIN_PROGRAMS", 1)
    inp = cuda_inputs(2, 4096, 24, 64, 1, 128, seed=1)
    y, ht, grads = grads_cuda(public(), inp)
    y2, ht2, grads2 = grads_cuda(reference(), upcast(inp, torch.float32))
    pairs = {"y": (y, y2), "ht": (ht, ht2), **{k: (grads[k], grads2[k]) for k in grads}}
    errs = {k: ((a.double() - b.double()).norm() / b.double().norm()).item() for k, (a, b) in pairs.items()}
    print("norm-wise relative errors:", {k: f"{e:.1e}" for k, e in errs.items()})
    # dA and ddt_bias sum b*l terms of both signs: their rounding errors do not shrink with the sum; ddt adds
    # A da (sums over a chunk) to the direct term
    limit = {"dA": 5e-2, "ddt_bias": 5e-2, "ddt": 2e-2}
    bad = {k: e for k, e in errs.items() if e > limit.get(k, 1e-2)}
    assert not bad, errs


@pytest.mark.gpu
@cuda
def test_gpu_deterministic_backward():
    inp = cuda_inputs(2, 8192, 8, 64, 2, 64, seed=4)
    a = grads_cuda(public(), inp)
    b = grads_cuda(public(), upcast(inp, torch.bfloat16) | {k: upcast({k: inp[k]}, torch.float32)[k]
                                                             for k in ("A", "D", "dt_bias", "initial_state")})
    for (name, x), y in zip([("y", a[0]), ("ht", a[1]), *a[2].items()], [b[0], b[1], *b[2].values()]):
        assert torch.equal(x, y), name


@pytest.mark.gpu
@cuda
def test_gpu_1m_tokens_bf16_finite_and_carried_halves():
    """b1 l2^20 h24 p64 n128: fwd+bwd finite in bf16 on random inputs; two halves carrying the state equal
    one shot."""
    l = 1 << 20
    inp = cuda_inputs(1, l, 24, 64, 1, 128, seed=6)
    y, ht, grads = grads_cuda(public(), inp)
    assert torch.isfinite(y).all() and torch.isfinite(ht).all()
    for k, v in grads.items():
        assert torch.isfinite(v).all(), k
    del grads
    with torch.no_grad():
        x = {k: v.detach() for k, v in inp.items()}
        cut = lambda s, e: {k: (v[:, s:e] if k in ("x", "dt", "B", "C", "z") else v)  # noqa: E731
                            for k, v in x.items() if k != "initial_state"}
        y1, h1 = public()(**cut(0, l // 2 + 1000), initial_state=x["initial_state"])
        y2, h2 = public()(**cut(l // 2 + 1000, l), initial_state=h1)
        assert (h2 - ht).abs().max() <= 1e-3 * ht.abs().max()
        err = (torch.cat([y1, y2], 1).float() - y.float()).abs().max()
        assert err <= 1e-2 * y.float().abs().max(), err


@pytest.mark.gpu
@cuda
def test_gpu_64bit_offsets():
    """b1 l2^21 h24 p64 (3.2e9 elements of x, past 2^31): the last 4096 positions match the reference
    started from the Triton state just before them."""
    l, w = 1 << 21, 4096
    inp = {k: v.detach() if v is not None else None
           for k, v in cuda_inputs(1, l, 24, 64, 1, 128, seed=9, z=False, h0=False).items()}
    with torch.no_grad():
        y, ht = public()(**inp)
        head = {k: (v[:, :-w] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
        _, h_before = public()(**head)
        del head
        tail = {k: (v[:, -w:] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
        y_ref, h_ref = reference()(**{**tail, "initial_state": h_before})
        assert (ht - h_ref).abs().max() <= 1e-2 * h_ref.abs().max()  # bf16 tl.dot operands vs fp32 math
        err = (y[:, -w:].float() - y_ref.float()).abs().max()
        assert err <= 2e-2 * y_ref.float().abs().max(), err
        assert torch.isfinite(y[:, :w].float()).all()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("reverse", [False, True])
def test_gpu_mamba2_auto_matches_ref(reverse):
    from seqmamba.mamba2 import Mamba2
    torch.manual_seed(0)
    m_auto = Mamba2(128, d_state=64, headdim=32, reverse=reverse, backend="auto").cuda()
    m_ref = Mamba2(128, d_state=64, headdim=32, reverse=reverse, backend="ref").cuda()
    m_ref.load_state_dict(m_auto.state_dict())
    x = torch.randn(2, 777, 128, device="cuda")
    outs = [module_outputs_and_grads(m, x) for m in (m_auto, m_ref)]
    assert_all_close({k: (outs[0][k], outs[1][k]) for k in outs[0]}, 1e-3)


@pytest.mark.gpu
@cuda
def test_gpu_torch_compile_fullgraph():
    """A function using ssd_scan compiles with fullgraph=True and matches eager, forward and backward."""
    inp = cuda_inputs(2, 1000, 8, 64, 2, 64, seed=3)

    def f(x, dt, A, B, C, D, z, dt_bias, initial_state):
        y, h = ssd_scan(x * 2, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                        initial_state=initial_state, return_final_state=True)
        return y.float().square().sum() + h.sum()

    eager = f(**inp)
    ge = torch.autograd.grad(eager, list(inp.values()))
    xc = upcast(inp, torch.bfloat16) | {k: upcast({k: inp[k]}, torch.float32)[k]
                                        for k in ("A", "D", "dt_bias", "initial_state")}
    out = torch.compile(f, fullgraph=True)(**xc)
    gc = torch.autograd.grad(out, list(xc.values()))
    assert torch.allclose(out, eager, rtol=1e-3)
    for a, b in zip(gc, ge):
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=1e-2 * b.float().abs().max().item())
