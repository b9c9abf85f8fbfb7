"""Recurrent state carried between calls of a causal mixer (streaming and step-by-step decoding)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MixerState:
    """State of one mixer after it has consumed a prefix of the sequence.

    conv: ``(b, conv_channels, d_conv - 1)``, the last inputs of the depthwise convolution, in scan order.
    ssm: ``(b, d_inner, d_state)`` for Mamba-1, ``(b, nheads, headdim, d_state)`` for Mamba-2, in float32
    (float64 when the model runs in float64).
    """

    conv: torch.Tensor
    ssm: torch.Tensor

    def detach(self) -> "MixerState":
        """Cut the autograd history (truncated backpropagation through time)."""
        return MixerState(self.conv.detach(), self.ssm.detach())
