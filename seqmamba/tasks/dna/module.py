"""LightningModules for DNA: masked-LM pretraining and sequence/per-position fine-tuning.

Both use the Caduceus recipe (FIELD_NOTES section 3): AdamW with betas (0.9, 0.95), weight decay 0.1 (none on
biases, norms, A_log, D), linear warmup over 10% of the steps, then cosine decay. Gradient clipping and bf16
are trainer settings (see ``configs/dna``).
"""
from __future__ import annotations

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MeanSquaredError, PearsonCorrCoef
from torchmetrics.classification import AUROC, Accuracy

from seqmamba import MambaConfig
from seqmamba.tasks.common import adamw_warmup_cosine
from seqmamba.tasks.dna.model import (CaduceusConfig, CaduceusForMaskedLM, CaduceusWithHead, Pooling,
                                      RCMode, mlm_loss)

BASES = slice(7, 11)  # ids of A, C, G, T: masked-LM accuracy is the argmax over the four bases


class DNAMaskedLM(L.LightningModule):
    """Caduceus-PS (``rcps=True``) or -Ph masked-LM pretraining.

    Batches: ``input_ids (b, l)``, ``mask (b, l)``, ``labels (b, l)`` (-100 where no loss counts), as made by
    ``seqmamba.data.dna.DNAPretrainData``. Logs ``{train,val,test}_loss`` (cross-entropy over masked bases),
    ``_acc`` (top-1 over A/C/G/T) and ``_ppl`` (exp of the loss). Ph models are evaluated conjoined
    (``conjoin_eval``). ``init_from``: start from a pretrained directory or checkpoint (ours or released).
    At the end of ``fit`` the model is saved with ``save_pretrained`` to ``<run dir>/pretrained``.
    """

    def __init__(self, d_model: int = 256, n_layer: int = 4, rcps: bool = True, d_state: int = 16,
                 d_conv: int = 4, expand: int = 2, lr: float = 8e-3, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_ratio: float = 0.1, min_lr_ratio: float = 0.0,
                 conjoin_eval: bool = True, checkpoint_activations: bool = False, init_from: str | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.save_hyperparameters()
        config = CaduceusConfig(d_model=d_model, n_layer=n_layer, rcps=rcps,
                                mamba=MambaConfig(d_state=d_state, d_conv=d_conv, expand=expand),
                                checkpoint_activations=checkpoint_activations)
        self.model = CaduceusForMaskedLM(config, backend)
        if init_from:
            from seqmamba.tasks.dna.checkpoints import backbone_from_source, load_state_into
            source = backbone_from_source(init_from)
            load_state_into(self.model.caduceus, source.state_dict(), init_from)
        self.nll = torch.nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None,
                conjoin: bool | None = None) -> torch.Tensor:
        """Logits ``(b, l, 16)``; Ph conjoined unless ``conjoin=False``."""
        conjoin = self.hparams.conjoin_eval if conjoin is None else conjoin
        return self.model(input_ids, mask, conjoin=conjoin and not self.hparams.rcps)

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        conjoin = stage != "train" and self.hparams.conjoin_eval and not self.hparams.rcps
        logits = self.model(batch["input_ids"], batch["mask"], conjoin=conjoin)
        labels = batch["labels"]
        loss = mlm_loss(logits, labels)
        target = labels != -100
        count = int(target.sum())
        correct = (logits[..., BASES].argmax(-1) + BASES.start == labels)[target].float()
        acc = correct.mean() if count else torch.zeros((), device=logits.device)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=on_step, on_epoch=not on_step, batch_size=count)
        self.log(f"{stage}_acc", acc, prog_bar=stage != "train", on_step=on_step, on_epoch=not on_step,
                 batch_size=count)
        if stage == "train":
            self.log("train_ppl", loss.detach().exp(), on_step=True, batch_size=count)
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        else:
            self.nll[stage].update(loss.detach(), weight=max(count, 1))
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    def _log_ppl(self, stage: str) -> None:
        self.log(f"{stage}_ppl", torch.exp(self.nll[stage].compute()))
        self.nll[stage].reset()

    def on_validation_epoch_end(self) -> None:
        self._log_ppl("val")

    def on_test_epoch_end(self) -> None:
        self._log_ppl("test")

    def on_fit_end(self) -> None:
        log_dir = self.trainer.log_dir  # a broadcast under DDP: every rank must ask, not only rank 0
        if self.trainer.is_global_zero and log_dir:
            from pathlib import Path
            path = self.model.save_pretrained(Path(log_dir) / "pretrained")
            print(f"pretrained model: {path}")

    def configure_optimizers(self):
        h = self.hparams
        return adamw_warmup_cosine(self, h.lr, h.weight_decay, tuple(h.betas), h.warmup_ratio, h.min_lr_ratio)


