"""Mamba and Mamba2 mixers: init, reverse, streaming, stepping, segmented inference, padding masks."""
import math

import pytest
import torch

from seqmamba import Mamba, Mamba2
from seqmamba.mamba import channels_first_linear, scan_layout_l_major
from tests.utils import OpRecorder, assert_close

D_MODEL = 16
MIXERS = {
    "mamba": lambda **kw: Mamba(D_MODEL, d_state=4, **kw),
    "mamba2": lambda **kw: Mamba2(D_MODEL, d_state=4, headdim=8, ngroups=2, chunk_size=4, **kw),
    "mamba2_g1": lambda **kw: Mamba2(D_MODEL, d_state=4, headdim=4, ngroups=1, chunk_size=8, **kw),
}


def make(kind, **kw):
    torch.manual_seed(1)
    mixer = MIXERS[kind](**kw).double()
    with torch.no_grad():  # move every parameter away from its init so that mistakes show
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer


def copy_params(src, dst):
    dst.load_state_dict(src.state_dict())
    return dst


@pytest.mark.parametrize("kind", MIXERS)
def test_shapes_dtype_and_grads(kind):
    mixer = MIXERS[kind]()
    x = torch.randn(2, 11, D_MODEL)
    y = mixer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.square().sum().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_mamba_init_follows_the_paper():
    m = Mamba(64, d_state=16, dt_min=1e-3, dt_max=1e-1)
    assert m.in_proj.weight.shape == (256, 64) and m.x_proj.weight.shape == (4 + 32, 128)
    assert m.dt_proj.weight.shape == (128, 4) and m.conv1d.weight.shape == (128, 1, 4)
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1.0, 17.0)).repeat(128, 1))
    torch.testing.assert_close(m.D, torch.ones(128))
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)
    assert m.in_proj.bias is None and m.conv1d.bias is not None
    assert m.A_log._no_weight_decay and m.D._no_weight_decay


def test_mamba2_init_follows_the_paper():
    m = Mamba2(64, d_state=16, headdim=16, ngroups=2)
    assert m.nheads == 8 and m.in_proj.weight.shape == (2 * 128 + 2 * 2 * 16 + 8, 64)
    assert m.conv1d.weight.shape == (128 + 64, 1, 4)
    A = torch.exp(m.A_log)
    assert A.min() >= 1 and A.max() <= 16
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)
    assert m.dt_bias._no_weight_decay and m.norm.group_size == 64


@pytest.mark.parametrize("kind", MIXERS)
def test_reverse_is_flip_of_causal(kind):
    fwd = make(kind)
    rev = copy_params(fwd, make(kind, reverse=True))
    x = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    assert_close("reverse", rev(x), fwd(x.flip(1)).flip(1), 1e-10)


@pytest.mark.parametrize("kind", MIXERS)
@pytest.mark.parametrize("reverse", [False, True])
def test_streaming_chunks_equal_one_shot(kind, reverse):
    mixer = make(kind, reverse=reverse)
    x = torch.randn(2, 17, D_MODEL, dtype=torch.float64)
    full, full_state = mixer(x, return_state=True)
    pieces = [slice(0, 5), slice(5, 6), slice(6, 17)]
    if reverse:  # a reverse mixer consumes the sequence from its end
        pieces = [slice(11, 17), slice(10, 11), slice(0, 10)]
    state, out = None, torch.empty_like(full)
    for piece in pieces:
        out[:, piece], state = mixer(x[:, piece], state=state, return_state=True)
    assert_close("chunked output", out, full, 1e-10)
    assert_close("conv state", state.conv, full_state.conv, 1e-10)
    assert_close("ssm state", state.ssm, full_state.ssm, 1e-10)


@pytest.mark.parametrize("kind", MIXERS)
def test_step_equals_one_shot(kind):
    mixer = make(kind)
    x = torch.randn(3, 9, D_MODEL, dtype=torch.float64)
    full, full_state = mixer(x, return_state=True)
    state = mixer.allocate_state(3, dtype=torch.float64)
    outs = []
    for t in range(x.shape[1]):
        y, state = mixer.step(x[:, t], state)
        outs.append(y)
    assert_close("stepped output", torch.stack(outs, 1), full, 1e-10)
    assert_close("stepped ssm state", state.ssm, full_state.ssm, 1e-10)
    assert_close("stepped conv state", state.conv, full_state.conv, 1e-10)


@pytest.mark.parametrize("kind", MIXERS)
def test_reverse_mixer_cannot_step(kind):
    mixer = make(kind, reverse=True)
    with pytest.raises(RuntimeError, match="reverse"):
        mixer.step(torch.randn(1, D_MODEL, dtype=torch.float64), mixer.allocate_state(1, dtype=torch.float64))


