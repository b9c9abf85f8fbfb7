"""Mamba-1 mixer: in_proj -> depthwise causal conv -> selective scan gated by z -> out_proj.

Parameter names and shapes are those of mamba_ssm's ``Mamba`` and transformers' ``MambaMixer``, so their
state dicts load unchanged. ``reverse=True`` makes the anti-causal mixer (flip ∘ Mamba ∘ flip along the
length) without flipping any tensor, which is what BiMamba's backward direction is.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqmamba.config import MambaConfig
from seqmamba.kernels import ROW_ALIGN, causal_conv1d, causal_conv1d_update, selective_scan, selective_state_update
from seqmamba.state import MixerState


def init_dt_bias(d_inner: int, dt_min: float, dt_max: float, dt_init_floor: float) -> torch.Tensor:
    """Inverse softplus of dt ~ log-uniform[dt_min, dt_max] (floored), so softplus(bias) = dt at init."""
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


def fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    """Parameters enter the scans in float32, or float64 when the model runs in float64."""
    return t if t is None or t.dtype == torch.float64 else t.float()


def masked_dt(dt: torch.Tensor, dt_bias: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softplus(dt + bias), zero at padding, so that padded positions leave the state untouched.

    dt: ``(..., l, c)`` or any shape broadcasting with ``mask`` after the caller's reshape.
    """
    return F.softplus(fp32(dt) + dt_bias) * mask


def scan_layout_l_major(x: torch.Tensor) -> bool:
    """Storage of the Mamba-1 scan's inputs u, delta, z, B, C for activations like ``x`` (the values are the same
    either way): (b, channels, l) where True, else channel-last views of (b, l, .) tensors.

    On CUDA always (b, channels, l): the blocked kernels read each channel along l and copy anything else (a
    transposing copy of delta and z costs as much as the scan at 1M tokens). Without autograd the channel-last
    layout had been kept for the sequential forward, which reads it in place; since the projections became one
    batched GEMM each (:func:`channels_first_linear`), the blocked forward on (b, channels, l) inputs is faster
    (H100, same run, no-grad: Mamba d_model 768 at 1M tokens 41 vs 51 ms, BiMamba at b8 x 2k 1.35 vs 2.57 ms; the
    Caduceus-size backbone at 1M tokens 791k vs 666k tokens/s). On CPU the reference runs either way and the
    layout follows grad mode, as before."""
    return x.is_cuda or torch.is_grad_enabled()


