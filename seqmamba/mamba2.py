"""Mamba-2 mixer: in_proj -> [z, x, B, C, dt]; depthwise causal conv over (x, B, C); SSD scan; gated RMSNorm;
out_proj.

Parameter names and shapes are those of mamba_ssm's ``Mamba2`` and transformers' ``Mamba2Mixer``
(``in_proj``, ``conv1d``, ``dt_bias``, ``A_log``, ``D``, ``norm.weight``, ``out_proj``).
"""
from __future__ import annotations

import torch
from torch import nn

from seqmamba.config import Mamba2Config
from seqmamba.kernels import causal_conv1d, causal_conv1d_update, selective_state_update, ssd_scan
from seqmamba.mamba import SegmentedMixer, fp32, init_dt_bias, masked_dt
from seqmamba.norm import RMSNormGated
from seqmamba.state import MixerState


class Mamba2(SegmentedMixer):
    """Mamba-2 (SSD) mixer. Input and output ``(b, l, d_model)``.

    nheads = expand * d_model / headdim; B and C are shared by ``ngroups`` groups of heads.
    ``reverse`` makes it anti-causal (flip ∘ Mamba2 ∘ flip); ``segment_len`` bounds activation memory
    without autograd (default 131072 as Mamba's; H100, same run, no-grad backbone of 8 d_model-256 layers:
    65536 -> 131072 took 4M tokens from 8.14M to 8.42M tokens/s, peak 15.5 -> 16.0 GB, and 8 x 131072 from
    8.58M to 9.34M, peak 7.3 -> 9.7 GB; 4 d_model-768 layers: +1% at 4M, +8% at 8 x 131072); ``backend`` goes
    to every kernel. On CUDA a length that is not a multiple of 16 runs as two segments, its longest multiple
    of 16 and the rest (``SegmentedMixer.segment_bounds``; H100, bf16 autocast, d_model 768, l131071: inference
    8.63 -> 4.82 ms, training 38.1 -> 28.1, against 4.56 and 25.4 at l131072).
    """

    split_unaligned = True

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, A_init_range: tuple[float, float] = (1.0, 16.0), dt_min: float = 1e-3,
                 dt_max: float = 1e-1, dt_init_floor: float = 1e-4, chunk_size: int = 256,
                 conv_bias: bool = True, bias: bool = False, norm_eps: float = 1e-5, norm_before_gate: bool = False,
                 reverse: bool = False, segment_len: int = 131072, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        Mamba2Config(d_state, d_conv, expand, headdim, ngroups, A_init_range, dt_min, dt_max, dt_init_floor,
                     chunk_size, conv_bias, bias, norm_eps, norm_before_gate)  # validates
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"Mamba2: d_inner = {self.d_inner} is not a multiple of headdim = {headdim}")
        self.headdim, self.nheads, self.ngroups = headdim, self.d_inner // headdim, ngroups
        if self.nheads % ngroups:
            raise ValueError(f"Mamba2: nheads = {self.nheads} is not a multiple of ngroups = {ngroups}")
        self.chunk_size, self.reverse, self.segment_len, self.backend = chunk_size, reverse, segment_len, backend
        self.conv_dim = self.d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=bias,
                                 **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        # dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]; A = -U(A_init_range) per head.
        self.dt_bias = nn.Parameter(init_dt_bias(self.nheads, dt_min, dt_max, dt_init_floor).to(device))
        self.dt_bias._no_weight_decay = True
        A = torch.empty(self.nheads).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(device))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.nheads, device=device))
        self.D._no_weight_decay = True
        self.norm = RMSNormGated(self.d_inner, eps=norm_eps, group_size=self.d_inner // ngroups,
                                 norm_before_gate=norm_before_gate, backend=backend, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def allocate_state(self, batch: int, device=None, dtype=torch.float32) -> MixerState:
        """Zero state: conv ``(b, conv_dim, d_conv-1)``, ssm ``(b, nheads, headdim, d_state)``."""
        device = device or self.A_log.device
        conv = torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=self.conv1d.weight.dtype)
        ssm = torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device, dtype=dtype)
        return MixerState(conv, ssm)

    def _split_xbc(self, xBC: torch.Tensor):
        """(..., conv_dim) -> x (..., nheads, headdim), B and C (..., ngroups, d_state)."""
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xBC, [self.d_inner, gn, gn], dim=-1)
        lead = xBC.shape[:-1]
        return (x.reshape(*lead, self.nheads, self.headdim), B.reshape(*lead, self.ngroups, self.d_state),
                C.reshape(*lead, self.ngroups, self.d_state))

    def _mix(self, zxbcdt, mask, state, valid_len=None):
        """zxbcdt ``(b, l, 2*d_inner + 2*g*n + nheads)`` (in_proj output) -> normed y ``(b, l, d_inner)``.
        ``valid_len`` (without a mask): positions from it on are zero padding of the input (in_proj without
        bias), made identity steps by dt = -inf (softplus 0), so that they change no real position in either
        direction (a reverse conv reads zeros there, as past the end); their outputs and the states are
        unspecified."""
        b, l, _ = zxbcdt.shape
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        if valid_len is not None and mask is None and valid_len < l:
            pad = torch.arange(l, device=dt.device) >= valid_len
            dt = dt.masked_fill(pad[:, None], float("-inf"))
        xBC = xBC.transpose(1, 2)  # (b, conv_dim, l)
        if mask is not None:
            xBC = xBC * mask.to(xBC.dtype)[:, None, :]
        xBC, conv_state = causal_conv1d(
            xBC, self.conv1d.weight, self.conv1d.bias, initial_state=None if state is None else state.conv,
            return_final_state=True, activation="silu", reverse=self.reverse, backend=self.backend)
        x, B, C = self._split_xbc(xBC.transpose(1, 2))  # (b, l, h, p), (b, l, g, n), (b, l, g, n)
        A = -torch.exp(fp32(self.A_log))  # (h,)
        dt_bias, softplus = fp32(self.dt_bias), True
        if mask is not None:
            dt, dt_bias, softplus = masked_dt(dt, dt_bias, mask.to(dt_bias.dtype)[..., None]), None, False
        y, ssm_state = ssd_scan(
            x, dt, A, B, C, chunk_size=self.chunk_size, D=fp32(self.D), dt_bias=dt_bias, dt_softplus=softplus,
            initial_state=None if state is None else state.ssm, return_final_state=True, reverse=self.reverse,
            backend=self.backend)
        return self.norm(y.reshape(b, l, self.d_inner), z), MixerState(conv_state, ssm_state)

    def step(self, hidden_states: torch.Tensor, state: MixerState) -> tuple[torch.Tensor, MixerState]:
        """One token: hidden_states ``(b, d_model)`` -> ``(b, d_model)`` and the new state."""
        if self.reverse:
            raise RuntimeError("Mamba2.step: a reverse (anti-causal) mixer cannot run one token at a time")
        b = hidden_states.shape[0]
        z, xBC, dt = torch.split(self.in_proj(hidden_states), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC, conv_state = causal_conv1d_update(xBC, state.conv, self.conv1d.weight, self.conv1d.bias,
                                               activation="silu", backend=self.backend)
        x, B, C = self._split_xbc(xBC)  # (b, h, p), (b, g, n), (b, g, n)
        # One SSD step is a selective-scan step with channels d = h*p sharing their head's dt, A and D.
        per_channel = lambda v: v.repeat_interleave(self.headdim, dim=-1)  # (.., h) -> (.., h*p)
        A = per_channel(-torch.exp(fp32(self.A_log)))[:, None].expand(self.d_inner, self.d_state)
        y, ssm = selective_state_update(
            state.ssm.reshape(b, self.d_inner, self.d_state), x.reshape(b, self.d_inner), per_channel(dt), A, B, C,
            per_channel(fp32(self.D)), delta_bias=per_channel(fp32(self.dt_bias)), delta_softplus=True,
            backend=self.backend)
        y = self.norm(y, z)
        return self.out_proj(y), MixerState(conv_state, ssm.reshape(b, self.nheads, self.headdim, self.d_state))
