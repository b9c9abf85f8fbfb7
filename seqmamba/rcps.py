"""Reverse-complement parameter sharing (Caduceus-PS).

Hidden states have width ``2 * d``: the first half is the forward strand, the second half the reverse-
complement strand stored flipped over length and channels, so that ``rc(h) = flip(h, (length, channel))``
maps the representation of a sequence to that of its reverse complement. Each wrapper applies its inner
module to both strands with shared weights, which makes a model built from them RC-equivariant:
f(rc(x)) == rc(f(x)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rc(hidden: torch.Tensor) -> torch.Tensor:
    """Flip ``(b, l, c)`` over length and channels."""
    return torch.flip(hidden, dims=(-2, -1))


def rc_ids(ids: torch.Tensor, complement_map: torch.Tensor) -> torch.Tensor:
    """Reverse complement of token ids ``(b, l)``."""
    return torch.flip(complement_map[ids], dims=(-1,))


class RCPSEmbedding(nn.Module):
    """ids ``(b, l)`` -> ``(b, l, 2*d_model)``: cat[E(ids), rc(E(rc_ids(ids)))]."""

    def __init__(self, vocab_size: int, d_model: int, complement_map, device=None, dtype=None):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model, device=device, dtype=dtype)
        self.register_buffer("complement_map", _as_map(complement_map, vocab_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        fwd = self.embedding(input_ids)
        rev = rc(self.embedding(rc_ids(input_ids, self.complement_map)))
        return torch.cat([fwd, rev], dim=-1)


class RCPSWrapper(nn.Module):
    """Apply ``submodule`` (width d -> d) to both strands of ``(b, l, 2d)``: cat[f(h1), rc(f(rc(h2)))].

    A padding ``mask`` ``(b, l)`` is passed to the submodule (flipped for the RC strand).
    """

    def __init__(self, submodule: nn.Module):
        super().__init__()
        self.submodule = submodule

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h1, h2 = hidden.chunk(2, dim=-1)
        if mask is None:
            return torch.cat([self.submodule(h1), rc(self.submodule(rc(h2)))], dim=-1)
        out_rev = self.submodule(rc(h2), mask=torch.flip(mask, dims=(-1,)))
        return torch.cat([self.submodule(h1, mask=mask), rc(out_rev)], dim=-1)


class RCPSAddNormWrapper(RCPSWrapper):
    """Residual add then a norm on each strand: returns ``(norm(residual), residual)``."""

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None):
        residual = hidden if residual is None else residual + hidden
        return super().forward(residual.to(dtype=self.submodule.weight.dtype)), residual


class RCPSLMHead(nn.Module):
    """``(b, l, 2d)`` -> logits ``(b, l, vocab)``: both strands scored with one weight, the RC strand through
    the complement-permuted rows, so logits(rc(x)) == flip(logits(x))[..., complement_map]."""

    def __init__(self, d_model: int, vocab_size: int, complement_map, device=None, dtype=None):
        super().__init__()
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False, device=device, dtype=dtype)
        self.register_buffer("complement_map", _as_map(complement_map, vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h1, h2 = hidden.chunk(2, dim=-1)
        weight = self.lm_head.weight
        return F.linear(h1, weight) + F.linear(torch.flip(h2, dims=(-1,)), weight[self.complement_map])


def _as_map(complement_map, vocab_size: int) -> torch.Tensor:
    cmap = torch.as_tensor(complement_map, dtype=torch.long)
    if cmap.shape != (vocab_size,) or not torch.equal(cmap[cmap], torch.arange(vocab_size)):
        raise ValueError(f"complement_map must be an involution over {vocab_size} ids, got {cmap.tolist()}")
    return cmap
