"""MambaBackbone: ``n_layer`` residual blocks and a final norm, built from a ``BackboneConfig``.

Hidden states in, hidden states out: embeddings and heads belong to the tasks. Causal backbones stream
(carry per-layer state between calls, or ``step`` one token at a time); bidirectional and RCPS ones see
the whole sequence.
"""
from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from seqmamba.bimamba import MIXERS, BiMamba
from seqmamba.block import Block, add_norm, add_residual, add_residual_
from seqmamba.config import BackboneConfig
from seqmamba.hub import PretrainedMixin
from seqmamba.norm import make_norm
from seqmamba.rcps import RCPSAddNormWrapper, RCPSWrapper
from seqmamba.state import MixerState


def build_mixer(config: BackboneConfig, backend: str = "auto") -> nn.Module:
    """The mixer of one block, width d_model (RCPS wraps it to 2*d_model)."""
    kwargs = asdict(config.mamba if config.mixer == "mamba" else config.mamba2)
    kwargs["backend"] = backend
    if config.bidirectional:
        return BiMamba(config.d_model, mixer=config.mixer, strategy=config.bidirectional_strategy,
                       weight_tie=config.bidirectional_weight_tie, **kwargs)
    return MIXERS[config.mixer](config.d_model, **kwargs)


class MambaBackbone(PretrainedMixin, nn.Module):
    """``(b, l, d_model)`` -> ``(b, l, d_model)``; with ``config.rcps``, ``(b, l, 2*d_model)`` both ways.

    ``backend`` selects the kernels (``"auto"``, ``"triton"``, ``"ref"``) of every mixer.
    """

    config_class = BackboneConfig

    def __init__(self, config: BackboneConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        blocks = []
        for _ in range(config.n_layer):
            mixer = build_mixer(config, backend)
            norm = make_norm(config.norm, config.d_model, config.norm_eps)
            if config.rcps:
                mixer, norm = RCPSWrapper(mixer), RCPSAddNormWrapper(norm)
            blocks.append(Block(mixer, norm, config.residual_in_fp32))
        self.layers = nn.ModuleList(blocks)
        norm_f = make_norm(config.norm, config.d_model, config.norm_eps)
        self.norm_f = RCPSAddNormWrapper(norm_f) if config.rcps else norm_f

    @property
    def streamable(self) -> bool:
        return not (self.config.bidirectional or self.config.rcps)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None,
                states: list[MixerState] | None = None, return_states: bool = False):
        """hidden ``(b, l, width)``; mask ``(b, l)``, False at padding.

        ``states`` (one ``MixerState`` per layer, causal backbones only) continue a stream; with
        ``return_states`` the call returns ``(hidden, states)``.
        """
        if (states is not None or return_states) and not self.streamable:
            raise ValueError("MambaBackbone: states are only defined for causal backbones "
                             "(bidirectional=False, rcps=False)")
        residual, new_states = None, []
        for i, layer in enumerate(self.layers):
            if return_states or states is not None:
                kwargs = {"state": None if states is None else states[i], "return_state": True}
                (hidden, state), residual = layer(hidden, residual, mask, **kwargs)
                new_states.append(state)
            elif self.config.checkpoint_activations and self.training and torch.is_grad_enabled():
                residual = add_residual(hidden, residual, layer.residual_in_fp32)
                hidden = checkpoint(layer.mix, residual, mask, use_reentrant=False)
            elif not torch.is_grad_enabled():  # the previous output is freed before the mixer runs
                residual = add_residual_(hidden, residual, layer.residual_in_fp32)
                hidden = None
                hidden = layer.mix(residual, mask)
            else:
                hidden, residual = layer(hidden, residual, mask)
        hidden, _ = add_norm(self.norm_f, hidden, residual, self.config.residual_in_fp32)
        return (hidden, new_states) if return_states else hidden

    def allocate_states(self, batch: int, device=None, dtype=torch.float32) -> list[MixerState]:
        if not self.streamable:
            raise ValueError("MambaBackbone.allocate_states: only causal backbones carry state")
        return [layer.mixer.allocate_state(batch, device, dtype) for layer in self.layers]

    def step(self, hidden: torch.Tensor, states: list[MixerState]) -> tuple[torch.Tensor, list[MixerState]]:
        """One token for every sequence: hidden ``(b, d_model)`` -> ``(b, d_model)`` and the new states."""
        if not self.streamable:
            raise ValueError("MambaBackbone.step: only causal backbones can run one token at a time")
        residual, new_states = None, []
        for layer, state in zip(self.layers, states):
            hidden_n, residual = add_norm(layer.norm, hidden, residual, layer.residual_in_fp32)
            hidden, state = layer.mixer.step(hidden_n, state)
            new_states.append(state)
        hidden, _ = add_norm(self.norm_f, hidden, residual, self.config.residual_in_fp32)
        return hidden, new_states