@pytest.mark.parametrize("kind", MIXERS)
@pytest.mark.parametrize("reverse", [False, True])
def test_segmented_inference_equals_one_shot(kind, reverse):
    mixer = make(kind, reverse=reverse)
    x = torch.randn(2, 23, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        whole = mixer(x)
        mixer.segment_len = 5
        segmented, state = mixer(x, return_state=True)
        mixer.segment_len = 10**9
        _, whole_state = mixer(x, return_state=True)
    assert_close("segmented output", segmented, whole, 1e-10)
    assert_close("segmented ssm state", state.ssm, whole_state.ssm, 1e-10)


@pytest.mark.parametrize("kind", MIXERS)
@pytest.mark.parametrize("reverse", [False, True])
def test_padding_never_leaks(kind, reverse):
    mixer = make(kind, reverse=reverse)
    x = torch.randn(2, 10, D_MODEL, dtype=torch.float64)
    reference = mixer(x)
    pad = 100 * torch.randn(2, 4, D_MODEL, dtype=torch.float64)  # loud padding would show if it leaked
    for padded, real in ((torch.cat([x, pad], 1), slice(0, 10)), (torch.cat([pad, x], 1), slice(4, 14))):
        mask = torch.zeros(2, 14, dtype=torch.bool)
        mask[:, real] = True
        assert_close(f"masked output ({'right' if real.start == 0 else 'left'} pads)",
                     mixer(padded, mask=mask)[:, real], reference, 1e-10)


def test_mixed_lengths_in_one_batch():
    mixer = make("mamba", reverse=True)
    x = torch.randn(2, 8, D_MODEL, dtype=torch.float64)
    mask = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    out = mixer(x, mask=mask)
    assert_close("row 0", out[0], mixer(x[:1])[0], 1e-10)
    assert_close("row 1", out[1, :5], mixer(x[1:, :5])[0], 1e-10)


def test_dt_rank_auto():
    assert Mamba(33).dt_rank == math.ceil(33 / 16)
    with pytest.raises(ValueError, match="headdim"):
        Mamba2(20, headdim=64)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("grad", [True, False])
def test_mamba_scan_input_layout(bias, grad):
    """The mixer stores the scan's inputs as its CUDA kernels read them best (same values either way): under
    autograd u, delta, z, B, C run along l with unit stride (the blocked pair copies anything else); without
    autograd delta, z, B and C are channel-last (the sequential forward reads those rows in place). in_proj and
    x_proj/dt_proj applied through their weights must equal the modules' own outputs."""
    torch.manual_seed(0)
    m = Mamba(16, d_state=4, bias=bias).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        xz = m.project(x)
        assert_close("in_proj through its weight", xz, m.in_proj(x), 1e-12)
        scan, _ = m.scan_inputs(xz, None, None)
        u = scan["u"].transpose(1, 2)
        dt, B, C = torch.split(m.x_proj(u), [m.dt_rank, m.d_state, m.d_state], dim=-1)
        assert_close("delta", scan["delta"], m.dt_proj(dt).transpose(1, 2) - m.dt_proj.bias[:, None], 1e-12)
        assert_close("B", scan["B"], B.transpose(1, 2), 1e-12)
        assert_close("C", scan["C"], C.transpose(1, 2), 1e-12)
    for name in ("u", "delta", "z", "B", "C"):
        if grad or name == "u":
            assert scan[name].stride(-1) == 1, f"{name} has l-stride {scan[name].stride(-1)}"
        else:
            assert scan[name].stride(1) == 1, f"{name} is not channel-last: strides {scan[name].stride()}"


@pytest.mark.parametrize("batch", [1, 3])
def test_channels_first_linear_is_one_gemm_without_copies(batch):
    """weight @ x along the channels of (b, i, l) equals torch.matmul's product, comes out contiguous along l, and
    runs as one batched GEMM: torch.matmul of a 2-D weight and an input that needs its gradient computes the
    product channel-last and then copies it into place (aten::clone), which at 1M tokens cost a training step a
    quarter of its time."""
    torch.manual_seed(0)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(batch, 9, 4, dtype=torch.float64, requires_grad=True).transpose(1, 2)   # (b, i, l) view
    with OpRecorder() as ops:
        y = channels_first_linear(w, x)
    assert not {"aten::clone", "aten::copy_", "aten::contiguous"} & set(ops.names), ops.names
    assert y.shape == (batch, 6, 9) and y.is_contiguous()
    assert_close("product", y, torch.matmul(w, x), 1e-12)
    gw, gx = torch.autograd.grad(y.square().sum(), (w, x))
    gw_ref, gx_ref = torch.autograd.grad(torch.matmul(w, x).square().sum(), (w, x))
    assert_close("weight grad", gw, gw_ref, 1e-12)
    assert_close("input grad", gx, gx_ref, 1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert channels_first_linear(w.float(), x.float()).dtype == torch.bfloat16


def test_mamba_projection_under_autograd_makes_no_copies():
    """in_proj in the scan's layout (under autograd) is one GEMM: no transposing copy of the activations."""
    m = Mamba(16, d_state=4)
    x = torch.randn(2, 9, 16, requires_grad=True)
    with OpRecorder() as ops:
        xz = m.project(x)
    assert "aten::clone" not in ops.names and "aten::copy_" not in ops.names, ops.names
    assert xz.transpose(1, 2).is_contiguous()


def test_scan_layout_follows_device_and_grad_mode():
    """(b, channels, l) scan inputs on CUDA always and under autograd on CPU; channel-last for CPU inference."""
    x = torch.zeros(1, 2, 3)
    with torch.no_grad():
        assert not scan_layout_l_major(x)
    with torch.enable_grad():
        assert scan_layout_l_major(x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inference_scan_inputs_run_along_l():
    """Without autograd on CUDA the mixer hands the scan l-contiguous u, delta, z, B, C (the blocked forward's
    layout), with the same values as under autograd."""
    torch.manual_seed(0)
    m = Mamba(32, d_state=4).cuda()
    x = torch.randn(2, 40, 32, device="cuda")
    with torch.no_grad():
        scan, _ = m.scan_inputs(m.project(x), None, None)
        y = m(x)
    for name in ("u", "delta", "z", "B", "C"):
        assert scan[name].stride(-1) == 1, f"{name} has l-stride {scan[name].stride(-1)}"
    assert_close("no-grad output", y, m(x).detach(), 1e-5)


def test_segment_bounds_end_at_multiples_of_16(monkeypatch):
    """Long inference: segments of segment_len, the last cut at its longest multiple of 16 (the scan's rows then
    start aligned); short or aligned ones are left whole. Below segment_len, and with autograd, the cut applies
    only on the split devices (CUDA) from SPLIT_MIN_ELEMENTS activations."""
    mixer = make("mamba")
    mixer.segment_len = 64
    h = lambda b, l: torch.empty(b, l, 0)  # noqa: E731  (shape and device are all that count)
    with torch.no_grad():
        assert mixer.segment_bounds(h(1, 150)) == [(0, 64), (64, 128), (128, 144), (144, 150)]
        assert mixer.segment_bounds(h(1, 128)) == [(0, 64), (64, 128)]
        assert mixer.segment_bounds(h(1, 7)) == [(0, 7)]
        assert mixer.segment_bounds(h(1, 37)) == [(0, 37)]  # CPU: whole
        monkeypatch.setattr(mixer, "SPLIT_DEVICES", ("cpu",))
        assert mixer.segment_bounds(h(4096, 37)) == [(0, 37)]  # 4.8M activations (b, d_inner, l): too few
        assert mixer.segment_bounds(h(1 << 16, 37)) == [(0, 32), (32, 37)]
    assert mixer.segment_bounds(h(1, 150)) == [(0, 150)]  # autograd: not by segment_len
    assert mixer.segment_bounds(h(1 << 16, 150)) == [(0, 144), (144, 150)]
    assert make("mamba2").segment_bounds(h(1 << 16, 150)) == [(0, 150)]  # CPU


@pytest.mark.parametrize("kind", MIXERS)
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_unaligned_split_equals_one_shot(kind, reverse, grad, monkeypatch):
    """A Mamba or Mamba2 input whose length is not a multiple of 16 runs as two segments where the split applies
    (CUDA, enough tokens; forced here): the same output, ssm and conv state as one shot, mask included, and with
    autograd the same gradients (through the states handed between the segments)."""
    mixer = make(kind, reverse=reverse)
    x = torch.randn(2, 37, D_MODEL, dtype=torch.float64, requires_grad=grad)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 30:] = False

    def run():
        with torch.set_grad_enabled(grad):
            out, state = mixer(x, mask=mask, return_state=True)
        if not grad:
            return out, state, ()
        loss = out.square().sum() + state.ssm.square().sum() + state.conv.square().sum()
        return out, state, torch.autograd.grad(loss, [x, mixer.in_proj.weight, mixer.A_log, mixer.conv1d.weight])

    whole, whole_state, whole_grads = run()
    monkeypatch.setattr(mixer, "SPLIT_DEVICES", ("cpu",))
    monkeypatch.setattr(mixer, "SPLIT_MIN_ELEMENTS", 1)
    calls = []
    forward = mixer._forward
    monkeypatch.setattr(mixer, "_forward", lambda h, m, s: calls.append(h.shape[1]) or forward(h, m, s))
    split, split_state, split_grads = run()
    assert sorted(calls) == [5, 32]
    assert_close("split output", split, whole, 1e-10)
    assert_close("split ssm state", split_state.ssm, whole_state.ssm, 1e-10)
    assert_close("split conv state", split_state.conv, whole_state.conv, 1e-10)
    for name, got, want in zip(("dx", "din_proj", "dA_log", "dconv"), split_grads, whole_grads):
        assert_close(name, got, want, 1e-10)
