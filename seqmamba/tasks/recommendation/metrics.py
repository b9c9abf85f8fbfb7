"""Full-ranking metrics: each target item is ranked against every item, on the scores' device.

``rank`` is the number of items scored strictly higher than the target (0 = top). With one relevant
item per user: HR@K = [rank < K], NDCG@K = [rank < K] / log2(rank + 2), MRR@K = [rank < K] / (rank + 1).
Ties go in the target's favour (only strictly higher scores count); padding (column 0) is -inf.

History exclusion (``exclude_history``): items the user interacted with before the target are set to
-inf, except the target itself, so a repeated item stays rankable. RecBole's sequential models rank
without exclusion (its default for this protocol), which is why exclusion is off by default.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def exclude_history(scores: torch.Tensor, rows: torch.Tensor, items: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    """scores ``(b, n)``; (rows, items) ``(m,)`` pairs of history items; targets ``(b,)``. Returns a copy
    with history items at -inf and each row's target score kept."""
    scores = scores.clone()
    kept = scores.gather(1, targets[:, None])
    scores[rows, items] = float("-inf")
    scores.scatter_(1, targets[:, None], kept)
    return scores


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scores ``(b, n)``, targets ``(b,)`` -> rank ``(b,)``: items scored strictly above the target."""
    target_scores = scores.gather(1, targets[:, None])  # (b, 1)
    return (scores > target_scores).sum(dim=1)


def ranking_metrics(ranks: torch.Tensor, ks: Sequence[int] = (10,)) -> dict[str, torch.Tensor]:
    """Per-target ``hit@K``, ``ndcg@K``, ``mrr@K`` ``(b,)`` float tensors from ranks ``(b,)``."""
    out = {}
    ranks = ranks.to(torch.float64)
    for k in ks:
        hit = (ranks < k).to(torch.float64)
        out[f"hit@{k}"] = hit
        out[f"ndcg@{k}"] = hit / torch.log2(ranks + 2)
        out[f"mrr@{k}"] = hit / (ranks + 1)
    return out


def full_ranking_metrics(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (10,),
                         history: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Rank ``targets`` among all columns of ``scores`` ``(b, n_items + 1)`` and return per-target metrics;
    ``history=(rows, items)`` excludes those items first (see the module docstring)."""
    if history is not None:
        scores = exclude_history(scores, history[0], history[1], targets)
    return ranking_metrics(target_ranks(scores, targets), ks)


def metric_names(ks: Sequence[int]) -> list[str]:
    return [f"{name}@{k}" for k in ks for name in ("hit", "ndcg", "mrr")]


__all__ = ["exclude_history", "full_ranking_metrics", "metric_names", "ranking_metrics", "target_ranks"]
