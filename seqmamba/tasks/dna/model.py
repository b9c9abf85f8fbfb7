"""Caduceus models (arXiv 2403.03234) on the shared backbone: plain ``nn.Module``s, no Lightning.

* Caduceus-PS (``rcps=True``): RC-equivariant embedding, RCPS BiMamba backbone (hidden width 2*d_model: the
  forward strand, then the reverse-complement strand flipped over length and channels), LM head tied to the
  embedding. Exactly RC-equivariant: logits(rc(x)) == flip(logits(x))[..., complement].
* Caduceus-Ph (``rcps=False``): BiMamba backbone trained with RC augmentation; at inference ``conjoin=True``
  averages the model on x and on rc(x) (post-hoc conjoining), which makes it RC-equivariant too.

State-dict keys follow the released checkpoints: ``caduceus.embeddings.word_embeddings.*``,
``caduceus.backbone.layers.*``, ``caduceus.backbone.norm_f.*``, ``lm_head.*`` (the released files put the
embeddings under ``caduceus.backbone.embeddings``; ``checkpoints.py`` maps them).

Reverse complement of a padded batch is taken per sequence within its own length (``rc_padded``), so padding
stays at the end; every head and pooling takes the padding ``mask`` ``(b, l)`` (True at real positions).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from seqmamba import BackboneConfig, MambaBackbone, MambaConfig, RCPSEmbedding, RCPSLMHead
from seqmamba.config import config_from_dict
from seqmamba.hub import PretrainedMixin

# The Caduceus token ids (seqmamba.data.dna.tokenizer holds the same table; tasks may not need the data package).
VOCAB_SIZE = 16
PAD_ID = 4
COMPLEMENT_MAP = tuple({7: 10, 10: 7, 8: 9, 9: 8}.get(i, i) for i in range(VOCAB_SIZE))

Pooling = Literal["mean", "max", "first", "last"]
RCMode = Literal["invariant", "equivariant"]


@dataclass
class CaduceusConfig:
    """A Caduceus backbone: token embedding + BiMamba stack (+ RCPS for PS)."""

    d_model: int = 256
    """Width of one strand (PS hidden states are 2 * d_model wide)."""
    n_layer: int = 4
    """Residual BiMamba blocks."""
    rcps: bool = True
    """True: Caduceus-PS (RC-equivariant by construction); False: Caduceus-Ph."""
    vocab_size: int = VOCAB_SIZE
    """Embedding rows (12 tokens padded to 16)."""
    complement_map: tuple[int, ...] = COMPLEMENT_MAP
    """Token id -> complement id (an involution)."""
    mamba: MambaConfig = field(default_factory=MambaConfig)
    """Mixer settings (d_state 16, d_conv 4, expand 2 in the released models)."""
    bidirectional_strategy: Literal["add", "ew_multiply"] = "add"
    """How BiMamba combines the two directions."""
    bidirectional_weight_tie: bool = True
    """Share in_proj/out_proj between the directions."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Block and final norm (released models: RMSNorm)."""
    norm_eps: float = 1e-5
    """Norm epsilon."""
    residual_in_fp32: bool = True
    """Keep the residual stream in float32."""
    checkpoint_activations: bool = False
    """Recompute blocks in the backward pass (long sequences)."""

    def __post_init__(self) -> None:
        if isinstance(self.mamba, dict):
            self.mamba = MambaConfig.from_dict(self.mamba)
        self.complement_map = tuple(int(i) for i in self.complement_map)
        if len(self.complement_map) != self.vocab_size:
            raise ValueError(f"CaduceusConfig: complement_map has {len(self.complement_map)} entries, "
                             f"vocab_size is {self.vocab_size}")

    def backbone_config(self) -> BackboneConfig:
        return BackboneConfig(d_model=self.d_model, n_layer=self.n_layer, mixer="mamba", mamba=self.mamba,
                              bidirectional=True, bidirectional_strategy=self.bidirectional_strategy,
                              bidirectional_weight_tie=self.bidirectional_weight_tie, rcps=self.rcps,
                              norm=self.norm, norm_eps=self.norm_eps, residual_in_fp32=self.residual_in_fp32,
                              checkpoint_activations=self.checkpoint_activations)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["complement_map"] = list(self.complement_map)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "CaduceusConfig":
        return config_from_dict(cls, data)


# ------------------------------------------------------------------------------------------------ helpers

def rc_padded(ids: torch.Tensor, mask: torch.Tensor | None, complement_map: torch.Tensor) -> torch.Tensor:
    """Reverse complement of each sequence of a batch within its own length. ids ``(b, l)``; padding stays
    where the mask says it is (right padding stays right); padded ids are left as they are."""
    if mask is None:
        return torch.flip(complement_map[ids], dims=(-1,))
    return complement_map[flip_padded(ids, mask)]


