"""DNA models: RC equivariance (PS) and conjoining (Ph), pooling and padding, heads, and loading released
Caduceus checkpoints against an independent implementation of the original math."""
import json
import os

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from seqmamba import MambaConfig
from seqmamba.tasks.dna.checkpoints import UnsafeCheckpointError, load_caduceus_mlm
from seqmamba.tasks.dna.model import (CaduceusConfig, CaduceusForMaskedLM, CaduceusWithHead, flip_padded,
                                      masked_pool, rc_padded)
from tests.utils import assert_close

CMAP = torch.tensor([0, 1, 2, 3, 4, 5, 6, 10, 9, 8, 7, 11, 12, 13, 14, 15])


def perturb(module, scale=0.1):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def config(rcps, **kw):
    return CaduceusConfig(d_model=8, n_layer=2, rcps=rcps, mamba=MambaConfig(d_state=4), **kw)


def padded_batch():
    """Two sequences, lengths 11 and 7 (right-padded with [PAD]=4)."""
    ids = torch.randint(7, 12, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False
    ids[1, 7:] = 4
    return ids, mask


def rc_by_hand(ids, mask):
    """Reverse complement of each sequence within its length, written with Python lists."""
    out = ids.clone()
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        out[b, :n] = CMAP[ids[b, :n].flip(0)]
    return out


def test_rc_padded_matches_hand_reverse_complement():
    ids, mask = padded_batch()
    assert torch.equal(rc_padded(ids, mask, CMAP), rc_by_hand(ids, mask))
    left = torch.tensor([[4, 4, 7, 8, 9]])
    lmask = left != 4
    assert rc_padded(left, lmask, CMAP).tolist() == [[4, 4, 8, 9, 10]]


def test_ps_mlm_equivariance_end_to_end():
    """logits(rc(x)) == complement-permuted logits(x), flipped within each sequence."""
    model = perturb(CaduceusForMaskedLM(config(True))).double()
    ids, mask = padded_batch()
    logits = model(ids, mask)
    logits_rc = model(rc_by_hand(ids, mask), mask)
    expected = flip_padded(logits, mask)[..., CMAP]
    assert_close("PS logits under RC", logits_rc[mask], expected[mask], 1e-12)
    assert not torch.allclose(logits[mask], expected[mask])  # the symmetry is not trivial


def test_ph_conjoining_is_equivariant_and_plain_ph_is_not():
    model = perturb(CaduceusForMaskedLM(config(False))).double()
    ids, mask = padded_batch()
    ids_rc = rc_by_hand(ids, mask)
    conj = model(ids, mask, conjoin=True)
    conj_rc = model(ids_rc, mask, conjoin=True)
    assert_close("conjoined Ph under RC", conj_rc[mask], flip_padded(conj, mask)[..., CMAP][mask], 1e-12)
    plain, plain_rc = model(ids, mask), model(ids_rc, mask)
    assert (plain_rc[mask] - flip_padded(plain, mask)[..., CMAP][mask]).abs().max() > 1e-3
    # by hand: conjoined = mean of the model on x and the mapped-back model on rc(x)
    back = torch.stack([plain_rc[b, : int(mask[b].sum())].flip(0) for b in range(2)][:1])
    assert_close("conjoin formula", conj[0], 0.5 * (plain[0] + back[0][..., CMAP]), 1e-12)


@pytest.mark.parametrize("pooling", ["mean", "max", "first", "last"])
def test_masked_pooling_by_hand_and_ignores_padding(pooling):
    hidden = torch.randn(2, 5, 3, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [False, True, True, True, False]])  # second row padded on both sides
    pooled = masked_pool(hidden, mask, pooling)
    real = hidden[1, 1:4]
    expect = {"mean": real.mean(0), "max": real.max(0).values, "first": real[0], "last": real[-1]}[pooling]
    assert_close(f"{pooling} pooling", pooled[1], expect, 1e-12)
    junk = hidden.clone()
    junk[1, 0], junk[1, 4] = 1e6, -1e6
    assert_close("padding ignored", masked_pool(junk, mask, pooling), pooled, 1e-12)


@pytest.mark.parametrize("rcps", [True, False])
@pytest.mark.parametrize("pooling", ["mean", "max", "first", "last"])
def test_sequence_head_rc_invariant_and_equivariant(rcps, pooling):
    ids, mask = padded_batch()
    ids_rc = rc_by_hand(ids, mask)
    inv = perturb(CaduceusWithHead(config(rcps), 3, pooling=pooling)).double()
    conjoin = not rcps
    assert_close("invariant head", inv(ids_rc, mask, conjoin), inv(ids, mask, conjoin), 1e-12)
    eq = perturb(CaduceusWithHead(config(rcps), 3, pooling=pooling, rc_mode="equivariant",
                                  label_permutation=[1, 0, 2])).double()
    out = eq(ids, mask, conjoin)
    assert_close("equivariant head", eq(ids_rc, mask, conjoin), out[:, [1, 0, 2]], 1e-12)
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-4  # strand classes stay apart


