"""Sequential recommenders: Mamba4Rec (arXiv 2403.03900) and the SASRec baseline (arXiv 1808.09781).

Both map right- or left-padded item ids ``(b, l)`` (0 = padding) and a bool ``mask`` ``(b, l)`` (False at
padding) to hidden states ``(b, l, d)``; position ``t``'s state predicts the item after position ``t``.
Scores against every item come from the tied item embedding: ``scores = h @ E.T`` ``(..., n_items + 1)``,
column 0 (padding) set to -inf.

Mamba4Rec: item embedding -> dropout -> LayerNorm -> n_layers x [Mamba (d_state 32, d_conv 4, expand 2)
-> dropout -> + residual -> LayerNorm -> FFN (4d, GELU) with residual and LayerNorm]. The padding mask goes
into the Mamba mixer, so padding (left or right) never reaches the recurrent state; everything else is
position-wise. It streams: ``forward(..., state=states, return_state=True)`` continues a history from the
states after its previous chunk, which is how histories longer than the training window are scored.

SASRec: item + learned position embedding -> LayerNorm -> dropout -> n_layers x [causal multi-head
self-attention (torch's scaled_dot_product_attention) -> dropout -> + residual -> LayerNorm -> FFN (GELU)
-> dropout -> + residual -> LayerNorm]. Causal attention keeps real positions away from right padding, so
SASRec needs right padding and at most ``max_len`` positions; it cannot stream.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqmamba import Mamba, MixerState


class FeedForward(nn.Module):
    """Position-wise FFN with residual and post-LayerNorm: LN(x + drop(W2 drop(gelu(W1 x))))."""

    def __init__(self, d_model: int, d_inner: int, dropout: float, eps: float):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_inner)
        self.w_2 = nn.Linear(d_inner, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.w_2(self.dropout(F.gelu(self.w_1(x)))))
        return self.norm(x + h)


class SequentialRecommender(nn.Module):
    """Shared parts: the item embedding (tied output layer), scores, the state at the last real position."""

    streamable = False

    def __init__(self, n_items: int, hidden_size: int):
        super().__init__()
        if n_items < 1 or hidden_size < 1:
            raise ValueError(f"{type(self).__name__}: n_items and hidden_size must be >= 1, got {n_items}, "
                             f"{hidden_size}")
        self.n_items, self.hidden_size = n_items, hidden_size
        self.item_embedding = nn.Embedding(n_items + 1, hidden_size, padding_idx=0)

    def _init_weights(self, modules) -> None:
        """Embeddings and FFN/attention linears ~ N(0, 0.02), biases 0 (as RecBole). Mamba keeps its own init."""
        for module in modules:
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def item_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``(..., d)`` -> scores ``(..., n_items + 1)`` against every item; padding column -inf."""
        scores = hidden @ self.item_embedding.weight.t()
        scores[..., 0] = float("-inf")
        return scores

    @staticmethod
    def last_hidden(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(b, l, d)`` -> ``(b, d)``: the state at each row's last real position (any padding side)."""
        length = mask.shape[1]
        last = length - 1 - mask.flip(1).to(torch.int64).argmax(dim=1)  # (b,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class Mamba4RecLayer(nn.Module):
    """Mamba -> dropout -> + residual -> LayerNorm -> FFN. ``(b, l, d)`` in and out."""

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, dropout: float, eps: float):
        super().__init__()
        self.mamba = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.ffn = FeedForward(d_model, 4 * d_model, dropout, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, state: MixerState | None = None):
        h, state = self.mamba(x, mask=mask, state=state, return_state=True)
        return self.ffn(self.norm(self.dropout(h) + x)), state


class Mamba4Rec(SequentialRecommender):
    """Mamba4Rec. ``forward(items (b, l), mask (b, l)) -> hidden (b, l, hidden_size)``."""

    streamable = True

    def __init__(self, n_items: int, hidden_size: int = 64, n_layers: int = 1, d_state: int = 32, d_conv: int = 4,
                 expand: int = 2, dropout: float = 0.2, layer_norm_eps: float = 1e-12):
        super().__init__(n_items, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.layers = nn.ModuleList(Mamba4RecLayer(hidden_size, d_state, d_conv, expand, dropout, layer_norm_eps)
                                    for _ in range(n_layers))
        self._init_weights([self.item_embedding] + [layer.ffn.w_1 for layer in self.layers]
                           + [layer.ffn.w_2 for layer in self.layers])

    def forward(self, items: torch.Tensor, mask: torch.Tensor | None = None,
                state: list[MixerState] | None = None, return_state: bool = False):
        """items, mask ``(b, l)``; ``state``: one MixerState per layer after the previous chunk of the same
        histories. Returns hidden ``(b, l, d)``, and the new states when ``return_state``."""
        x = self.norm(self.dropout(self.item_embedding(items)))  # (b, l, d)
        states = state if state is not None else [None] * len(self.layers)
        new_states = []
        for layer, layer_state in zip(self.layers, states):
            x, layer_state = layer(x, mask, layer_state)
            new_states.append(layer_state)
        return (x, new_states) if return_state else x


class SASRecLayer(nn.Module):
    """Causal multi-head self-attention and FFN, each with residual and post-LayerNorm."""

    def __init__(self, d_model: int, n_heads: int, d_inner: int, dropout: float, attn_dropout: float, eps: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"SASRec: hidden_size {d_model} is not a multiple of n_heads {n_heads}")
        self.n_heads, self.attn_dropout = n_heads, attn_dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.ffn = FeedForward(d_model, d_inner, dropout, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # (b, h, l, p)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        y = self.out(y.transpose(1, 2).reshape(b, l, d))
        return self.ffn(self.norm(x + self.dropout(y)))


class SASRec(SequentialRecommender):
    """SASRec baseline. ``forward(items (b, l), mask (b, l)) -> hidden (b, l, hidden_size)``, right padding,
    ``l <= max_len``."""

    def __init__(self, n_items: int, max_len: int = 200, hidden_size: int = 64, n_layers: int = 2, n_heads: int = 2,
                 inner_size: int = 256, dropout: float = 0.2, attn_dropout: float = 0.2,
                 layer_norm_eps: float = 1e-12):
        super().__init__(n_items, hidden_size)
        self.max_len = max_len
        self.position_embedding = nn.Embedding(max_len, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(SASRecLayer(hidden_size, n_heads, inner_size, dropout, attn_dropout,
                                                layer_norm_eps) for _ in range(n_layers))
        self._init_weights(self.modules())

    def forward(self, items: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        length = items.shape[1]
        if length > self.max_len:
            raise ValueError(f"SASRec: {length} positions exceed max_len={self.max_len}; keep the last max_len items")
        if mask is not None and (mask[:, 1:] & ~mask[:, :-1]).any():
            raise ValueError("SASRec needs right padding (mask True then False along each row)")
        positions = torch.arange(length, device=items.device)
        x = self.dropout(self.norm(self.item_embedding(items) + self.position_embedding(positions)))
        for layer in self.layers:
            x = layer(x)
        return x
