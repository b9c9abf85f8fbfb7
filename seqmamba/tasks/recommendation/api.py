"""Python API: load a trained recommender with its id map, recommend, and batch-score whole logs.

    from seqmamba.tasks.recommendation import api
    rec = api.load("runs/SequentialRecModule/<run>/checkpoints/last.ckpt")
    rec.recommend({"u1": ["i3", "i9"]}, k=10)            # polars DataFrame: user, rank, item, score
    rec.score_log("log.parquet", "recs.parquet", k=10)   # every user's top-K from their full history

Histories longer than the chunk length are streamed through Mamba4Rec by carrying the recurrent state
(one chunk of ``chunk_len`` events at a time per batch), so memory does not grow with the history and the
scores equal those of one pass over the whole history. SASRec cannot stream: it sees the last ``max_len``
items (a warning says so).
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from seqmamba.data.recommendation import (ColumnMap, IdMap, build_sequences, gather_padded, read_interactions)
from seqmamba.hub import atomic_write
from seqmamba.tasks.recommendation.model import SequentialRecommender
from seqmamba.tasks.recommendation.module import SequentialRecModule


@torch.no_grad()
def last_hidden_streamed(model: SequentialRecommender, items: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                         chunk_len: int | None = None) -> torch.Tensor:
    """Hidden state after each history ``items[starts[j]:ends[j]]`` (non-empty) -> ``(b, d)``.

    Mamba4Rec reads the histories ``chunk_len`` events at a time, carrying each layer's state (``None``:
    one pass). Padding is masked, so rows of different lengths share a batch exactly. SASRec reads the
    last ``max_len`` events.
    """
    device = model.item_embedding.weight.device
    lengths = ends - starts
    if (lengths < 1).any():
        raise ValueError("every history needs at least one item")
    if not model.streamable:
        starts = np.maximum(starts, ends - model.max_len)
        ids, mask = gather_padded(items, starts, ends)
        ids, mask = ids.to(device), mask.to(device)
        return model.last_hidden(model(ids, mask), mask)
    longest = int(lengths.max())
    chunk_len = longest if chunk_len is None else chunk_len
    out, state = None, None
    for offset in range(0, longest, chunk_len):
        lo = np.minimum(starts + offset, ends)
        ids, mask = gather_padded(items, lo, np.minimum(lo + chunk_len, ends), width=min(chunk_len, longest - offset))
        ids, mask = ids.to(device), mask.to(device)
        hidden, state = model(ids, mask, state=state, return_state=True)
        if out is None:  # the hidden dtype (float32, or bfloat16 under autocast)
            out = hidden.new_empty(len(starts), hidden.shape[-1])
        done = (lengths > offset) & (lengths <= offset + chunk_len)  # rows whose last event is in this chunk
        if done.any():
            rows = torch.from_numpy(np.flatnonzero(done)).to(device)
            out[rows] = hidden[rows, torch.from_numpy(lengths[done] - 1 - offset).to(device)]
    return out


@torch.no_grad()
def top_k(model: SequentialRecommender, items: np.ndarray, offsets: np.ndarray, k: int = 10,
          users: np.ndarray | None = None, batch_size: int = 256, chunk_len: int | None = 2048,
          exclude_history: bool = False, progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` item indices and scores after each user's whole history (``items[offsets[u]:offsets[u+1]]``).

    Users are batched by length (longest first) and streamed in chunks of ``chunk_len`` events.
    ``exclude_history`` drops items already in the history. Users with an empty history are skipped and
    left out of the result. Returns ``(users (m,), items (m, k), scores (m, k))`` in user order.
    """
    if not model.streamable:
        warnings.warn(f"{type(model).__name__} cannot stream: scoring from the last {model.max_len} items",
                      stacklevel=2)
    model.eval()
    users = np.arange(len(offsets) - 1) if users is None else np.asarray(users)
    lengths = offsets[users + 1] - offsets[users]
    users = users[lengths > 0]
    order = users[np.argsort(-(offsets[users + 1] - offsets[users]), kind="stable")]
    k = min(k, model.n_items)
    top_items = np.zeros((len(order), k), dtype=np.int64)
    top_scores = np.zeros((len(order), k), dtype=np.float32)
    device = model.item_embedding.weight.device
    bar = tqdm(total=int((offsets[order + 1] - offsets[order]).sum()), unit="event", desc="scoring",
               disable=not progress)
    for lo in range(0, len(order), batch_size):
        batch = order[lo:lo + batch_size]
        starts, ends = offsets[batch], offsets[batch + 1]
        scores = model.item_scores(last_hidden_streamed(model, items, starts, ends, chunk_len))
        if exclude_history:
            hist_len = ends - starts
            rows = np.repeat(np.arange(len(batch)), hist_len)
            flat = np.arange(rows.size) - np.repeat(np.cumsum(hist_len) - hist_len, hist_len) + starts[rows]
            scores[torch.from_numpy(rows).to(device), torch.from_numpy(items[flat].astype(np.int64)).to(device)] = \
                float("-inf")
        values, index = scores.topk(k, dim=1)
        top_items[lo:lo + len(batch)] = index.cpu().numpy()
        top_scores[lo:lo + len(batch)] = values.float().cpu().numpy()
        bar.update(int((ends - starts).sum()))
    bar.close()
    back = np.argsort(order, kind="stable")
    return order[back], top_items[back], top_scores[back]