def test_token_head_equivariance():
    ids, mask = padded_batch()
    model = perturb(CaduceusWithHead(config(True), 2, level="token", rc_mode="equivariant",
                                     label_permutation=[1, 0])).double()
    out, out_rc = model(ids, mask), model(rc_by_hand(ids, mask), mask)
    assert_close("token head", out_rc[mask], flip_padded(out, mask)[..., [1, 0]][mask], 1e-12)


@pytest.mark.parametrize("rcps", [True, False])
def test_padding_does_not_change_outputs(rcps):
    model = perturb(CaduceusWithHead(config(rcps), 2, pooling="mean")).double()
    ids = torch.randint(7, 11, (1, 9))
    ref = model(ids, None, conjoin=not rcps)
    padded = torch.cat([ids, torch.full((1, 6), 4)], 1)
    mask = torch.arange(15)[None] < 9
    assert_close("padded head output", model(padded, mask, conjoin=not rcps), ref, 1e-12)


def test_equivariant_head_needs_an_involution():
    with pytest.raises(ValueError, match="involution"):
        CaduceusWithHead(config(True), 3, rc_mode="equivariant", label_permutation=[1, 2, 0])
    with pytest.raises(ValueError, match="label_permutation"):
        CaduceusWithHead(config(True), 2, rc_mode="equivariant")


# --------------------------------------------------------------------------------- released checkpoints

def released_keys(rcps: bool, n_layer: int) -> list[str]:
    """Key names of the released Caduceus masked-LM checkpoints (written from the documented layout)."""
    p = "caduceus.backbone."
    sub = ".submodule" if rcps else ""
    keys = [p + ("embeddings.word_embeddings.embedding.weight" if rcps else "embeddings.word_embeddings.weight")]
    if rcps:
        keys.append(p + "embeddings.word_embeddings.complement_map")
    for i in range(n_layer):
        keys.append(f"{p}layers.{i}.norm{sub}.weight")
        for d in ("fwd", "rev"):
            for name in ("A_log", "D", "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
                         "dt_proj.weight", "dt_proj.bias", "out_proj.weight"):
                keys.append(f"{p}layers.{i}.mixer{sub}.mamba_{d}.{name}")
    keys.append(f"{p}norm_f{sub}.weight")
    keys += ["lm_head.complement_map", "lm_head.lm_head.weight"] if rcps else ["lm_head.weight"]
    return keys


