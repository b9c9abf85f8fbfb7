"""MambaBackbone: config validation, save/load, streaming, stepping, checkpointing, checkpoint key layout."""
import json

import pytest
import torch

from seqmamba import BackboneConfig, Mamba2Config, MambaBackbone, MambaConfig
from tests.utils import assert_close

SMALL = {"mamba": MambaConfig(d_state=4), "mamba2": Mamba2Config(d_state=4, headdim=8, chunk_size=4)}


def build(mixer="mamba", dtype=torch.float64, **kw):
    cfg = BackboneConfig(d_model=16, n_layer=2, mixer=mixer, mamba=SMALL["mamba"], mamba2=SMALL["mamba2"], **kw)
    model = MambaBackbone(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("field,value,match", [
    ("mixer", "lstm", "mixer"), ("norm", "batchnorm", "norm"), ("n_layer", 0, "n_layer"),
    ("bidirectional_strategy", "cat", "bidirectional_strategy"), ("d_model", 100, "headdim"),
])
def test_config_rejects_contradictions(field, value, match):
    kwargs = {"mixer": "mamba2"} if field == "d_model" else {}
    with pytest.raises(ValueError, match=match):
        BackboneConfig(**{**kwargs, field: value})


def test_config_round_trips_through_json():
    cfg = BackboneConfig(d_model=32, mixer="mamba2", mamba2=Mamba2Config(headdim=16), rcps=True)
    again = BackboneConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown field"):
        BackboneConfig.from_dict({**cfg.to_dict(), "d_modle": 3})


@pytest.mark.parametrize("kw", [{"mixer": "mamba"}, {"mixer": "mamba2", "norm": "layernorm"},
                                {"mixer": "mamba", "bidirectional": True, "rcps": True}])
def test_save_pretrained_round_trip(tmp_path, kw):
    model = build(dtype=torch.float32, **kw)
    width = 32 if kw.get("rcps") else 16
    x = torch.randn(2, 9, width)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = MambaBackbone.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert_close("reloaded output", loaded(x), model(x), 0.0)
    if kw.get("rcps"):  # tied projections stay tied after loading
        mixer = loaded.layers[0].mixer.submodule
        assert mixer.mamba_rev.in_proj.weight is mixer.mamba_fwd.in_proj.weight


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        MambaBackbone.from_pretrained(tmp_path)
    build(dtype=torch.float32).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(ValueError, match="missing keys"):
        MambaBackbone.from_pretrained(tmp_path)


@pytest.mark.parametrize("mixer", ["mamba", "mamba2"])
def test_streaming_and_stepping_equal_one_shot(mixer):
    model = build(mixer)
    x = torch.randn(2, 14, 16, dtype=torch.float64)
    full = model(x)
    states, outs = None, []
    for piece in (slice(0, 3), slice(3, 4), slice(4, 14)):
        y, states = model(x[:, piece], states=states, return_states=True)
        outs.append(y)
    assert_close("streamed backbone", torch.cat(outs, 1), full, 1e-10)
    states, outs = model.allocate_states(2, dtype=torch.float64), []
    for t in range(14):
        y, states = model.step(x[:, t], states)
        outs.append(y)
    assert_close("stepped backbone", torch.stack(outs, 1), full, 1e-10)


def test_streaming_refused_for_bidirectional():
    model = build(bidirectional=True)
    with pytest.raises(ValueError, match="causal"):
        model(torch.randn(1, 4, 16, dtype=torch.float64), return_states=True)


def test_activation_checkpointing_gives_same_gradients():
    plain = build(bidirectional=True)
    ckpt = build(bidirectional=True, checkpoint_activations=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    plain(x).square().sum().backward()
    ckpt.train()
    ckpt(x).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert_close(f"grad {name}", q.grad, p.grad, 1e-10)


@pytest.mark.parametrize("kw", [{"bidirectional": True}, {"mixer": "mamba2", "bidirectional": True}, {}])
def test_backbone_padding_invariance(kw):
    model = build(**kw)
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    reference = model(x)
    padded = torch.cat([x, torch.randn(2, 5, 16, dtype=torch.float64)], 1)
    mask = torch.arange(13) < 8
    out = model(padded, mask=mask.expand(2, 13))
    assert_close("backbone with padding", out[:, :8], reference, 1e-10)


def test_caduceus_key_layout():
    """Key names of a PS and a Ph backbone follow the released Caduceus checkpoints (minus the prefix)."""
    def keys(rcps):
        cfg = BackboneConfig(d_model=16, n_layer=1, bidirectional=True, rcps=rcps)
        return set(MambaBackbone(cfg).state_dict())
    wrap = lambda name: f"{name}.submodule"
    for rcps in (True, False):
        mixer = "layers.0.mixer" + (".submodule" if rcps else "")
        expected = {f"{mixer}.mamba_{d}.{p}" for d in ("fwd", "rev") for p in (
            "A_log", "D", "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
            "dt_proj.bias", "out_proj.weight")}
        expected |= {(wrap("layers.0.norm") if rcps else "layers.0.norm") + ".weight",
                     (wrap("norm_f") if rcps else "norm_f") + ".weight"}
        assert keys(rcps) == expected



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_activation_checkpointing_holds_one_tensor_per_block():
    """Under checkpointing each block keeps only its residual alive until the backward: the block's output
    feeds only the next residual add, which saves nothing. Two tensors per block is what made 1M-token
    training of a 16-layer Caduceus run out of memory."""
    def held_after_forward(n_layer):
        cfg = BackboneConfig(d_model=64, n_layer=n_layer, bidirectional=True, checkpoint_activations=True)
        model = MambaBackbone(cfg).cuda().train()
        x = torch.randn(1, 2**16, 64, device="cuda", requires_grad=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        out = model(x)
        torch.cuda.synchronize()
        held = (torch.cuda.memory_allocated() - base) / (x.numel() * x.element_size())
        out.sum().backward()
        assert torch.isfinite(x.grad).all()
        return held

    per_block = (held_after_forward(8) - held_after_forward(4)) / 4  # H100: 1.5 now, 2.5 before the fix
    assert per_block <= 2.0, f"{per_block:.2f} (b, l, d_model) tensors held per block after the forward"


@pytest.mark.parametrize("kw", [{"bidirectional": True, "rcps": True}, {"bidirectional": True}, {},
                                {"residual_in_fp32": False}])
def test_inference_path_matches_and_leaves_the_input_alone(kw):
    """Without autograd the residual is added in place and long inputs run in segments (BiMamba's reverse
    segments add into the forward output): same output as with autograd, and the caller's tensor unchanged."""
    model = build(**kw)
    for m in model.modules():
        if hasattr(m, "segment_len"):
            m.segment_len = 4
    x = torch.randn(2, 11, model.config.d_model * (2 if kw.get("rcps") else 1), dtype=torch.float64)
    before = x.clone()
    reference = model(x)  # grad mode: out-of-place adds, no segments
    with torch.no_grad():
        out = model(x)
    assert torch.equal(x, before)
    assert_close("no-grad backbone", out, reference.detach(), 1e-10)


def test_segmented_output_takes_the_segments_dtype():
    """Under autocast the segmented mixer returns what its segments return (bf16), as the unsegmented one."""
    from seqmamba import Mamba
    m = Mamba(16, d_state=4, segment_len=4)
    x = torch.randn(2, 11, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        whole = m(x[:, :4])
        seg = m(x)
    assert seg.dtype == whole.dtype == torch.bfloat16
    assert seg.shape == (2, 11, 16)


@pytest.mark.parametrize("kw", [{"bidirectional": True, "rcps": True}, {"mixer": "mamba2"}, {}])
def test_no_grad_mixers_get_the_normed_input_in_the_autocast_dtype(kw):
    """Without autograd under autocast, each block hands its mixer the normed input in the autocast dtype (half
    the memory of the fp32 norm output, at full length); with autograd the mixer gets the norm's fp32 output.
    Exact either way: the mixer's in_proj casts its input so itself."""
    model = build(dtype=torch.float32, **kw)
    seen = []
    for layer in model.layers:
        layer.mixer.register_forward_pre_hook(lambda _, args, kwargs: seen.append(args[0].dtype), with_kwargs=True)
    x = torch.randn(2, 11, model.config.d_model * (2 if kw.get("rcps") else 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        grad_dtypes, seen[:] = list(seen), []
        with torch.no_grad():
            model(x)
            for layer in model.layers:
                h = torch.randn(2, 11, x.shape[-1])
                assert torch.equal(layer.mixer(h), layer.mixer(h.to(torch.bfloat16))), "in_proj does not cast"
    assert grad_dtypes == [torch.float32] * len(model.layers)
    assert seen[:len(model.layers)] == [torch.bfloat16] * len(model.layers)
