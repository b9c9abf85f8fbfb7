"""BiMamba: a forward mixer plus an anti-causal (reverse) mixer over the same input, combined.

As in Caduceus, ``mamba_fwd`` reads left to right and ``mamba_rev`` right to left (``reverse=True``: no flipped
copies); with ``weight_tie`` their ``in_proj`` and ``out_proj`` are the same parameters and everything else
(conv, x_proj, dt_proj, A_log, D) is per direction. Tied Mamba-1 mixers with ``"add"`` run both scans in one
:func:`~seqmamba.kernels.bidirectional.selective_scan_bidirectional` call (no flipped copies, one output).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from seqmamba.kernels.bidirectional import selective_scan_bidirectional
from seqmamba.mamba import Mamba
from seqmamba.mamba2 import Mamba2

MIXERS = {"mamba": Mamba, "mamba2": Mamba2}


class BiMamba(nn.Module):
    """Bidirectional mixer. Input and output ``(b, l, d_model)``.

    strategy ``"add"``: fwd(x) + rev(x); ``"ew_multiply"``: fwd(x) * rev(x). ``mixer_kwargs`` go to both
    mixers (``Mamba`` or ``Mamba2`` arguments). A padding ``mask`` ``(b, l)`` keeps left or right padding
    out of real positions in both directions.
    """

    def __init__(self, d_model: int, mixer: Literal["mamba", "mamba2"] = "mamba",
                 strategy: Literal["add", "ew_multiply"] = "add", weight_tie: bool = True, **mixer_kwargs):
        super().__init__()
        if strategy not in ("add", "ew_multiply"):
            raise ValueError(f"BiMamba: strategy must be 'add' or 'ew_multiply', got {strategy!r}")
        if mixer not in MIXERS:
            raise ValueError(f"BiMamba: mixer must be one of {sorted(MIXERS)}, got {mixer!r}")
        self.strategy = strategy
        # Mamba mixers with tied projections and "add": one bidirectional scan call for both directions. "no_grad"
        # (default): only without autograd; its backward returns both directions' input gradients at once, which
        # measured +6 GB peak in a 1M-token checkpointed training step of the Caduceus-size model for a ~1% gain.
        # True: always; False: never.
        self.fused_scan: bool | str = "no_grad"
        self.mamba_fwd = MIXERS[mixer](d_model, **mixer_kwargs)
        self.mamba_rev = MIXERS[mixer](d_model, reverse=True, **mixer_kwargs)
        if weight_tie:
            for name in ("in_proj", "out_proj"):
                shared, other = getattr(self.mamba_fwd, name), getattr(self.mamba_rev, name)
                other.weight = shared.weight
                if shared.bias is not None:
                    other.bias = shared.bias

    def _fused_mix(self, projected: torch.Tensor, mask: torch.Tensor | None, **pad) -> torch.Tensor:
        """Both directions' scans in one selective_scan_bidirectional call: (b, l, 2*d_inner) -> (b, l, d_inner).
        ``pad``: ``valid_len`` (``Mamba.scan_inputs``) or nothing."""
        fwd, _ = self.mamba_fwd.scan_inputs(projected, mask, None, **pad)
        rev, _ = self.mamba_rev.scan_inputs(projected, mask, None, **pad)
        softplus = fwd.pop("delta_softplus")
        rev.pop("delta_softplus")
        y = selective_scan_bidirectional(**{k: (fwd[k], rev[k]) for k in fwd}, delta_softplus=softplus,
                                         backend=self.mamba_fwd.backend)
        return y.transpose(1, 2)

    @property
    def shares_projections(self) -> bool:
        """Tied projections and ``add``: in_proj once, and out_proj once on the sum of the two directions."""
        fwd, rev = self.mamba_fwd, self.mamba_rev
        return self.strategy == "add" and fwd.in_proj.weight is rev.in_proj.weight and \
            fwd.out_proj.weight is rev.out_proj.weight and fwd.in_proj.bias is rev.in_proj.bias

    def alignment_pad(self, hidden_states: torch.Tensor) -> int:
        """Zero positions the shared-projection path appends to ``hidden_states`` ``(b, l, d_model)``, so that
        l becomes a multiple of 16: at other lengths the scan and conv rows start unaligned (the Triton scan
        and conv copy them into padded rows). Where the mixers would split instead
        (``SegmentedMixer.aligns_lengths``), which two directions sharing one pass cannot; 0 elsewhere."""
        if not self.mamba_fwd.aligns_lengths(hidden_states):
            return 0
        return -hidden_states.shape[1] % self.mamba_fwd.ROW_ALIGN

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        long_inference = not torch.is_grad_enabled() and hidden_states.shape[1] > self.mamba_fwd.segment_len
        if self.shares_projections and not long_inference:  # long inference runs in segments below instead
            length = hidden_states.shape[1]
            pad = self.alignment_pad(hidden_states)
            valid = {}
            if pad:  # zero rows at the end, which change no real position: identity steps, or masked
                hidden_states = F.pad(hidden_states, (0, 0, 0, pad))
                if mask is None and self.mamba_fwd.in_proj.bias is None:
                    valid = {"valid_len": length}
                else:  # a bias makes x nonzero there: the mask zeroes it
                    if mask is None:
                        mask = torch.ones(hidden_states.shape[0], length, dtype=torch.bool,
                                          device=hidden_states.device)
                    mask = F.pad(mask, (0, pad), value=0)
            projected = self.mamba_fwd.project(hidden_states)
            fused = self.fused_scan is True or (self.fused_scan == "no_grad" and not torch.is_grad_enabled())
            if fused and isinstance(self.mamba_fwd, Mamba):
                y = self._fused_mix(projected, mask, **valid)
            else:
                y_fwd, _ = self.mamba_fwd._mix(projected, mask, None, **valid)
                y_rev, _ = self.mamba_rev._mix(projected, mask, None, **valid)
                y = y_fwd + y_rev
            out = self.mamba_fwd.out_proj(y)[:, :length]
            bias = self.mamba_fwd.out_proj.bias
            return out if bias is None else out + bias  # out_proj(a) + out_proj(b) carries the bias twice
        out_fwd = self.mamba_fwd(hidden_states, mask=mask)
        if long_inference and self.strategy == "add":  # the reverse segments add into the forward output
            return self.mamba_rev._forward_segments(hidden_states, mask, None, add_to=out_fwd)[0]
        out_rev = self.mamba_rev(hidden_states, mask=mask)
        return out_fwd + out_rev if self.strategy == "add" else out_fwd * out_rev
