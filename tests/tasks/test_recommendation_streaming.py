"""Streamed scoring of Mamba4Rec (state carried across chunks of a history) equals one pass over it.

No CLI imports here, so these also run where only torch, numpy and polars are installed (the GPU machine).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from seqmamba.tasks.recommendation import Mamba4Rec, api
from tests.utils import assert_close


def tiny_mamba(n_items: int = 30):
    return Mamba4Rec(n_items, hidden_size=16, n_layers=2, d_state=8).eval()


def one_shot(model, history):
    ids = torch.tensor([history], device=model.item_embedding.weight.device)
    with torch.no_grad():
        return model(ids, torch.ones_like(ids, dtype=torch.bool))[0, -1]


@pytest.mark.parametrize("chunk, lengths", [(1, [9, 3, 1]), (7, [40, 23, 1, 7, 14]), (64, [150, 23, 1, 64, 65])])
def test_streamed_equals_one_shot(chunk, lengths):
    model = tiny_mamba()
    rng = np.random.default_rng(0)
    items = rng.integers(1, 31, size=sum(lengths)).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    streamed = api.last_hidden_streamed(model, items, offsets[:-1], offsets[1:], chunk_len=chunk)
    for u in range(len(lengths)):
        assert_close(f"user {u}", streamed[u], one_shot(model, items[offsets[u]:offsets[u + 1]].tolist()), 1e-5)


def streamed_vs_one_shot_long(n_events: int, chunk: int, device: str = "cpu"):
    model = Mamba4Rec(100, hidden_size=8, n_layers=1, d_state=4).eval().to(device)
    items = np.random.default_rng(1).integers(1, 101, size=n_events).astype(np.int32)
    offsets = np.array([0, n_events])
    users, top, _ = api.top_k(model, items, offsets, k=5, chunk_len=chunk, progress=False)
    streamed = api.last_hidden_streamed(model, items, offsets[:-1], offsets[1:], chunk_len=chunk)
    whole = one_shot(model, items.tolist()) if n_events <= 100_000 else \
        api.last_hidden_streamed(model, items, offsets[:-1], offsets[1:], chunk_len=n_events // 3 + 1)[0]
    assert_close("history", streamed[0].cpu(), whole.cpu(), 1e-4)
    assert top[0].tolist() == model.item_scores(whole).topk(5).indices.tolist()


def test_streamed_scoring_long_history():
    streamed_vs_one_shot_long(5_000, chunk=512)


@pytest.mark.slow
def test_streamed_scoring_million_events():
    streamed_vs_one_shot_long(1_000_000, 65_536, "cuda" if torch.cuda.is_available() else "cpu")
