"""BiMamba: a forward mixer plus an anti-causal (reverse) mixer over the same input, combined.

As in Caduceus, ``mamba_fwd`` reads left to right and ``mamba_rev`` right to left (``reverse=True``: no flipped
copies); with ``weight_tie`` their ``in_proj`` and ``out_proj`` are the same parameters and everything else
(conv, x_proj, dt_proj, A_log, D) is per direction.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

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
        self.mamba_fwd = MIXERS[mixer](d_model, **mixer_kwargs)
        self.mamba_rev = MIXERS[mixer](d_model, reverse=True, **mixer_kwargs)
        if weight_tie:
            for name in ("in_proj", "out_proj"):
                shared, other = getattr(self.mamba_fwd, name), getattr(self.mamba_rev, name)
                other.weight = shared.weight
                if shared.bias is not None:
                    other.bias = shared.bias

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        out_fwd = self.mamba_fwd(hidden_states, mask=mask)
        out_rev = self.mamba_rev(hidden_states, mask=mask)
        return out_fwd + out_rev if self.strategy == "add" else out_fwd * out_rev
