"""Mamba-TasNet and dual-path Mamba: encoder -> Mamba masker -> masks -> decoder (no Lightning here).

Shapes: waveform ``(b, t)``; encoder frames ``(b, n_filters, f)`` with f = ceil((t - kernel) / stride) + 1
after padding t; masks ``(b, n_src, n_filters, f)``; estimates ``(b, n_src, t)``.

Masker "mamba" (Mamba-TasNet): per-frame LayerNorm -> Linear to d_model -> MambaBackbone of n_layers
bidirectional blocks (d_state 16, expand 2) -> PReLU -> Linear to n_src * n_filters -> mask activation.

Masker "dual_path" (DPMamba): the frames are cut into chunks of ``chunk_size`` with 50% overlap; each of
``n_layers`` dual-path layers runs a bidirectional Mamba block along each chunk (intra) and one across chunks at
each position (inter); the chunks are overlap-added back (averaged where they overlap).

Presets (``SIZES``, same numbers in configs/separation/*.yaml): XS 128 filters x 16 layers, S 256 x 16,
M 256 x 32 (Mamba-TasNet paper sizes).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from seqmamba import BackboneConfig, MambaBackbone, MambaConfig
from seqmamba.config import config_from_dict
from seqmamba.hub import PretrainedMixin

SIZES = {"XS": {"n_filters": 128, "n_layers": 16}, "S": {"n_filters": 256, "n_layers": 16},
         "M": {"n_filters": 256, "n_layers": 32}}


@dataclass
class SeparatorConfig:
    """Architecture of a Mamba separator."""

    n_src: int = 2
    """Speakers separated."""
    masker: Literal["mamba", "dual_path"] = "mamba"
    """"mamba": one stack along all frames (Mamba-TasNet); "dual_path": intra/inter-chunk stacks (DPMamba)."""
    n_filters: int = 256
    """Encoder filters N (learned basis size)."""
    kernel_size: int = 16
    """Encoder/decoder kernel (samples); 16 at 8 kHz = 2 ms."""
    stride: int = 8
    """Encoder hop (samples), half the kernel."""
    d_model: int | None = None
    """Bottleneck width fed to the Mamba blocks (None: n_filters)."""
    n_layers: int = 16
    """Bidirectional Mamba blocks ("mamba") or dual-path layers, each one intra + one inter block."""
    d_state: int = 16
    """Mamba state size."""
    expand: int = 2
    """Mamba expansion factor."""
    chunk_size: int = 250
    """Dual path: frames per chunk (hop chunk_size // 2)."""
    mask_activation: Literal["relu", "sigmoid", "softmax"] = "relu"
    """Mask non-linearity; softmax normalises over speakers."""
    sample_rate: int = 8000
    """Rate the model was trained at (stored for the separation API)."""

    def __post_init__(self) -> None:
        for name in ("n_src", "n_filters", "kernel_size", "stride", "n_layers", "d_state", "expand", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SeparatorConfig.{name} must be a positive integer, got {value!r}")
        if self.masker not in ("mamba", "dual_path"):
            raise ValueError(f"SeparatorConfig.masker must be 'mamba' or 'dual_path', got {self.masker!r}")
        if self.mask_activation not in ("relu", "sigmoid", "softmax"):
            raise ValueError(f"SeparatorConfig.mask_activation must be relu/sigmoid/softmax, got "
                             f"{self.mask_activation!r}")
        if self.chunk_size < 2 and self.masker == "dual_path":
            raise ValueError("SeparatorConfig.chunk_size must be >= 2 for the dual-path masker")

    @property
    def width(self) -> int:
        return self.d_model or self.n_filters

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SeparatorConfig":
        return config_from_dict(cls, data)


def _backbone(width: int, n_layer: int, cfg: SeparatorConfig, backend: str) -> MambaBackbone:
    return MambaBackbone(BackboneConfig(d_model=width, n_layer=n_layer, bidirectional=True,
                                        mamba=MambaConfig(d_state=cfg.d_state, expand=cfg.expand),
                                        norm="layernorm"), backend=backend)


class MambaMasker(nn.Module):
    """Mamba-TasNet masker: frames ``(b, N, f)`` -> masks ``(b, n_src, N, f)``."""

    def __init__(self, cfg: SeparatorConfig, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.in_norm = nn.LayerNorm(cfg.n_filters)
        self.bottleneck = nn.Linear(cfg.n_filters, cfg.width)
        self.backbone = _backbone(cfg.width, cfg.n_layers, cfg, backend)
        self.out = nn.Sequential(nn.PReLU(), nn.Linear(cfg.width, cfg.n_src * cfg.n_filters))

    def mix(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``(b, f, d_model)`` -> ``(b, f, d_model)``."""
        return self.backbone(hidden, mask=mask)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, f = frames.shape
        hidden = self.bottleneck(self.in_norm(frames.transpose(1, 2)))  # (b, f, d_model)
        hidden = self.mix(hidden, mask)
        logits = self.out(hidden).view(b, f, self.cfg.n_src, n).permute(0, 2, 3, 1)  # (b, n_src, N, f)
        if self.cfg.mask_activation == "relu":
            return F.relu(logits)
        if self.cfg.mask_activation == "sigmoid":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=1)


class DualPathMambaMasker(MambaMasker):
    """DPMamba masker: intra-chunk and inter-chunk bidirectional Mamba, chunks of ``chunk_size``, 50% overlap."""

    def __init__(self, cfg: SeparatorConfig, backend: str = "auto"):
        super().__init__(cfg, backend)
        del self.backbone
        self.intra = nn.ModuleList(_backbone(cfg.width, 1, cfg, backend) for _ in range(cfg.n_layers))
        self.inter = nn.ModuleList(_backbone(cfg.width, 1, cfg, backend) for _ in range(cfg.n_layers))

    def mix(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, f, d = hidden.shape
        k, hop = self.cfg.chunk_size, self.cfg.chunk_size // 2
        # pad so that every frame is covered by two chunks and the last chunk is full
        n_chunks = max(math.ceil((f + 2 * hop - k) / hop) + 1, 1)
        total = (n_chunks - 1) * hop + k
        x = F.pad(hidden.transpose(1, 2), (hop, total - f - hop))  # (b, d, total)
        chunks = x.unfold(-1, k, hop)  # (b, d, s, k), s = n_chunks
        chunks = chunks.permute(0, 2, 3, 1).contiguous()  # (b, s, k, d)
        for intra, inter in zip(self.intra, self.inter):
            chunks = intra(chunks.view(b * n_chunks, k, d)).view(b, n_chunks, k, d)
            chunks = chunks.transpose(1, 2).reshape(b * k, n_chunks, d)  # along chunks at each position
            chunks = inter(chunks).view(b, k, n_chunks, d).transpose(1, 2).contiguous()  # (b, s, k, d)
        # overlap-add back to frames, averaging the two chunks that cover each frame
        cols = chunks.permute(0, 3, 2, 1).reshape(b, d * k, n_chunks)  # (b, d*k, s)
        summed = F.fold(cols, (1, total), (1, k), stride=(1, hop)).view(b, d, total)
        counts = F.fold(torch.ones_like(cols[:1, :k]), (1, total), (1, k), stride=(1, hop)).view(1, 1, total)
        out = (summed / counts)[..., hop: hop + f]  # (b, d, f)
        return out.transpose(1, 2)


class MambaSeparator(PretrainedMixin, nn.Module):
    """Waveform mixture ``(b, t)`` (or ``(t,)``) -> source estimates ``(b, n_src, t)`` (or ``(n_src, t)``).

    Split as encoder -> masker -> apply masks -> decoder, the way asteroid's encoder-masker-decoder models are.
    ``lengths`` (b,) marks real samples of a zero-padded batch: with the single-path masker the real samples'
    estimates then equal those of each mixture run alone (the dual-path masker mixes padding into chunks).
    """

    config_class = SeparatorConfig

    def __init__(self, config: SeparatorConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.encoder = nn.Conv1d(1, config.n_filters, config.kernel_size, stride=config.stride, bias=False)
        masker_cls = MambaMasker if config.masker == "mamba" else DualPathMambaMasker
        self.masker = masker_cls(config, backend)
        self.decoder = nn.ConvTranspose1d(config.n_filters, 1, config.kernel_size, stride=config.stride, bias=False)

    def n_frames(self, t: int) -> int:
        k, s = self.config.kernel_size, self.config.stride
        return max(math.ceil((t - k) / s), 0) + 1

    def forward_encoder(self, wave: torch.Tensor) -> torch.Tensor:
        """``(b, t)`` -> frames ``(b, N, f)`` (ReLU), t zero-padded to ``(f - 1) * stride + kernel``."""
        t = wave.shape[-1]
        padded = (self.n_frames(t) - 1) * self.config.stride + self.config.kernel_size
        return F.relu(self.encoder(F.pad(wave, (0, padded - t))[:, None, :]))

    def forward_masker(self, frames: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """frames ``(b, N, f)`` -> masks ``(b, n_src, N, f)``."""
        if lengths is None:
            return self.masker(frames)
        n = torch.tensor([self.n_frames(int(x)) for x in lengths], device=frames.device)
        mask = torch.arange(frames.shape[-1], device=frames.device)[None, :] < n[:, None]  # (b, f)
        # the single-path stack keeps padding out of real frames; padded frames get zero masks so that the
        # decoder's overlap-add adds nothing to the last real samples
        masks = self.masker(frames, mask if self.config.masker == "mamba" else None)
        return masks * mask[:, None, None, :]

    def forward_decoder(self, masked: torch.Tensor, t: int) -> torch.Tensor:
        """masked frames ``(b, n_src, N, f)`` -> waveforms ``(b, n_src, t)``."""
        b, c, n, f = masked.shape
        wave = self.decoder(masked.reshape(b * c, n, f)).view(b, c, -1)
        return wave[..., :t]

    def forward(self, mixture: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        squeeze = mixture.ndim == 1
        wave = mixture[None] if squeeze else mixture
        frames = self.forward_encoder(wave)
        masks = self.forward_masker(frames, lengths)
        est = self.forward_decoder(masks * frames[:, None], wave.shape[-1])
        return est[0] if squeeze else est
