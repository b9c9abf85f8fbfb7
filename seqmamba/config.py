"""Typed configuration of the core: mixers, bidirectional wrappers and the backbone.

Defaults follow the papers (Mamba, arXiv 2312.00752; Mamba-2, arXiv 2405.21060; Caduceus, arXiv 2403.03234).
Each dataclass serialises to plain JSON (``dataclasses.asdict``) and back (``from_dict``), which is what
``save_pretrained`` writes to ``config.json``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


def config_from_dict(cls, data: dict):
    """``cls(**data)`` for a config dataclass, rejecting unknown fields with their names."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(known)}")
    return cls(**data)


@dataclass
class MambaConfig:
    """Mamba-1 (selective scan) mixer settings; ``d_model`` comes from the backbone."""

    d_state: int = 16
    """State size N per channel."""
    d_conv: int = 4
    """Width of the depthwise causal convolution."""
    expand: int = 2
    """d_inner = expand * d_model."""
    dt_rank: int | Literal["auto"] = "auto"
    """Rank of the dt projection; "auto" = ceil(d_model / 16)."""
    dt_min: float = 1e-3
    """Lower end of the log-uniform dt initialisation."""
    dt_max: float = 1e-1
    """Upper end of the log-uniform dt initialisation."""
    dt_init_floor: float = 1e-4
    """Smallest dt at initialisation."""
    dt_scale: float = 1.0
    """Scale of the dt_proj weight initialisation."""
    conv_bias: bool = True
    """Bias in the depthwise convolution."""
    bias: bool = False
    """Bias in in_proj and out_proj."""

    def __post_init__(self) -> None:
        _check_positive(self, "d_state", "d_conv", "expand")
        if self.dt_rank != "auto":
            _check_positive(self, "dt_rank")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"MambaConfig: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")

    def resolved_dt_rank(self, d_model: int) -> int:
        return math.ceil(d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @classmethod
    def from_dict(cls, data: dict) -> "MambaConfig":
        return config_from_dict(cls, data)


@dataclass
class Mamba2Config:
    """Mamba-2 (SSD) mixer settings; ``d_model`` comes from the backbone."""

    d_state: int = 128
    """State size N per head."""
    d_conv: int = 4
    """Width of the depthwise causal convolution over x, B and C."""
    expand: int = 2
    """d_inner = expand * d_model."""
    headdim: int = 64
    """Channels per head P; nheads = d_inner / headdim."""
    ngroups: int = 1
    """Groups of heads sharing B and C (and the gated RMSNorm's normalisation)."""
    A_init_range: tuple[float, float] = (1.0, 16.0)
    """A = -U(A_init_range) per head at initialisation."""
    dt_min: float = 1e-3
    """Lower end of the log-uniform dt initialisation."""
    dt_max: float = 1e-1
    """Upper end of the log-uniform dt initialisation."""
    dt_init_floor: float = 1e-4
    """Smallest dt at initialisation."""
    chunk_size: int = 256
    """Chunk length of the SSD scan."""
    conv_bias: bool = True
    """Bias in the depthwise convolution."""
    bias: bool = False
    """Bias in in_proj and out_proj."""
    norm_eps: float = 1e-5
    """Epsilon of the gated RMSNorm."""
    norm_before_gate: bool = False
    """False: norm(y * silu(z)) as mamba_ssm; True: norm(y) * silu(z)."""

    def __post_init__(self) -> None:
        _check_positive(self, "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size")
        self.A_init_range = tuple(self.A_init_range)
        lo, hi = self.A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"Mamba2Config.A_init_range must satisfy 0 < low <= high, got {self.A_init_range}")

    @classmethod
    def from_dict(cls, data: dict) -> "Mamba2Config":
        return config_from_dict(cls, data)


@dataclass
class BackboneConfig:
    """A stack of residual blocks (pre-norm: Add -> Norm -> Mixer) with a final norm.

    The backbone maps hidden states ``(b, l, d_model)`` to ``(b, l, d_model)``; with ``rcps=True`` it maps
    ``(b, l, 2 * d_model)`` (forward strand, then the reverse-complement strand flipped over length and
    channels) to the same shape and is reverse-complement equivariant.
    """

    d_model: int = 256
    """Model width."""
    n_layer: int = 4
    """Number of residual blocks."""
    mixer: Literal["mamba", "mamba2"] = "mamba"
    """Mixer type: Mamba-1 selective scan or Mamba-2 SSD."""
    mamba: MambaConfig = field(default_factory=MambaConfig)
    """Settings used when mixer == "mamba"."""
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    """Settings used when mixer == "mamba2"."""
    bidirectional: bool = False
    """BiMamba: a forward and a reverse mixer per block (not streamable)."""
    bidirectional_strategy: Literal["add", "ew_multiply"] = "add"
    """How the two directions are combined."""
    bidirectional_weight_tie: bool = True
    """Share in_proj and out_proj between the two directions (Caduceus)."""
    rcps: bool = False
    """Reverse-complement parameter sharing (Caduceus-PS): hidden width is 2 * d_model."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalisation layer of the blocks and the final norm."""
    norm_eps: float = 1e-5
    """Epsilon of the norms."""
    residual_in_fp32: bool = True
    """Keep the residual stream in float32 under mixed precision."""
    checkpoint_activations: bool = False
    """Recompute each block in the backward pass (activation checkpointing) to save memory."""

    def __post_init__(self) -> None:
        if isinstance(self.mamba, dict):
            self.mamba = MambaConfig.from_dict(self.mamba)
        if isinstance(self.mamba2, dict):
            self.mamba2 = Mamba2Config.from_dict(self.mamba2)
        _check_positive(self, "d_model", "n_layer")
        for name, allowed in (("mixer", ("mamba", "mamba2")), ("bidirectional_strategy", ("add", "ew_multiply")),
                              ("norm", ("rmsnorm", "layernorm"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"BackboneConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.mixer == "mamba2" and (self.mamba2.expand * self.d_model) % self.mamba2.headdim:
            raise ValueError(f"BackboneConfig: d_inner = {self.mamba2.expand * self.d_model} is not a multiple of "
                             f"mamba2.headdim = {self.mamba2.headdim}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BackboneConfig":
        return config_from_dict(cls, data)