class Recommender:
    """A trained model and its id map (``load`` builds it)."""

    def __init__(self, model: SequentialRecommender, id_map: IdMap):
        self.model, self.id_map = model.eval(), id_map

    def _frame(self, users, items, scores, user_ids) -> pl.DataFrame:
        k = items.shape[1]
        return pl.DataFrame({
            "user": pl.Series(user_ids).gather(np.repeat(users, k)) if user_ids is not None
            else self.id_map.decode_users(np.repeat(users, k)),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(users)),
            "item": self.id_map.decode_items(items.reshape(-1)),
            "score": scores.reshape(-1),
        })

    def recommend(self, histories: dict, k: int = 10, exclude_history: bool = False,
                  chunk_len: int | None = 2048, progress: bool = False) -> pl.DataFrame:
        """``{user: [raw item ids, oldest first]}`` -> top-``k`` rows (user, rank, item, score).
        Unknown items raise ``UnknownIdError``; the users may be new."""
        user_ids = list(histories)
        encoded = [self.id_map.encode_items(list(histories[u])) for u in user_ids]
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        if (lengths == 0).any():
            raise ValueError(f"empty history for user(s) {[u for u, n in zip(user_ids, lengths) if n == 0][:5]}")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.concatenate(encoded).astype(np.int32) if encoded else np.zeros(0, np.int32)
        users, items, scores = top_k(self.model, flat, offsets, k, chunk_len=chunk_len,
                                     exclude_history=exclude_history, progress=progress)
        return self._frame(users, items, scores, user_ids)

    def score_log(self, log: str | Path | pl.DataFrame, out: str | Path, k: int = 10,
                  columns: ColumnMap | None = None, users: list | None = None, exclude_history: bool = False,
                  batch_size: int = 256, chunk_len: int | None = 2048, progress: bool = True,
                  unknown_items: Literal["error", "drop"] = "error") -> Path:
        """Top-``k`` for every user of a log (file or DataFrame with columns user, item[, timestamp]) from
        their full history, written to parquet ``out`` atomically (columns user, rank, item, score).
        ``users`` restricts scoring to those raw user ids (each must be in the log). Items the model does
        not know raise ``UnknownIdError`` naming them, or with ``unknown_items="drop"`` are removed from the
        histories (their count is printed); requested users absent from the log raise ``UnknownIdError``."""
        table = log if isinstance(log, pl.DataFrame) else read_interactions(log, columns)
        if "row" not in table.columns:
            table = table.with_row_index("row")
        if unknown_items == "drop":
            known = table["item"].is_in(self.id_map.items.cast(table["item"].dtype, strict=False))
            if not known.all():
                print(f"score_log: dropped {int((~known).sum())} interactions with items the model does not know")
                table = table.filter(known)
        elif unknown_items != "error":
            raise ValueError(f"unknown_items must be 'error' or 'drop', got {unknown_items!r}")
        user_ids = table["user"].unique().sort()
        selected = None
        if users is not None:
            selected = IdMap(user_ids, pl.Series([], dtype=pl.Int64)).encode_users(users)
        table = table.with_columns((pl.col("user").rank("dense") - 1).cast(pl.Int64).alias("user"),
                                   pl.Series("item", self.id_map.encode_items(table["item"])).cast(pl.Int32))
        seqs = build_sequences(table, user_ids.len())
        users, items, scores = top_k(self.model, seqs.items, seqs.offsets, k, users=selected, batch_size=batch_size,
                                     chunk_len=chunk_len, exclude_history=exclude_history, progress=progress)
        frame = self._frame(users, items, scores, user_ids)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda tmp: frame.write_parquet(tmp))
        return out


def load(checkpoint: str | Path, device: str | torch.device = "cpu", id_map: str | Path | None = None) -> Recommender:
    """A Lightning checkpoint of ``SequentialRecModule`` and the id map written beside it
    (``<checkpoint dir>/id_map``, or ``id_map``)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    module = SequentialRecModule.load_from_checkpoint(checkpoint, map_location=device, weights_only=False)
    ids = IdMap.load(Path(id_map) if id_map else checkpoint.parent / "id_map")
    if ids.n_items != module.hparams.n_items:
        raise ValueError(f"id map has {ids.n_items} items but the checkpoint's model has {module.hparams.n_items}")
    return Recommender(module.model.to(device), ids)


def main(args: list[str] | None = None) -> None:
    """``seqmamba recommend CHECKPOINT LOG OUT.parquet [-k 10] ...``"""
    parser = argparse.ArgumentParser(prog="seqmamba recommend",
                                     description="Top-K recommendations for every user of a log, to parquet.")
    parser.add_argument("checkpoint")
    parser.add_argument("log", help="CSV/TSV/parquet/RecBole .inter interaction log")
    parser.add_argument("out", help="output parquet (user, rank, item, score)")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--user-col", default="user_id")
    parser.add_argument("--item-col", default="item_id")
    parser.add_argument("--time-col", default="timestamp", help="'' when the log has none (file order)")
    parser.add_argument("--exclude-history", action="store_true")
    parser.add_argument("--drop-unknown-items", action="store_true", help="drop items the model does not know")
    parser.add_argument("--chunk-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ns = parser.parse_args(args)
    rec = load(ns.checkpoint, ns.device)
    out = rec.score_log(ns.log, ns.out, k=ns.k, columns=ColumnMap(ns.user_col, ns.item_col, ns.time_col or None),
                        exclude_history=ns.exclude_history, batch_size=ns.batch_size, chunk_len=ns.chunk_len,
                        unknown_items="drop" if ns.drop_unknown_items else "error")
    print(f"recommendations: {out}")


if __name__ == "__main__":
    main()