def flip_padded(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reverse ``x`` ``(b, l, ...)`` along the length within the real (right-aligned or left-aligned) span of
    each sequence: real position i of n goes to n-1-i; padded positions keep their values."""
    b, l = mask.shape
    pos = torch.arange(l, device=mask.device).expand(b, l)
    lengths = mask.sum(-1, keepdim=True)
    first = torch.where(mask.any(-1, keepdim=True), torch.argmax(mask.int(), -1, keepdim=True), 0)
    src = torch.where(mask, first + (first + lengths - 1 - pos), pos)  # i -> first + (n-1-(i-first))
    index = src.view(b, l, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 1, index)


def masked_pool(hidden: torch.Tensor, mask: torch.Tensor | None, how: Pooling) -> torch.Tensor:
    """Pool ``(b, l, c)`` over real positions -> ``(b, c)``. Padding never counts: mean and max over the mask,
    first/last = the first/last real position (left or right padding)."""
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    mask = mask.bool()
    if how == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    if how == "max":
        return hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
    if how in ("first", "last"):
        pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        if how == "first":
            index = torch.where(mask, pos, mask.shape[1]).amin(1).clamp(max=mask.shape[1] - 1)
        else:
            index = torch.where(mask, pos, -1).amax(1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
    raise ValueError(f"pooling must be one of mean, max, first, last; got {how!r}")


def strand_views(hidden: torch.Tensor, mask: torch.Tensor | None):
    """PS hidden ``(b, l, 2d)`` -> ((forward strand ``(b, l, d)``, mask), (RC strand in its own order, mask)).

    The second view is what the forward half would be for rc(x): ``rc`` of the stored second half."""
    h1, h2 = hidden.chunk(2, dim=-1)
    rev = torch.flip(h2, dims=(-2, -1))
    rev_mask = None if mask is None else torch.flip(mask, dims=(-1,))
    return (h1, mask), (rev, rev_mask)


# ------------------------------------------------------------------------------------------------ models

class CaduceusEmbeddings(nn.Module):
    """``word_embeddings``: ``nn.Embedding`` (Ph) or ``RCPSEmbedding`` (PS, output width 2*d_model)."""

    def __init__(self, config: CaduceusConfig):
        super().__init__()
        if config.rcps:
            self.word_embeddings = RCPSEmbedding(config.vocab_size, config.d_model, config.complement_map)
        else:
            self.word_embeddings = nn.Embedding(config.vocab_size, config.d_model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class Caduceus(PretrainedMixin, nn.Module):
    """ids ``(b, l)`` (+ mask) -> hidden ``(b, l, d_model)`` (Ph) or ``(b, l, 2*d_model)`` (PS)."""

    config_class = CaduceusConfig

    def __init__(self, config: CaduceusConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.embeddings = CaduceusEmbeddings(config)
        self.backbone = MambaBackbone(config.backbone_config(), backend)
        self.register_buffer("complement", torch.tensor(config.complement_map, dtype=torch.long), persistent=False)
        self._init_weights()

    def _init_weights(self, initializer_range: float = 0.02) -> None:
        """Mamba/Caduceus initialisation: embedding ~ N(0, 0.02); out_proj rescaled by 1/sqrt(n_layer) (GPT-2's
        prenorm-residual rule, one residual per block); linear biases zero except dt_proj's (``_no_reinit``)."""
        emb = self.embeddings.word_embeddings
        nn.init.normal_(emb.embedding.weight if self.config.rcps else emb.weight, std=initializer_range)
        for name, module in self.backbone.named_modules():
            if isinstance(module, nn.Linear) and module.bias is not None \
                    and not getattr(module.bias, "_no_reinit", False):
                nn.init.zeros_(module.bias)
        for name, p in self.backbone.named_parameters():
            if name.endswith("out_proj.weight"):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(self.config.n_layer)

    @property
    def hidden_width(self) -> int:
        return 2 * self.config.d_model if self.config.rcps else self.config.d_model

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.backbone(self.embeddings(input_ids), mask=mask)

    def embed(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None, pooling: Pooling = "mean",
              conjoin: bool = True) -> torch.Tensor:
        """Pooled, RC-invariant sequence embeddings ``(b, d_model)``.

        PS: the mean of the pooled forward-strand and RC-strand features. Ph: the pooled features, averaged
        with those of rc(x) when ``conjoin``."""
        hidden = self(input_ids, mask)
        if self.config.rcps:
            (h1, m1), (h2, m2) = strand_views(hidden, mask)
            return 0.5 * (masked_pool(h1, m1, pooling) + masked_pool(h2, m2, pooling))
        pooled = masked_pool(hidden, mask, pooling)
        if not conjoin:
            return pooled
        ids_rc = rc_padded(input_ids, mask, self.complement)
        return 0.5 * (pooled + masked_pool(self(ids_rc, mask), mask, pooling))

    def per_position(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-base features ``(b, l, d_model)``, RC-equivariant (PS: mean of both strands at each base)."""
        hidden = self(input_ids, mask)
        if not self.config.rcps:
            return hidden
        h1, h2 = hidden.chunk(2, dim=-1)
        return 0.5 * (h1 + torch.flip(h2, dims=(-1,)))


class CaduceusForMaskedLM(PretrainedMixin, nn.Module):
    """ids ``(b, l)`` -> logits ``(b, l, vocab_size)``; LM head tied to the token embedding."""

    config_class = CaduceusConfig

    def __init__(self, config: CaduceusConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.caduceus = Caduceus(config, backend)
        emb = self.caduceus.embeddings.word_embeddings
        if config.rcps:
            self.lm_head = RCPSLMHead(config.d_model, config.vocab_size, config.complement_map)
            self.lm_head.lm_head.weight = emb.embedding.weight
        else:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
            self.lm_head.weight = emb.weight

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None,
                conjoin: bool = False) -> torch.Tensor:
        """``conjoin`` (Ph): average with the flipped, complement-permuted logits of rc(x)."""
        logits = self.lm_head(self.caduceus(input_ids, mask))
        if conjoin and not self.config.rcps:
            complement = self.caduceus.complement
            ids_rc = rc_padded(input_ids, mask, complement)
            logits_rc = self.lm_head(self.caduceus(ids_rc, mask))
            back = torch.flip(logits_rc, dims=(1,)) if mask is None else flip_padded(logits_rc, mask)
            logits = 0.5 * (logits + back[..., complement])
        return logits


class DNAHead(nn.Module):
    """Sequence-level (``(b, n_out)``) or per-position (``(b, l, n_out)``) head on backbone features.

    With a PS backbone the head reads both strands and is exactly RC-invariant (``rc_mode="invariant"``) or,
    with ``rc_mode="equivariant"``, equivariant under ``label_permutation`` (an involution over the outputs, e.g.
    ``[1, 0]`` for + <-> - strand labels): outputs(rc(x)) == outputs(x)[..., label_permutation] (flipped along
    the length for the per-position head). With a Ph backbone it is a plain linear head on pooled features;
    the model conjoins it at inference.
    """

    def __init__(self, d_model: int, n_out: int, rcps: bool, level: Literal["sequence", "token"] = "sequence",
                 pooling: Pooling = "mean", rc_mode: RCMode = "invariant", label_permutation: list[int] | None = None,
                 dropout: float = 0.0):
        super().__init__()
        if rc_mode not in ("invariant", "equivariant"):
            raise ValueError(f"DNAHead: rc_mode must be 'invariant' or 'equivariant', got {rc_mode!r}")
        if level not in ("sequence", "token"):
            raise ValueError(f"DNAHead: level must be 'sequence' or 'token', got {level!r}")
        if rc_mode == "equivariant":
            if label_permutation is None:
                raise ValueError("DNAHead: rc_mode='equivariant' needs label_permutation (e.g. [1, 0])")
            perm = torch.as_tensor(label_permutation, dtype=torch.long)
            if perm.shape != (n_out,) or not torch.equal(perm[perm], torch.arange(n_out)):
                raise ValueError(f"DNAHead: label_permutation must be an involution over {n_out} outputs, got "
                                 f"{list(label_permutation)}")
        else:
            perm = torch.arange(n_out)
        self.rcps, self.level, self.pooling, self.rc_mode = rcps, level, pooling, rc_mode
        self.register_buffer("label_permutation", perm)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(d_model, n_out)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.rcps:
            feats = hidden if self.level == "token" else masked_pool(hidden, mask, self.pooling)
            return self.proj(self.dropout(feats))
        if self.level == "token":
            h1, h2 = hidden.chunk(2, dim=-1)
            out_f, out_r = self.proj(self.dropout(h1)), self.proj(self.dropout(torch.flip(h2, dims=(-1,))))
        else:
            (h1, m1), (h2, m2) = strand_views(hidden, mask)
            out_f = self.proj(self.dropout(masked_pool(h1, m1, self.pooling)))
            out_r = self.proj(self.dropout(masked_pool(h2, m2, self.pooling)))
        return 0.5 * (out_f + out_r[..., self.label_permutation])


class CaduceusWithHead(nn.Module):
    """Caduceus backbone + ``DNAHead``: ids ``(b, l)`` -> ``(b, n_out)`` or ``(b, l, n_out)``."""

    def __init__(self, config: CaduceusConfig, n_out: int, level: Literal["sequence", "token"] = "sequence",
                 pooling: Pooling = "mean", rc_mode: RCMode = "invariant", label_permutation: list[int] | None = None,
                 dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.caduceus = Caduceus(config, backend)
        self.head = DNAHead(config.d_model, n_out, config.rcps, level, pooling, rc_mode, label_permutation, dropout)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None,
                conjoin: bool = False) -> torch.Tensor:
        """``conjoin`` (Ph): average with the outputs for rc(x), label-permuted (and flipped back, per position)."""
        out = self.head(self.caduceus(input_ids, mask), mask)
        if conjoin and not self.config.rcps:
            ids_rc = rc_padded(input_ids, mask, self.caduceus.complement)
            out_rc = self.head(self.caduceus(ids_rc, mask), mask)
            if self.head.level == "token":
                out_rc = torch.flip(out_rc, dims=(1,)) if mask is None else flip_padded(out_rc, mask)
            out = 0.5 * (out + out_rc[..., self.head.label_permutation])
        return out


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over positions whose label is not -100; logits ``(b, l, v)``, labels ``(b, l)``."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
