"""LightningModule for sequential recommendation: Mamba4Rec or SASRec, CE over all items, full ranking."""
from __future__ import annotations

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from seqmamba.tasks.recommendation.metrics import full_ranking_metrics, metric_names
from seqmamba.tasks.recommendation.model import Mamba4Rec, SASRec, SequentialRecommender


def build_model(model: str, n_items: int, hidden_size: int = 64, n_layers: int | None = None, d_state: int = 32,
                d_conv: int = 4, expand: int = 2, dropout: float = 0.2, n_heads: int = 2, inner_size: int = 256,
                max_positions: int = 200, **_) -> SequentialRecommender:
    """The nn.Module named by ``model`` ("mamba4rec" or "sasrec"); n_layers defaults to 1 and 2 (the papers)."""
    if model == "mamba4rec":
        return Mamba4Rec(n_items, hidden_size, n_layers or 1, d_state, d_conv, expand, dropout)
    if model == "sasrec":
        return SASRec(n_items, max_positions, hidden_size, n_layers or 2, n_heads, inner_size, dropout, dropout)
    raise ValueError(f"model must be 'mamba4rec' or 'sasrec', got {model!r}")


class SequentialRecModule(L.LightningModule):
    """Trains a sequential recommender on ``RecDataModule`` batches; validates and tests with full ranking.

    Args:
        model: "mamba4rec" or "sasrec".
        n_items: catalogue size; None reads it from the trainer's datamodule in ``setup`` (and the
            checkpoint then stores it).
        hidden_size, n_layers, dropout: shared; n_layers None = 1 for Mamba4Rec, 2 for SASRec.
        d_state, d_conv, expand: Mamba4Rec's mixer.
        n_heads, inner_size: SASRec's attention.
        max_positions: SASRec's position table, at least the data's ``max_len`` (SASRec cannot read more).
        lr, weight_decay: Adam (the papers' optimiser).
        topk: K values of HR@K / NDCG@K / MRR@K.
        exclude_history: rank without the user's earlier items (see ``metrics``); off as in RecBole.
        n_negatives: 0 = cross-entropy over all items; > 0 = sampled softmax against that many uniformly
            drawn items shared by the batch (with log-Q correction), for catalogues of millions.
        eval_full_history: Mamba4Rec only: validate and test from each user's whole history before the
            target instead of its last ``max_len`` items (the recurrent state makes the length free; the
            mixer segments very long inputs itself). SASRec always reads the last ``max_len`` items.
    """

    def __init__(self, model: Literal["mamba4rec", "sasrec"] = "mamba4rec", n_items: int | None = None,
                 hidden_size: int = 64, n_layers: int | None = None, d_state: int = 32, d_conv: int = 4,
                 expand: int = 2, dropout: float = 0.2, n_heads: int = 2, inner_size: int = 256,
                 max_positions: int = 200, lr: float = 1e-3, weight_decay: float = 0.0, topk: list[int] = [10],
                 exclude_history: bool = False, n_negatives: int = 0, eval_full_history: bool = False):
        super().__init__()
        if model not in ("mamba4rec", "sasrec"):
            raise ValueError(f"model must be 'mamba4rec' or 'sasrec', got {model!r}")
        self.save_hyperparameters()
        self.model: SequentialRecommender | None = None
        if n_items is not None:
            self.model = build_model(**self.hparams)
        self.names = metric_names(topk)
        self.val_metrics = torch.nn.ModuleDict({n: MeanMetric() for n in self.names})
        self.test_metrics = torch.nn.ModuleDict({n: MeanMetric() for n in self.names})

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.model is None:
            if datamodule is None or not hasattr(datamodule, "n_items"):
                raise ValueError("SequentialRecModule: n_items is not set and the trainer has no datamodule "
                                 "with n_items")
            self.hparams.n_items = int(datamodule.n_items)
            self.model = build_model(**self.hparams)
        data_len = getattr(datamodule, "hparams", {}).get("max_len")
        if self.hparams.model == "sasrec" and data_len and data_len > self.hparams.max_positions:
            raise ValueError(f"SASRec max_positions={self.hparams.max_positions} is below the data's "
                             f"max_len={data_len}")

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scores ``(b, n_items + 1)`` for the item after each row's last real position."""
        hidden = self.model(items, mask)
        return self.model.item_scores(self.model.last_hidden(hidden, mask))

    def on_fit_start(self) -> None:
        callback = self.trainer.checkpoint_callback
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.trainer.is_global_zero and callback is not None and callback.dirpath and \
                hasattr(datamodule, "save_id_map"):
            print(f"id map: {datamodule.save_id_map(callback.dirpath)}")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        mask = batch["mask"]
        trained = batch.get("loss_mask", mask)  # real positions whose targets this window trains
        hidden = self.model(batch["items"], mask)[trained]  # (m, d)
        targets = batch["targets"][trained]  # (m,)
        loss = self._loss(hidden, targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(targets.numel()))
        return loss

    def _loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.hparams.n_negatives <= 0:
            return F.cross_entropy(self.model.item_scores(hidden), targets)
        weight = self.model.item_embedding.weight
        n = self.model.n_items
        negatives = torch.randint(1, n + 1, (self.hparams.n_negatives,), device=hidden.device)
        pos = (hidden * weight[targets]).sum(-1, keepdim=True)  # (m, 1)
        neg = hidden @ weight[negatives].t()  # (m, k)
        # log-Q correction for uniform sampling, and accidental hits of the target masked out
        neg = neg - torch.log(torch.tensor(self.hparams.n_negatives / n, device=hidden.device))
        neg = neg.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
        logits = torch.cat([pos, neg], dim=1)
        return F.cross_entropy(logits, torch.zeros_like(targets))

    def eval_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(items, mask)`` to score: the batch's last-``max_len`` window, or with ``eval_full_history``
        (Mamba4Rec) the whole history rebuilt right-padded from the batch's (history_row, history_item)."""
        if not (self.hparams.eval_full_history and self.model.streamable):
            return batch["items"], batch["mask"]
        rows, history = batch["history_row"], batch["history_item"]  # chronological within each row
        b = batch["target"].shape[0]
        counts = torch.bincount(rows, minlength=b)
        column = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
        width = int(counts.max())
        items = torch.zeros(b, width, dtype=history.dtype, device=history.device)
        mask = torch.zeros(b, width, dtype=torch.bool, device=history.device)
        items[rows, column], mask[rows, column] = history, True
        return items, mask

    def _evaluate(self, batch: dict, metrics: torch.nn.ModuleDict) -> None:
        scores = self(*self.eval_inputs(batch))
        history = (batch["history_row"], batch["history_item"]) if self.hparams.exclude_history else None
        values = full_ranking_metrics(scores, batch["target"], self.hparams.topk, history)
        for name, value in values.items():
            metrics[name].update(value)

    def _log_metrics(self, prefix: str, metrics: torch.nn.ModuleDict) -> None:
        for name, metric in metrics.items():
            if metric.update_count:
                self.log(f"{prefix}/{name}", metric.compute(), prog_bar=name == f"ndcg@{self.hparams.topk[0]}")
            metric.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