def released_state(rcps: bool, d: int, n_layer: int, d_state: int = 4) -> dict[str, torch.Tensor]:
    di, r = 2 * d, -(-d // 16)
    shapes = {"A_log": (di, d_state), "D": (di,), "in_proj.weight": (2 * di, d), "conv1d.weight": (di, 1, 4),
              "conv1d.bias": (di,), "x_proj.weight": (r + 2 * d_state, di), "dt_proj.weight": (di, r),
              "dt_proj.bias": (di,), "out_proj.weight": (d, di)}
    state = {}
    emb = 0.3 * torch.randn(16, d)
    for key in released_keys(rcps, n_layer):
        if key.endswith("complement_map"):
            state[key] = CMAP.clone()
        elif "word_embeddings" in key or key.startswith("lm_head"):
            state[key] = emb
        elif "norm" in key:
            state[key] = 1 + 0.1 * torch.randn(d)
        else:
            name = key.split(".mamba_")[1].split(".", 1)[1]
            state[key] = 0.3 * torch.randn(shapes[name])
            if name == "A_log":
                state[key] = torch.log(torch.arange(1, d_state + 1.0)).repeat(di, 1) + 0.1 * torch.randn(di, d_state)
    for key in list(state):  # in_proj / out_proj are tied between the directions
        if ".mamba_rev." in key and key.endswith(("in_proj.weight", "out_proj.weight")):
            state[key] = state[key.replace("mamba_rev", "mamba_fwd")]
    return state


def reference_logits(state: dict, rcps: bool, d: int, n_layer: int, ids: torch.Tensor) -> torch.Tensor:
    """The original Caduceus forward written out: transformers' MambaMixer per direction (flip in, flip out),
    pre-norm residual blocks with RMSNorm, final norm, tied LM head; PS applies every sublayer to both
    strands with the RC strand flipped over length and channels."""
    from transformers.models.mamba.modeling_mamba import MambaConfig as HFConfig, MambaMixer

    p = "caduceus.backbone."
    sub = ".submodule" if rcps else ""

    def mixer(i, direction):
        cfg = HFConfig(hidden_size=d, state_size=state[f"{p}layers.0.mixer{sub}.mamba_fwd.A_log"].shape[1],
                       conv_kernel=4, expand=2, time_step_rank=-(-d // 16), use_conv_bias=True, use_bias=False,
                       hidden_act="silu", use_mambapy=False)
        m = MambaMixer(cfg, layer_idx=0).double()
        prefix = f"{p}layers.{i}.mixer{sub}.mamba_{direction}."
        m.load_state_dict({k[len(prefix):]: v.double() for k, v in state.items() if k.startswith(prefix)})
        return m

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()

    def bimamba(i, x):
        fwd, rev = mixer(i, "fwd"), mixer(i, "rev")
        return fwd(x) + rev(x.flip(1)).flip(1)

    def both(f, h):  # RCPS: f on the forward strand and on the (un-flipped) RC strand
        if not rcps:
            return f(h)
        h1, h2 = h[..., :d], h[..., d:]
        return torch.cat([f(h1), f(h2.flip(1, 2)).flip(1, 2)], -1)

    cmap = CMAP
    if rcps:
        emb = state[p + "embeddings.word_embeddings.embedding.weight"].double()
        hidden = torch.cat([emb[ids], emb[cmap[ids.flip(1)]].flip(1, 2)], -1)
    else:
        emb = state[p + "embeddings.word_embeddings.weight"].double()
        hidden = emb[ids]
    residual = None
    with torch.no_grad():
        for i in range(n_layer):
            residual = hidden if residual is None else residual + hidden
            w = state[f"{p}layers.{i}.norm{sub}.weight"]
            normed = both(lambda x: rms(x, w), residual)
            hidden = both(lambda x: bimamba(i, x), normed)
        residual = residual + hidden
        out = both(lambda x: rms(x, state[f"{p}norm_f{sub}.weight"]), residual)
        if rcps:
            return F.linear(out[..., :d], emb) + F.linear(out[..., d:].flip(-1), emb[cmap])
        return F.linear(out, emb)


def write_released(tmp_path, rcps, d, n_layer, fmt="safetensors", drop_tied=True):
    state = released_state(rcps, d, n_layer)
    folder = tmp_path / f"caduceus-{'ps' if rcps else 'ph'}"
    folder.mkdir()
    cfg = {"model_type": "caduceus", "d_model": d, "n_layer": n_layer, "vocab_size": 12,
           "pad_vocab_size_multiple": 8, "rcps": rcps, "bidirectional": True, "bidirectional_strategy": "add",
           "bidirectional_weight_tie": True, "rms_norm": True, "residual_in_fp32": False, "fused_add_norm": True,
           "norm_epsilon": 1e-5, "complement_map": {str(i): int(CMAP[i]) for i in range(12)},
           "ssm_cfg": {"d_state": 4, "d_conv": 4, "expand": 2, "dt_min": 0.001, "dt_max": 0.1,
                       "dt_init_floor": 1e-4, "conv_bias": True, "bias": False}}
    (folder / "config.json").write_text(json.dumps(cfg))
    if fmt == "safetensors":
        # safetensors refuses shared tensors: store each tied tensor once, under its first name (as HF does)
        seen, out = {}, {}
        for key, value in state.items():
            if drop_tied and id(value) in seen:
                continue
            seen[id(value)] = key
            out[key] = value.clone().contiguous()
        safetensors.torch.save_file(out, folder / "model.safetensors")
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder, state


@pytest.mark.parametrize("rcps,d,n_layer,fmt", [(True, 16, 2, "safetensors"), (False, 16, 2, "safetensors"),
                                                (True, 24, 3, "bin"), (False, 8, 1, "bin")])
def test_released_checkpoint_matches_original_math(tmp_path, rcps, d, n_layer, fmt):
    pytest.importorskip("transformers")
    folder, state = write_released(tmp_path, rcps, d, n_layer, fmt)
    model = load_caduceus_mlm(folder).double().eval()
    assert model.config.rcps == rcps and model.config.n_layer == n_layer and model.config.d_model == d
    ids = torch.randint(7, 12, (2, 13))
    with torch.no_grad():
        ours = model(ids)
    # transformers computes A = -exp(A_log.float()) in float32: agreement to float32 rounding
    assert_close("Caduceus logits", ours, reference_logits(state, rcps, d, n_layer, ids), 1e-6)


def test_released_checkpoint_errors(tmp_path):
    folder, state = write_released(tmp_path, True, 16, 1)
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    bad = dict(tensors)
    bad.pop("caduceus.backbone.layers.0.mixer.submodule.mamba_rev.A_log")
    safetensors.torch.save_file(bad, folder / "model.safetensors")
    with pytest.raises(ValueError, match="missing key.*mamba_rev.A_log"):
        load_caduceus_mlm(folder)
    bad = dict(tensors)
    bad["caduceus.backbone.layers.0.extra.weight"] = torch.zeros(1)
    safetensors.torch.save_file(bad, folder / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected key"):
        load_caduceus_mlm(folder)


class _Payload:
    """Pickles into a call of os.system: what a malicious pytorch_model.bin does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_needs_code_is_refused(tmp_path):
    folder, state = write_released(tmp_path, False, 8, 1, fmt="bin")
    marker = tmp_path / "pwned"
    torch.save({**state, "evil": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        load_caduceus_mlm(folder)
    assert not marker.exists()


def test_save_pretrained_round_trip(tmp_path):
    model = perturb(CaduceusForMaskedLM(config(True)))
    model.save_pretrained(tmp_path / "m")
    again = load_caduceus_mlm(tmp_path / "m")
    ids = torch.randint(7, 11, (1, 6))
    assert_close("reloaded", again(ids), model(ids), 0.0)
    assert again.lm_head.lm_head.weight is again.caduceus.embeddings.word_embeddings.embedding.weight