class DNASequenceModule(L.LightningModule):
    """Fine-tuning: classification or regression of whole sequences (``level="sequence"``) or of every
    position (``level="token"``, per-position labels ``(b, l)`` with -100 ignored).

    ``pretrained``: a released Caduceus directory, our ``save_pretrained`` directory, or a ``.ckpt`` of
    ``DNAMaskedLM``; its architecture replaces ``d_model``/``n_layer``/``rcps``/... (the hyperparameters saved
    in this module's checkpoints are updated to match). ``num_classes``: from the DataModule
    (``num_classes`` attribute) when None. Heads: on PS backbones ``rc_mode="invariant"`` gives outputs that
    do not change under reverse complement (enhancer / promoter / species labels); ``"equivariant"`` with
    ``label_permutation`` gives outputs that permute (strand of a feature, motif direction: e.g. classes
    ``[+, -]`` and ``label_permutation=[1, 0]``). Ph models are conjoined at evaluation (``conjoin_eval``).
    Logs loss, accuracy and (two classes) AUROC, or MSE and Pearson r for regression.
    """

    def __init__(self, task: Literal["classification", "regression"] = "classification",
                 num_classes: int | None = None, level: Literal["sequence", "token"] = "sequence",
                 pooling: Pooling = "mean", rc_mode: RCMode = "invariant", label_permutation: list[int] | None = None,
                 pretrained: str | None = None, d_model: int = 256, n_layer: int = 4, rcps: bool = True,
                 d_state: int = 16, d_conv: int = 4, expand: int = 2, dropout: float = 0.0,
                 lr: float = 1e-3, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                 warmup_ratio: float = 0.1, min_lr_ratio: float = 0.0, freeze_backbone: bool = False,
                 conjoin_eval: bool = True, backend: str = "auto"):
        super().__init__()
        if task not in ("classification", "regression"):
            raise ValueError(f"DNASequenceModule: task must be 'classification' or 'regression', got {task!r}")
        self.save_hyperparameters()
        self.model: CaduceusWithHead | None = None
        if num_classes is not None or task == "regression":
            self._build(num_classes)

    # ------------------------------------------------------------------ model building
    def _build(self, num_classes: int | None) -> None:
        h = self.hparams
        n_out = 1 if h.task == "regression" else int(num_classes)
        if h.task == "classification" and n_out < 2:
            raise ValueError(f"DNASequenceModule: classification needs >= 2 classes, got {n_out}")
        backbone = None
        if h.pretrained:
            from seqmamba.tasks.dna.checkpoints import backbone_from_source
            backbone = backbone_from_source(h.pretrained, h.backend)
            cfg = backbone.config
            self.hparams.update(d_model=cfg.d_model, n_layer=cfg.n_layer, rcps=cfg.rcps, d_state=cfg.mamba.d_state,
                                d_conv=cfg.mamba.d_conv, expand=cfg.mamba.expand)
            config = cfg
        else:
            config = CaduceusConfig(d_model=h.d_model, n_layer=h.n_layer, rcps=h.rcps,
                                    mamba=MambaConfig(d_state=h.d_state, d_conv=h.d_conv, expand=h.expand))
        self.hparams.update(num_classes=None if h.task == "regression" else n_out)
        model = CaduceusWithHead(config, n_out, h.level, h.pooling, h.rc_mode, h.label_permutation, h.dropout,
                                 h.backend)
        if backbone is not None:
            model.caduceus.load_state_dict(backbone.state_dict())
        if h.freeze_backbone:
            model.caduceus.requires_grad_(False)
        self.model = model
        self.metrics = torch.nn.ModuleDict({stage: self._metrics(n_out) for stage in ("val", "test")})

    def _metrics(self, n_out: int) -> torch.nn.ModuleDict:
        if self.hparams.task == "regression":
            return torch.nn.ModuleDict({"mse": MeanSquaredError(), "pearson": PearsonCorrCoef()})
        metrics = {"acc": Accuracy(task="multiclass", num_classes=n_out, ignore_index=-100)}
        if n_out == 2:
            metrics["auroc"] = AUROC(task="binary", ignore_index=-100)
        return torch.nn.ModuleDict(metrics)

    def setup(self, stage: str) -> None:
        if self.model is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            num_classes = getattr(datamodule, "num_classes", None)
            if num_classes is None:
                raise ValueError("DNASequenceModule: num_classes is not set and the DataModule does not provide it")
            self._build(num_classes)

    # ------------------------------------------------------------------ inference
    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None,
                conjoin: bool | None = None) -> torch.Tensor:
        """Logits ``(b, n_classes)`` / ``(b, l, n_classes)``, or regression values ``(b,)`` / ``(b, l)``."""
        conjoin = self.hparams.conjoin_eval if conjoin is None else conjoin
        out = self.model(input_ids, mask, conjoin=conjoin and not self.hparams.rcps)
        return out.squeeze(-1) if self.hparams.task == "regression" else out

    # ------------------------------------------------------------------ steps
    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        conjoin = stage != "train" and self.hparams.conjoin_eval and not self.hparams.rcps
        out = self.model(batch["input_ids"], batch["mask"], conjoin=conjoin)
        labels = batch["labels"]
        if self.hparams.task == "regression":
            out = out.squeeze(-1)
            keep = batch["mask"] if out.dim() == 2 else torch.ones_like(labels, dtype=torch.bool)
            pred, target = out[keep].float(), labels.to(out.dtype)[keep].float()
            loss = F.mse_loss(pred, target)
        else:
            pred, target = out.reshape(-1, out.shape[-1]).float(), labels.reshape(-1).long()
            loss = F.cross_entropy(pred, target, ignore_index=-100)
        n = int((target != -100).sum()) if self.hparams.task == "classification" else target.numel()
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=on_step, on_epoch=not on_step, batch_size=max(n, 1))
        if stage == "train":
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
            if self.hparams.task == "classification":
                acc = (pred.argmax(-1) == target)[target != -100].float().mean()
                self.log("train_acc", acc, on_step=True, batch_size=max(n, 1))
        else:
            for name, metric in self.metrics[stage].items():
                if name == "auroc":
                    metric.update(pred.softmax(-1)[:, 1], target)
                else:
                    metric.update(pred, target)
                self.log(f"{stage}_{name}", metric, on_epoch=True, prog_bar=name in ("acc", "auroc"))
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self(batch["input_ids"], batch["mask"])
        return out.softmax(-1) if self.hparams.task == "classification" else out

    def configure_optimizers(self):
        h = self.hparams
        return adamw_warmup_cosine(self, h.lr, h.weight_decay, tuple(h.betas), h.warmup_ratio, h.min_lr_ratio)
