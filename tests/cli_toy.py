"""Toy task for the CLI tests: a tiny regressor and a DataModule of random tensors (no real task needed)."""

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class ToyRegressor(LightningModule):
    def __init__(self, in_features: int = 3, hidden: int = 4, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x):
        """x: (b, in_features) -> (b, 1)"""
        return self.net(x)

    def _loss(self, batch, stage):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log(f"{stage}_loss", loss)
        return loss

    def training_step(self, batch, batch_idx):
        return self._loss(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._loss(batch, "val")

    def test_step(self, batch, batch_idx):
        self._loss(batch, "test")

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class ToyData(LightningDataModule):
    def __init__(self, n_samples: int = 16, in_features: int = 3, batch_size: int = 8, seed: int = 0):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n_samples, self.in_features, self.batch_size, self.seed = n_samples, in_features, batch_size, seed

    def setup(self, stage=None):
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.n_samples, self.in_features, generator=g)
        y = x.sum(-1, keepdim=True) + 0.1 * torch.randn(self.n_samples, 1, generator=g)
        self.dataset = TensorDataset(x, y)

    def _loader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size)

    train_dataloader = val_dataloader = test_dataloader = predict_dataloader = _loader


def main(argv: list[str]) -> int | None:
    """Toy task command for the CLI tests: ``toy-cmd ok|fail|bad-file|status N``."""
    what = argv[0]
    if what == "fail":
        raise ValueError("toy.txt, line 3: not a number: 'x'")
    if what == "bad-file":
        open("no/such/toy.file")
    if what == "status":
        return int(argv[1])
    print(f"toy command ran with {argv}")
    return None
