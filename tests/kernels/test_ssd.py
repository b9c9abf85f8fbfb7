"""ssd_scan (Mamba-2 SSD) vs a float64 loop over positions, plus its invariances and edge cases."""
import pytest
import torch
import torch.nn.functional as F

from seqmamba.kernels.ssd import ssd_scan, ssd_scan_ref
from tests.utils import OpRecorder, assert_all_close as assert_close

GRAD_INPUTS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")




def naive_ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_state=None, dt_softplus=False,
              reverse=False, seq_idx=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t (+ D x_t) (* silu(z_t)), one step at a time."""
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    Bh, Ch = B.repeat_interleave(h // g, 2), C.repeat_interleave(h // g, 2)  # (b, l, h, n)
    state = initial_state if initial_state is not None else x.new_zeros(b, h, p, n)
    ys, prev = [None] * l, None
    for t in (reversed(range(l)) if reverse else range(l)):
        if seq_idx is not None and prev is not None:  # a new sequence starts from zero
            state = state * (seq_idx[:, t] == seq_idx[:, prev]).to(x.dtype)[:, None, None, None]
        dtt = dt[:, t, :, None, None]
        state = torch.exp(dtt * A[:, None, None]) * state + dtt * x[:, t, :, :, None] * Bh[:, t, :, None, :]
        y = (state * Ch[:, t, :, None, :]).sum(-1)
        if D is not None:
            y = y + (D[:, None] if D.dim() == 1 else D) * x[:, t]
        if z is not None:
            y = y * F.silu(z[:, t])
        ys[t], prev = y, t
    return torch.stack(ys, 1), state


def make_inputs(b, l, h, p, g, n, *, seed=0, dtype=torch.float64, D=None, z=False, dt_bias=False,
                softplus=False, h0=True):
    """Named inputs requiring grad (realistic ranges) and cotangents (dy, dht). D: None, "h" or "hp"."""
    gen = torch.Generator().manual_seed(seed)
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    dt = rnd(b, l, h) - 2
    inp = {
        "x": rnd(b, l, h, p),
        "dt": dt if softplus else F.softplus(dt),
        "A": -(0.5 + 4 * torch.rand(h, generator=gen, dtype=torch.float64)),
        "B": rnd(b, l, g, n),
        "C": rnd(b, l, g, n),
        "D": None if D is None else rnd(*((h,) if D == "h" else (h, p))),
        "z": rnd(b, l, h, p) if z else None,
        "dt_bias": (0.5 * rnd(h) if softplus else 0.05 * torch.rand(h, generator=gen, dtype=torch.float64))
        if dt_bias else None,
        "initial_state": rnd(b, h, p, n) if h0 else None,
    }
    inp = {k: None if v is None else v.to(dtype).requires_grad_() for k, v in inp.items()}
    return inp, rnd(b, l, h, p), rnd(b, h, p, n)


def run_with_grads(fn, inputs, dy, dht):
    """y, ht and {d<name>: grad} of (y*dy).sum() + (ht*dht).sum() for every input that requires grad."""
    y, ht = fn(**inputs)
    loss = (y.double() * dy).sum() + (ht.double() * dht).sum()
    names = [k for k in GRAD_INPUTS if inputs.get(k) is not None and inputs[k].requires_grad]
    grads = torch.autograd.grad(loss, [inputs[k] for k in names], allow_unused=True)
    return y, ht, {f"d{k}": torch.zeros_like(inputs[k]) if gr is None else gr for k, gr in zip(names, grads)}


def compare(a, b, rtol):
    y, ht, grads = a
    y2, ht2, grads2 = b
    assert grads.keys() == grads2.keys()
    assert_close({"y": (y, y2), "ht": (ht, ht2), **{k: (grads[k], grads2[k]) for k in grads}}, rtol)


def op(chunk_size=256, **kw):
    return lambda **inp: ssd_scan(**inp, chunk_size=chunk_size, return_final_state=True, **kw)


def packed_seq_idx(lengths, gen_seed=0):
    """(l,) non-decreasing ids, one run per length, with arbitrary gaps between ids."""
    gaps = torch.randint(1, 4, (len(lengths),), generator=torch.Generator().manual_seed(gen_seed))
    return torch.cat([torch.full((m,), int(i)) for m, i in zip(lengths, gaps.cumsum(0))])


LENGTH_CHUNKS = [(1, 4), (7, 4), (7, 7), (63, 16), (100, 25), (100, 32)]  # chunks that divide l and not
OPTIONS = {
    "plain": dict(g=1),
    "all_Dh": dict(g=2, D="h", z=True, dt_bias=True, softplus=True),
    "all_Dhp_reverse": dict(g=2, D="hp", z=True, dt_bias=True, softplus=True, reverse=True),
    "bias_nosoftplus_reverse_no_h0": dict(g=1, D="h", dt_bias=True, h0=False, reverse=True),
    "g2_z": dict(g=2, z=True),
}


@pytest.mark.parametrize("l,chunk", LENGTH_CHUNKS)
@pytest.mark.parametrize("opt", OPTIONS)
def test_ref_matches_naive_loop(l, chunk, opt):
    kw = dict(OPTIONS[opt])
    reverse = kw.pop("reverse", False)
    inp, dy, dht = make_inputs(2, l, 4, 3, n=5, seed=l * 7 + chunk, **kw)
    flags = dict(dt_softplus=kw.get("softplus", False), reverse=reverse)
    got = run_with_grads(lambda **i: ssd_scan_ref(**i, chunk_size=chunk, return_final_state=True, **flags),
                         inp, dy, dht)
    compare(got, run_with_grads(lambda **i: naive_ssd(**i, **flags), inp, dy, dht), 1e-10)


@pytest.mark.parametrize("reverse", [False, True])
def test_seq_idx_matches_naive_loop(reverse):
    inp, dy, dht = make_inputs(2, 40, 4, 2, g=2, n=3, seed=5, D="h", z=True, dt_bias=True, softplus=True)
    seq_idx = torch.stack([packed_seq_idx([3, 13, 1, 23], 1), packed_seq_idx([16, 24], 2)])
    flags = dict(dt_softplus=True, reverse=reverse, seq_idx=seq_idx)
    got = run_with_grads(op(chunk_size=8, **flags), inp, dy, dht)
    compare(got, run_with_grads(lambda **i: naive_ssd(**i, **flags), inp, dy, dht), 1e-10)


def test_float32_matches_naive_loop():
    inp, dy, dht = make_inputs(2, 50, 4, 3, g=2, n=5, seed=3, dtype=torch.float32, D="hp", z=True,
                               dt_bias=True, softplus=True)
    got = run_with_grads(op(chunk_size=16, dt_softplus=True), inp, dy, dht)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    inp64 = {k: None if v is None else v.detach().double().requires_grad_() for k, v in inp.items()}
    compare(got, run_with_grads(lambda **i: naive_ssd(**i, dt_softplus=True), inp64, dy, dht), 1e-5)


def test_non_contiguous_inputs():
    inp, _, _ = make_inputs(2, 20, 4, 3, g=2, n=5, seed=13, D="hp", z=True, dt_bias=True, softplus=True)
    strided = {k: v.detach().transpose(0, 1).contiguous().transpose(0, 1) if v.dim() > 1 else v.detach()
               for k, v in inp.items()}
    strided["x"] = inp["x"].detach().permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    strided["initial_state"] = inp["initial_state"].detach().transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided["x"].is_contiguous() and not strided["initial_state"].is_contiguous()
    with torch.no_grad():
        y, ht = op(chunk_size=8, dt_softplus=True)(**strided)
        y2, ht2 = op(chunk_size=8, dt_softplus=True)(**inp)
    assert_close({"y": (y, y2), "ht": (ht, ht2)}, 1e-14)


@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck(reverse):
    inp, _, _ = make_inputs(2, 4, 2, 2, g=1, n=2, seed=11, D="hp", z=True, dt_bias=True, softplus=True)
    seq_idx = torch.tensor([[0, 0, 1, 1], [4, 5, 5, 5]])  # resets at a chunk boundary and inside a chunk
    names = [k for k in GRAD_INPUTS if inp[k] is not None]

    def fn(*tensors):
        return ssd_scan(**dict(zip(names, tensors)), chunk_size=3, dt_softplus=True, return_final_state=True,
                        reverse=reverse, seq_idx=seq_idx)
    assert torch.autograd.gradcheck(fn, tuple(inp[k] for k in names))


@pytest.mark.parametrize("reverse,packed", [(False, False), (True, True)])
def test_chunk_size_invariance(reverse, packed):
    l = 300
    inp, dy, dht = make_inputs(1, l, 2, 2, g=1, n=4, seed=21, D="h", z=True, dt_bias=True, softplus=True)
    seq_idx = packed_seq_idx([100, 37, 163])[None] if packed else None
    runs = [run_with_grads(op(chunk_size=c, dt_softplus=True, reverse=reverse, seq_idx=seq_idx), inp, dy, dht)
            for c in (16, 64, 256)]
    compare(runs[0], runs[2], 1e-10)
    compare(runs[1], runs[2], 1e-10)


def flip_inputs(inp):
    return {k: v.flip(1) if k in ("x", "dt", "B", "C", "z") and v is not None else v for k, v in inp.items()}


@pytest.mark.parametrize("packed", [False, True])
def test_reverse_is_flip_op_flip(packed):
    inp, dy, dht = make_inputs(2, 50, 4, 2, g=2, n=3, seed=31, D="h", z=True, dt_bias=True, softplus=True)
    seq_idx = torch.stack([packed_seq_idx([9, 20, 21], 3), packed_seq_idx([50])]) if packed else None
    flipped_seq = None if seq_idx is None else seq_idx.max() - seq_idx.flip(1)  # still non-decreasing

    def flipped(**i):
        y, ht = ssd_scan(**flip_inputs(i), chunk_size=16, dt_softplus=True, return_final_state=True,
                         seq_idx=flipped_seq)
        return y.flip(1), ht
    got = run_with_grads(op(chunk_size=16, dt_softplus=True, reverse=True, seq_idx=seq_idx), inp, dy, dht)
    compare(got, run_with_grads(flipped, inp, dy, dht), 1e-12)


@pytest.mark.parametrize("reverse", [False, True])
def test_packed_row_equals_separate_sequences(reverse):
    lengths = [[5, 17, 1, 30], [16, 16, 21], [53]]
    seq_idx = torch.stack([packed_seq_idx(ls, i) for i, ls in enumerate(lengths)])
    inp, dy, dht = make_inputs(3, 53, 4, 2, g=2, n=3, seed=41, D="hp", z=True, dt_bias=True, softplus=True)
    got = run_with_grads(op(chunk_size=16, dt_softplus=True, reverse=reverse, seq_idx=seq_idx), inp, dy, dht)

    def separate(**i):
        ys, hts = [], []
        for row, ls in enumerate(lengths):
            starts = torch.tensor([0] + ls).cumsum(0).tolist()
            first = len(ls) - 1 if reverse else 0  # the sequence initial_state feeds, scanning order
            last = 0 if reverse else len(ls) - 1
            row_ys = []
            for j, (s, e) in enumerate(zip(starts, starts[1:])):
                piece = {k: (v[row:row + 1, s:e] if k in ("x", "dt", "B", "C", "z") else v)
                         for k, v in i.items() if v is not None and k != "initial_state"}
                h0 = i["initial_state"][row:row + 1] if j == first else None
                y, ht = ssd_scan(**piece, initial_state=h0, chunk_size=16, dt_softplus=True,
                                 return_final_state=True, reverse=reverse)
                row_ys.append(y)
                if j == last:
                    hts.append(ht)
            ys.append(torch.cat(row_ys, 1))
        return torch.cat(ys), torch.cat(hts)
    compare(got, run_with_grads(separate, inp, dy, dht), 1e-10)


def strong_decay_inputs(l: int):
    """fp32 inputs of 4 heads whose decays dt |A| reach ~55 at 30% of the positions (0.01-0.5 elsewhere)."""
    h = 4
    inp, dy, dht = make_inputs(2, l, h, 3, g=1, n=4, seed=51, D="h", dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    strong = torch.rand(2, l, h, generator=gen) < 0.3
    with torch.no_grad():
        inp["A"].copy_(torch.tensor([-50.0, -20.0, -1.0, -0.05]))
        inp["dt"].copy_(torch.where(strong, 1.0, 0.01) * (1 + 0.1 * torch.rand(2, l, h, generator=gen)))
    return inp, dy, dht


def test_strong_decay_float32_is_finite_and_accurate():
    """dt |A| up to ~55 a step at random positions, small steps between them: the decay summed over a chunk
    of 256 reaches thousands while the decay between nearby positions stays O(1) and must stay accurate."""
    inp, dy, dht = strong_decay_inputs(300)
    got = run_with_grads(op(chunk_size=256), inp, dy, dht)
    inp64 = {k: None if v is None else v.detach().double().requires_grad_() for k, v in inp.items()}
    compare(got, run_with_grads(op(chunk_size=256), inp64, dy, dht), 1e-5)


def test_bfloat16_inputs():
    inp, dy, dht = make_inputs(2, 40, 4, 4, g=2, n=8, seed=61, D="h", z=True, dt_bias=True, softplus=True,
                               dtype=torch.float32)
    low = {k: v.detach().bfloat16().requires_grad_() if k in ("x", "dt", "B", "C", "z") else v
           for k, v in inp.items()}
    y, ht, grads = run_with_grads(op(chunk_size=16, dt_softplus=True), low, dy, dht)
    assert y.dtype == torch.bfloat16 and ht.dtype == torch.float32
    assert all(grads[f"d{k}"].dtype == torch.bfloat16 for k in ("x", "dt", "B", "C", "z"))
    f32 = {k: v.detach().float().requires_grad_() for k, v in low.items()}
    compare((y, ht, grads), run_with_grads(op(chunk_size=16, dt_softplus=True), f32, dy, dht), 1e-2)


@pytest.mark.parametrize("reverse", [False, True])
def test_two_carried_halves_equal_one_shot(reverse):
    l, cut = 70, 29
    inp, dy, dht = make_inputs(2, l, 4, 2, g=2, n=3, seed=71, D="h", z=True, dt_bias=True, softplus=True)

    def halves(**i):
        part = lambda s, e: {k: v[:, s:e] if k in ("x", "dt", "B", "C", "z") else v
                             for k, v in i.items() if k != "initial_state"}
        run = lambda s, e, h0: ssd_scan(**part(s, e), initial_state=h0, chunk_size=16, dt_softplus=True,
                                        return_final_state=True, reverse=reverse)
        if reverse:
            y2, h_mid = run(cut, l, i["initial_state"])
            y1, ht = run(0, cut, h_mid)
        else:
            y1, h_mid = run(0, cut, i["initial_state"])
            y2, ht = run(cut, l, h_mid)
        return torch.cat([y1, y2], 1), ht
    one_shot = run_with_grads(op(chunk_size=16, dt_softplus=True, reverse=reverse), inp, dy, dht)
    compare(run_with_grads(halves, inp, dy, dht), one_shot, 1e-12)


@pytest.mark.parametrize("reverse", [False, True])
def test_memory_and_work_are_chunked(reverse):
    """Forward and backward: no tensor larger than the inputs, and work linear in the length."""
    counts = {}
    for l in (128, 256):
        b, h, p, n = 1, 2, 4, 16
        inp, dy, dht = make_inputs(b, l, h, p, g=1, n=n, seed=81, D="h", z=True, dtype=torch.float32)
        counts[l] = mode = OpRecorder()
        with mode:
            run_with_grads(op(chunk_size=16, reverse=reverse), inp, dy, dht)
        biggest_input = max(b * l * h * p, b * l * n)  # x, B; the whole-length state would be b l h p n
        assert mode.largest <= biggest_input, f"l={l}: a tensor of {mode.largest} elements > {biggest_input}"
    ratio = counts[256].total / counts[128].total
    assert ratio < 2.1, f"doubling the length multiplies the elements produced by {ratio:.2f}"


def test_backend_dispatch():
    inp, _, _ = make_inputs(1, 9, 2, 2, g=1, n=3, seed=91, dtype=torch.float32)
    with torch.no_grad():
        y_ref = ssd_scan(**inp, chunk_size=4, backend="ref")
        assert torch.equal(ssd_scan(**inp, chunk_size=4), y_ref)
        with pytest.raises(RuntimeError, match="Triton"):
            ssd_scan(**inp, chunk_size=4, backend="triton")
        with pytest.raises(ValueError, match="backend"):
            ssd_scan(**inp, chunk_size=4, backend="cuda")


BAD = {
    "chunk_size": lambda i: {"chunk_size": 0},
    "chunk_size ": lambda i: {"chunk_size": 2.5},
    "chunk_size  ": lambda i: {"chunk_size": True},
    "x": lambda i: {"x": i["x"][0]},
    "dt": lambda i: {"dt": i["dt"][..., :1]},
    "A": lambda i: {"A": i["A"][:, None]},
    "B": lambda i: {"B": i["B"][:, :-1]},
    "C": lambda i: {"C": i["C"][..., :-1]},
    "groups": lambda i: {"B": torch.zeros(2, 6, 3, 3), "C": torch.zeros(2, 6, 3, 3)},
    "D": lambda i: {"D": torch.zeros(4, 3)},
    "z": lambda i: {"z": i["x"][:, :-1]},
    "dt_bias": lambda i: {"dt_bias": torch.zeros(3)},
    "initial_state": lambda i: {"initial_state": torch.zeros(2, 4, 2, 4)},
    "seq_idx": lambda i: {"seq_idx": torch.zeros(2, 5, dtype=torch.long)},
    "seq_idx ": lambda i: {"seq_idx": torch.zeros(2, 6)},
}


@pytest.mark.parametrize("arg", BAD)
@pytest.mark.parametrize("fn", [ssd_scan, ssd_scan_ref])
def test_bad_arguments_raise_value_error(arg, fn):
    inp, _, _ = make_inputs(2, 6, 4, 2, g=2, n=3, seed=0, dtype=torch.float32, D="h", z=True, dt_bias=True)
    inp = {k: v.detach() for k, v in inp.items()}
    fn(**inp, chunk_size=4)  # the unmodified inputs are fine
    name = {"groups": "g="}.get(arg.strip(), arg.strip())
    with pytest.raises(ValueError, match=name):
        fn(**{**inp, "chunk_size": 4, **BAD[arg](inp)})
