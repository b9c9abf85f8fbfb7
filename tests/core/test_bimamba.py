"""BiMamba: the Caduceus definition, weight tying, combination strategies and padding masks."""
import pytest
import torch

from seqmamba import BiMamba, Mamba, Mamba2
from tests.utils import assert_close

D = 16


def make(mixer="mamba", **kw):
    extra = {"d_state": 4} if mixer == "mamba" else {"d_state": 4, "headdim": 8, "chunk_size": 4}
    model = BiMamba(D, mixer=mixer, **extra, **kw).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_weight_tie_shares_in_and_out_projections_only():
    tied, untied = make(weight_tie=True), make(weight_tie=False)
    assert tied.mamba_rev.in_proj.weight is tied.mamba_fwd.in_proj.weight
    assert tied.mamba_rev.out_proj.weight is tied.mamba_fwd.out_proj.weight
    assert tied.mamba_rev.x_proj.weight is not tied.mamba_fwd.x_proj.weight
    assert untied.mamba_rev.in_proj.weight is not untied.mamba_fwd.in_proj.weight
    n_tied = sum(p.numel() for p in tied.parameters())
    assert n_tied < sum(p.numel() for p in untied.parameters())


@pytest.mark.parametrize("mixer", ["mamba", "mamba2"])
@pytest.mark.parametrize("strategy", ["add", "ew_multiply"])
def test_matches_caduceus_definition(mixer, strategy):
    """fwd(x) (op) flip(rev(flip(x))) with rev an ordinary causal mixer holding mamba_rev's weights."""
    model = make(mixer, strategy=strategy)
    cls, kw = (Mamba, {"d_state": 4}) if mixer == "mamba" else (Mamba2, {"d_state": 4, "headdim": 8, "chunk_size": 4})
    causal_rev = cls(D, **kw).double()
    causal_rev.load_state_dict(model.mamba_rev.state_dict())
    x = torch.randn(2, 12, D, dtype=torch.float64)
    a, b = model.mamba_fwd(x), causal_rev(x.flip(1)).flip(1)
    expected = a + b if strategy == "add" else a * b
    assert_close(f"BiMamba {strategy}", model(x), expected, 1e-10)


@pytest.mark.parametrize("mixer", ["mamba", "mamba2"])
def test_padding_mask_left_and_right(mixer):
    model = make(mixer)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    reference = model(x)
    pad = 50 * torch.randn(2, 3, D, dtype=torch.float64)
    for padded, real in ((torch.cat([x, pad], 1), slice(0, 9)), (torch.cat([pad, x], 1), slice(3, 12))):
        mask = torch.zeros(2, 12, dtype=torch.bool)
        mask[:, real] = True
        assert_close("BiMamba with padding", model(padded, mask=mask)[:, real], reference, 1e-10)
    unmasked = model(torch.cat([x, pad], 1))[:, :9]
    assert (unmasked - reference).abs().max() > 1e-3, "without a mask the reverse direction must see the pads"


def test_bad_arguments():
    with pytest.raises(ValueError, match="strategy"):
        BiMamba(D, strategy="concat")
    with pytest.raises(ValueError, match="mixer"):
        BiMamba(D, mixer="lstm")


@pytest.mark.parametrize("mixer", ["mamba", "mamba2"])
@pytest.mark.parametrize("bias", [False, True])
def test_shared_projections_run_once_and_match_two_mixers(mixer, bias):
    """Tied + add: one in_proj and one out_proj call, equal to summing the two mixers' own outputs."""
    model = make(mixer, bias=bias)
    assert model.shares_projections
    calls = []
    project = model.mamba_fwd.project  # Mamba applies in_proj through its weight (a (b, 2*d_inner, l) product)
    model.mamba_fwd.project = lambda h: (calls.append("in"), project(h))[1]
    model.mamba_rev.project = lambda h: (calls.append("in_rev"), project(h))[1]
    model.mamba_fwd.out_proj.register_forward_hook(lambda *args: calls.append("out"))
    x = torch.randn(2, 11, D, dtype=torch.float64)
    fused = model(x)
    assert calls == ["in", "out"]
    separate = model.mamba_fwd(x) + model.mamba_rev(x)
    assert_close(f"shared projections (bias={bias})", fused, separate, 1e-10)
    with torch.no_grad():  # long inference falls back to the segmented two-mixer path
        model.mamba_fwd.segment_len = model.mamba_rev.segment_len = 4
        assert_close("segmented BiMamba", model(x), fused, 1e-10)


def test_untied_or_multiplied_directions_do_not_share():
    assert not make(weight_tie=False).shares_projections
    assert not make(strategy="ew_multiply").shares_projections


@pytest.mark.parametrize("mixer", ["mamba", "mamba2"])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("bias,masked", [(False, False), (False, True), (True, False)])
def test_alignment_pad_changes_nothing(mixer, grad, bias, masked, monkeypatch):
    """Where a length that is not a multiple of 16 is padded to one (CUDA, enough tokens; forced here), the
    shared-projection path gives the same output and gradients as unpadded: zero rows made identity steps by
    delta (Mamba2: dt) = -inf, or masked (a caller's mask, or an in_proj bias that makes x nonzero there); Mamba
    mixers fused without autograd, two scans with it."""
    model = make(mixer, bias=bias)
    x = torch.randn(2, 37, D, dtype=torch.float64, requires_grad=grad)
    mask, real = None, 1.0
    if masked:
        mask = torch.ones(2, 37, dtype=torch.bool)
        mask[0, :5] = False
        real = mask[..., None]  # masked positions' outputs are unspecified

    def run():
        with torch.set_grad_enabled(grad):
            out = model(x, mask=mask)
        if not grad:
            return out, ()
        dt_bias = model.mamba_fwd.dt_proj.bias if mixer == "mamba" else model.mamba_fwd.dt_bias
        params = [model.mamba_fwd.in_proj.weight, model.mamba_rev.A_log, dt_bias, model.mamba_rev.conv1d.weight]
        return out, torch.autograd.grad((out * real).square().sum(), [x, *params])

    assert model.alignment_pad(x) == 0  # CPU
    want, want_grads = run()
    monkeypatch.setattr(model.mamba_fwd, "SPLIT_DEVICES", ("cpu",))
    monkeypatch.setattr(model.mamba_fwd, "SPLIT_MIN_ELEMENTS", 1)
    assert model.alignment_pad(x) == 11
    seen = []
    project = model.mamba_fwd.project
    monkeypatch.setattr(model.mamba_fwd, "project", lambda h: seen.append(h.shape[1]) or project(h))
    got, got_grads = run()
    assert seen == [48] and got.shape == want.shape
    assert_close("padded output", got * real, want * real, 1e-10)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert_close(f"padded grad {i}", g, w, 1e-10)
