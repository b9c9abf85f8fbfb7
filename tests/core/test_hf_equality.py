"""Our mixers load transformers' MambaMixer / Mamba2Mixer state dicts unchanged and give the same outputs."""
import pytest
import torch

from seqmamba import Mamba, Mamba2
from tests.utils import assert_close

transformers = pytest.importorskip("transformers")


def randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))


@pytest.mark.parametrize("d_model,d_state,dt_rank,conv_bias", [(32, 8, 4, True), (24, 16, 2, False)])
def test_mamba_matches_transformers(d_model, d_state, dt_rank, conv_bias):
    from transformers.models.mamba.modeling_mamba import MambaConfig, MambaMixer

    cfg = MambaConfig(hidden_size=d_model, state_size=d_state, conv_kernel=4, expand=2, time_step_rank=dt_rank,
                      use_conv_bias=conv_bias, use_bias=False, hidden_act="silu", use_mambapy=False)
    hf = MambaMixer(cfg, layer_idx=0).eval()
    randomize(hf)
    ours = Mamba(d_model, d_state=d_state, d_conv=4, expand=2, dt_rank=dt_rank, conv_bias=conv_bias).eval()
    ours.load_state_dict(hf.state_dict())  # strict: every name and shape matches
    x = torch.randn(2, 37, d_model)
    with torch.no_grad():
        assert_close("Mamba vs MambaMixer", ours(x), hf(x), 1e-5)


@pytest.mark.parametrize("ngroups,headdim,chunk", [(1, 8, 16), (2, 8, 8), (4, 4, 16)])
def test_mamba2_matches_transformers(ngroups, headdim, chunk):
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Config, Mamba2Mixer

    d_model, d_state = 32, 16
    nheads = 2 * d_model // headdim
    cfg = Mamba2Config(hidden_size=d_model, num_heads=nheads, head_dim=headdim, state_size=d_state, expand=2,
                       n_groups=ngroups, conv_kernel=4, chunk_size=chunk, use_conv_bias=True, use_bias=False,
                       layer_norm_epsilon=1e-5, hidden_act="silu", time_step_limit=(0.0, float("inf")))
    hf = Mamba2Mixer(cfg, layer_idx=0).eval()
    randomize(hf)
    ours = Mamba2(d_model, d_state=d_state, headdim=headdim, ngroups=ngroups, chunk_size=chunk).eval()
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 45, d_model)  # not a multiple of the chunk
    with torch.no_grad():
        assert_close("Mamba2 vs Mamba2Mixer", ours(x), hf(x), 2e-5)