def channels_first_linear(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight ``(o, i)`` applied along the channels of x ``(b, i, l)``: ``(b, o, l)``, contiguous along l.

    One batched GEMM with the weight broadcast over the batch. ``torch.matmul(weight, x)`` computes the same
    product channel-last and then copies it into place: at 1M tokens those transposing copies cost a Mamba
    training step (d_model 768, H100) 78 ms of 310. Under autocast both operands take the autocast dtype first,
    so that the broadcast weight is cast once, not once per batch row."""
    dtype = autocast_dtype(x)
    return torch.bmm(weight.to(dtype).unsqueeze(0).expand(x.shape[0], -1, -1), x.to(dtype))


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` computes in: autocast's for x's device where it is on, else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class SegmentedMixer(nn.Module):
    """What Mamba and Mamba2 share: the call signature, streaming state, and segmented inference.

    Subclasses own ``in_proj`` and ``out_proj`` and define ``_mix(projected, mask, state) -> (y, new_state)``,
    everything between the two projections (``y`` is ``(b, l, d_inner)``), and the attributes ``reverse`` and
    ``segment_len``. BiMamba calls ``_mix`` directly to share one in_proj and one out_proj between directions.
    """

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None,
                state: MixerState | None = None, return_state: bool = False):
        """hidden_states ``(b, l, d_model)`` -> ``(b, l, d_model)``; mask ``(b, l)`` bool/0-1, False at padding
        (on either side).

        ``state`` is the state after the previous segment (scan order); with ``return_state`` the state after
        this segment is returned too: ``(out, state)``. Padded positions never change the state or the outputs
        of real positions; their own outputs are unspecified.
        """
        if len(self.segment_bounds(hidden_states)) > 1:
            out, new_state = self._forward_segments(hidden_states, mask, state)
        else:
            out, new_state = self._forward(hidden_states, mask, state)
        return (out, new_state) if return_state else out

    # Segments end at multiples of ROW_ALIGN positions, except a last one of fewer: at other lengths the rows of
    # the (b, d, l) scan and conv inputs start unaligned, and the Triton scan and conv copy them into padded rows
    # (the conv ran 2.4x slower before it did; these figures are from then). H100, Mamba d_model 768 under bf16 autocast, l131071 against l131072: inference
    # 13.8 ms whole, 5.1 split, 4.7 aligned; training 48.4, 28.0, 24.8. A mixer class with ``split_unaligned``
    # splits such a length even when it would run whole (with autograd too: the states between the two segments
    # carry gradients), on the SPLIT_DEVICES (those of the Triton kernels), from SPLIT_MIN_ELEMENTS (b * d_inner * l):
    # below that the tail's own call costs more host time than the misalignment costs the GPU (H100, d_model 768,
    # whole / split ms: b8 l2047 inference 1.76 / 2.71, training 6.55 / 10.14; b1 l32767 3.57 / 1.89 and
    # 12.76 / 10.24; d_model 64 b256 l199 1.76 / 2.71, 5.39 / 10.23).
    ROW_ALIGN = ROW_ALIGN  # the kernels' (seqmamba.kernels.ROW_ALIGN)
    SPLIT_MIN_ELEMENTS = 5 << 23
    SPLIT_DEVICES = ("cuda",)
    split_unaligned = False

    def aligns_lengths(self, hidden_states: torch.Tensor) -> bool:
        """Whether an unaligned length of ``hidden_states`` ``(b, l, d_model)`` is worth avoiding when it would
        otherwise run whole: ``split_unaligned``, a SPLIT_DEVICES tensor, at least SPLIT_MIN_ELEMENTS
        activations (b, d_inner, l)."""
        b, length = hidden_states.shape[:2]
        return (self.split_unaligned and hidden_states.device.type in self.SPLIT_DEVICES
                and b * length * self.d_inner >= self.SPLIT_MIN_ELEMENTS)

    def segment_bounds(self, hidden_states: torch.Tensor) -> list[tuple[int, int]]:
        """(start, stop) of the segments ``forward`` runs ``hidden_states`` ``(b, l, d_model)`` in, in address
        order: without autograd, pieces of ``segment_len`` when l is longer; each cut at its last multiple of
        ROW_ALIGN where it is longer than that and not one itself (below segment_len, and with autograd, only
        where :meth:`aligns_lengths`). One (0, l): run whole."""
        length = hidden_states.shape[1]
        if not torch.is_grad_enabled() and length > self.segment_len:
            seg, cut_ok = self.segment_len, True
        else:
            seg, cut_ok = max(length, 1), self.aligns_lengths(hidden_states)
        bounds = []
        for start in range(0, length, seg):
            stop = min(start + seg, length)
            cut = start + (stop - start) // self.ROW_ALIGN * self.ROW_ALIGN
            bounds += [(start, cut), (cut, stop)] if cut_ok and start < cut < stop else [(start, stop)]
        return bounds or [(0, 0)]

    def _forward_segments(self, hidden_states, mask, state, add_to=None):
        """The segments' outputs into one tensor of their dtype (bf16 under autocast, as the unsegmented
        path returns), or added into ``add_to`` (BiMamba's other direction, same shape)."""
        out = add_to
        bounds = self.segment_bounds(hidden_states)
        for start, stop in reversed(bounds) if self.reverse else bounds:
            window = slice(start, stop)
            seg_mask = None if mask is None else mask[:, window]
            y, state = self._forward(hidden_states[:, window], seg_mask, state)
            if out is None:
                out = y.new_empty(*hidden_states.shape[:2], y.shape[-1])
            if add_to is None:
                out[:, window] = y
            else:
                out[:, window] += y
        return out, state

    def _forward(self, hidden_states, mask, state):
        y, new_state = self._mix(self.project(hidden_states), mask, state)
        return self.out_proj(y), new_state

    def project(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """in_proj: ``(b, l, d_model)`` -> ``(b, l, d_in_proj)``, the argument of ``_mix``."""
        return self.in_proj(hidden_states)


class Mamba(SegmentedMixer):
    """Mamba-1 mixer. Input and output ``(b, l, d_model)``.

    Args mirror mamba_ssm (``d_state``, ``d_conv``, ``expand``, ``dt_rank``, dt init range, ``conv_bias``,
    ``bias``). ``reverse`` makes it anti-causal. ``segment_len``: without autograd, inputs longer than this
    are processed in segments carrying the state, which bounds the activation memory (the output is the same).
    The default 131072 halves the per-segment host work of 65536 (H100, same run, Caduceus-size backbone:
    inference at 4M tokens 779k -> 840k tokens/s and at 1M 810k -> 844k at the same peak memory; 8 x 131072
    tokens run unsegmented, 777k -> 977k tokens/s, peak 17.8 -> 19.1 GB). On CUDA, a length that is not a
    multiple of 16 also runs as two segments, its longest multiple of 16 and the rest
    (``SegmentedMixer.segment_bounds``), with autograd too.
    ``backend`` is passed to every kernel (``"auto"``, ``"triton"``, ``"ref"``).
    """

    split_unaligned = True

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init_floor: float = 1e-4, dt_scale: float = 1.0, conv_bias: bool = True, bias: bool = False,
                 reverse: bool = False, segment_len: int = 131072, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        cfg = MambaConfig(d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init_floor, dt_scale, conv_bias, bias)
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = cfg.resolved_dt_rank(d_model)
        self.reverse, self.segment_len, self.backend = reverse, segment_len, backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        # dt_proj: weight ~ U(-s, s) with s = dt_scale / sqrt(dt_rank); bias = softplus^-1(dt) with dt log-uniform.
        dt_std = dt_scale * self.dt_rank ** -0.5
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -dt_std, dt_std)
            self.dt_proj.bias.copy_(init_dt_bias(self.d_inner, dt_min, dt_max, dt_init_floor))
        self.dt_proj.bias._no_reinit = True
        # S4D-real initialisation: A[:, i] = -(i + 1), stored as A_log (kept in fp32).
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A).to(device))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def allocate_state(self, batch: int, device=None, dtype=torch.float32) -> MixerState:
        """Zero state for ``batch`` sequences: conv ``(b, d_inner, d_conv-1)``, ssm ``(b, d_inner, d_state)``."""
        device = device or self.A_log.device
        conv = torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=self.conv1d.weight.dtype)
        return MixerState(conv, torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=dtype))

    def project(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """in_proj: ``(b, l, d_model)`` -> ``(b, l, 2*d_inner)``, applied through its weight (as mamba_ssm does)
        so that the storage suits the scan kernels (see :func:`scan_layout_l_major`)."""
        if not scan_layout_l_major(hidden_states):
            return F.linear(hidden_states, self.in_proj.weight, self.in_proj.bias)
        xz = channels_first_linear(self.in_proj.weight, hidden_states.transpose(1, 2))  # (b, 2*d_inner, l)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None].to(xz.dtype)
        return xz.transpose(1, 2)

    def _mix(self, xz, mask, state, valid_len=None):
        """xz ``(b, l, 2*d_inner)`` (in_proj output) -> y ``(b, l, d_inner)`` and the new state
        (``valid_len``: see :meth:`scan_inputs`)."""
        scan, conv_state = self.scan_inputs(xz, mask, state, valid_len)
        y, ssm_state = selective_scan(**scan, initial_state=None if state is None else state.ssm,
                                      return_final_state=True, reverse=self.reverse, backend=self.backend)
        return y.transpose(1, 2), MixerState(conv_state, ssm_state)

    def scan_inputs(self, xz, mask, state, valid_len=None):
        """Everything before the scan: xz ``(b, l, 2*d_inner)`` -> (the selective_scan keyword arguments u,
        delta, A, B, C, D, z, delta_bias, delta_softplus; the conv state). BiMamba feeds two mixers' arguments
        to one bidirectional scan. ``valid_len`` (without a mask): positions from it on are zero padding of the
        input (in_proj without bias: x is 0 there), made identity steps by delta = -inf (softplus 0), so that
        they change no real position in either direction; their outputs and the states are unspecified."""
        xz = xz.transpose(1, 2)  # (b, 2*d_inner, l)
        x, z = xz.chunk(2, dim=1)  # (b, d_inner, l) each
        if mask is not None:
            mask = mask.to(x.dtype)[:, None, :]  # (b, 1, l)
            x = x * mask
        x, conv_state = causal_conv1d(
            x, self.conv1d.weight, self.conv1d.bias, initial_state=None if state is None else state.conv,
            return_final_state=True, activation="silu", reverse=self.reverse, backend=self.backend)
        split = [self.dt_rank, self.d_state, self.d_state]
        if scan_layout_l_major(x):
            dt, B, C = torch.split(channels_first_linear(self.x_proj.weight, x), split, dim=1)  # (b, ., l)
            dt = channels_first_linear(self.dt_proj.weight, dt)  # (b, d_inner, l), bias added in the scan
        else:  # the same values as channel-last views of (b, l, .) tensors
            dt, B, C = torch.split(F.linear(x.transpose(1, 2), self.x_proj.weight), split, dim=-1)
            dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)
            B, C = B.transpose(1, 2), C.transpose(1, 2)  # (b, n, l)
        A = -torch.exp(fp32(self.A_log))  # (d_inner, n)
        dt_bias, softplus = fp32(self.dt_proj.bias), True
        if valid_len is not None and mask is None and valid_len < dt.shape[-1]:
            dt[..., valid_len:] = float("-inf")
        if mask is not None:
            dt, dt_bias, softplus = masked_dt(dt, dt_bias[:, None], mask), None, False
        scan = dict(u=x, delta=dt, A=A, B=B, C=C, D=fp32(self.D), z=z, delta_bias=dt_bias, delta_softplus=softplus)
        return scan, conv_state

    def step(self, hidden_states: torch.Tensor, state: MixerState) -> tuple[torch.Tensor, MixerState]:
        """One token: hidden_states ``(b, d_model)`` -> ``(b, d_model)`` and the new state."""
        if self.reverse:
            raise RuntimeError("Mamba.step: a reverse (anti-causal) mixer cannot run one token at a time")
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # (b, d_inner) each
        x, conv_state = causal_conv1d_update(x, state.conv, self.conv1d.weight, self.conv1d.bias,
                                             activation="silu", backend=self.backend)
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt @ self.dt_proj.weight.t()  # (b, d_inner)
        A = -torch.exp(fp32(self.A_log))
        y, ssm_state = selective_state_update(state.ssm, x, dt, A, B, C, fp32(self.D), z=z,
                                              delta_bias=fp32(self.dt_proj.bias), delta_softplus=True,
                                              backend=self.backend)
        return self.out_proj(y), MixerState(conv_state, ssm_state)
