"""Python API of the DNA task: load a model, embed sequences, predict labels, score a (multi-)FASTA.

    from seqmamba.tasks.dna import api
    model = api.load("caduceus-ps_seqlen-131k")          # released dir, save_pretrained dir, or a .ckpt
    emb = api.embed(model, ["ACGTAGGCTA", "TTGACA"])      # (2, d_model), RC-invariant
    api.score_fasta(model, "genome.fa.gz", "scores.parquet")   # per-record and per-base tables
    api.plot_track("scores.bases.parquet", "chr1", 0, 20_000, "track.png")

Scoring writes two parquet files atomically (temporary file, then rename):
``OUT`` one row per record: ``record``, ``length``, ``mean_loglik``, ``embedding`` (mean-pooled per-base
features, list of d_model floats) and, for models with a sequence head, ``prediction`` (class probabilities or
the regression value); ``OUT.bases.parquet`` (masked-LM models) one row per base: ``record``, ``position``
(0-based), ``base``, ``loglik`` = log p(observed base | the sequence around it) over A/C/G/T from one unmasked
pass (null at N). ``mode="whole"`` runs each record in one pass (bidirectional context over the whole record;
the mixers segment long inputs with carried state, so memory is linear in the length; for GPUs);
``mode="windowed"`` runs windows of ``window`` bases overlapping by ``overlap`` and keeps the central part of each
window (every base sees at least ``overlap / 2`` bases of context on both sides except at the record ends; for
CPUs, where a whole multi-megabase record is slow). Memory is linear in the record length either way.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from seqmamba.hub import atomic_write
from seqmamba.tasks.dna.checkpoints import load_caduceus_mlm, safe_torch_load
from seqmamba.tasks.dna.model import PAD_ID, CaduceusForMaskedLM, CaduceusWithHead, rc_padded

_BASES = np.frombuffer(b"????????????????", dtype=np.uint8).copy()
_BASES[7:12] = np.frombuffer(b"ACGTN", dtype=np.uint8)


def load(source: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """A ``CaduceusForMaskedLM`` (released Caduceus directory, our ``save_pretrained`` directory, or a
    ``DNAMaskedLM`` .ckpt) or a ``CaduceusWithHead`` (a ``DNASequenceModule`` .ckpt), in eval mode."""
    path = Path(source)
    if path.is_dir():
        return load_caduceus_mlm(path, device=device).eval()
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path}: neither a model directory nor a Lightning checkpoint")
    hparams = dict(ckpt.get("hyper_parameters", {}))
    import inspect

    from seqmamba.tasks.dna.module import DNAMaskedLM, DNASequenceModule
    cls, source_key = (DNASequenceModule, "pretrained") if "task" in hparams else (DNAMaskedLM, "init_from")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    # the weights come from this checkpoint: never re-read the pretrained source it was started from
    module = cls(**{**{k: v for k, v in hparams.items() if k in accepted}, source_key: None})
    module.load_state_dict(ckpt["state_dict"], strict=False)
    model = module.model
    model.task = hparams.get("task", "mlm")
    return model.to(device).eval()


def tokenize(sequences: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Strings -> right-padded ids ``(b, l)`` and mask ``(b, l)``."""
    from seqmamba.data.dna import collate, encode
    batch = collate([{"input_ids": encode(s, "<input>", f"sequence {i}")[0].astype(np.int64)}
                     for i, s in enumerate(sequences)])
    return batch["input_ids"].to(device), batch["mask"].to(device)


def _caduceus(model: nn.Module):
    return model.caduceus


@torch.no_grad()
def embed(model: nn.Module, sequences: list[str], pooling: str = "mean", batch_size: int = 32) -> torch.Tensor:
    """RC-invariant sequence embeddings ``(n, d_model)`` (PS: both strands pooled; Ph: conjoined)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(sequences), batch_size):
        ids, mask = tokenize(sequences[i:i + batch_size], device)
        out.append(_caduceus(model).embed(ids, mask, pooling).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def predict(model: CaduceusWithHead, sequences: list[str], batch_size: int = 32) -> torch.Tensor:
    """Class probabilities ``(n, n_classes)`` (or regression values ``(n,)``) of a fine-tuned model, conjoined
    for Ph models."""
    if not isinstance(model, CaduceusWithHead):
        raise TypeError("predict needs a fine-tuned model (a DNASequenceModule checkpoint)")
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(sequences), batch_size):
        ids, mask = tokenize(sequences[i:i + batch_size], device)
        y = model(ids, mask, conjoin=not model.config.rcps).float().cpu()
        out.append(y.squeeze(-1) if getattr(model, "task", "") == "regression" else y.softmax(-1))
    return torch.cat(out)


def _run(model: nn.Module, ids: torch.Tensor, autocast: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """One sequence ``(1, l)`` -> (log-probs over A/C/G/T ``(l, 4)`` or None, features ``(l, d)``, head output)."""
    cad = _caduceus(model)
    conjoin = not cad.config.rcps
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        hidden = cad(ids)
        feats = _features(cad, hidden)
        logits = model.lm_head(hidden) if isinstance(model, CaduceusForMaskedLM) else None
        head = model.head(hidden, None) if isinstance(model, CaduceusWithHead) and model.head.level == "sequence" \
            else None
        if conjoin:
            ids_rc = rc_padded(ids, None, cad.complement)
            hidden_rc = cad(ids_rc)
            feats = 0.5 * (feats + torch.flip(_features(cad, hidden_rc), dims=(1,)))
            if logits is not None:
                logits = 0.5 * (logits + torch.flip(model.lm_head(hidden_rc), dims=(1,))[..., cad.complement])
            if head is not None:
                head = 0.5 * (head + model.head(hidden_rc, None)[..., model.head.label_permutation])
    logp = None if logits is None else torch.log_softmax(logits[0, :, 7:11].float(), -1)
    return logp, feats[0].float(), None if head is None else head[0].float()


def _features(cad, hidden: torch.Tensor) -> torch.Tensor:
    if not cad.config.rcps:
        return hidden
    h1, h2 = hidden.chunk(2, dim=-1)
    return 0.5 * (h1 + torch.flip(h2, dims=(-1,)))


@torch.no_grad()
def score_record(model: nn.Module, ids: np.ndarray, mode: Literal["whole", "windowed"] = "windowed",
                 window: int = 16384, overlap: int = 1024, progress=None) -> dict:
    """Scores of one record (ids ``(l,)``): per-base log-likelihoods ``(l,)`` (NaN at N), the mean feature
    vector and the head output. See the module docstring for the modes."""
    device = next(model.parameters()).device
    autocast = device.type == "cuda"
    n = len(ids)
    loglik = np.full(n, np.nan, dtype=np.float32)
    feat_sum, head_sum, head_weight = None, None, 0.0
    if mode == "whole":
        spans = [(0, n, 0, n)]
    else:
        if overlap >= window:
            raise ValueError(f"overlap ({overlap}) must be smaller than window ({window})")
        step, half = window - overlap, overlap // 2
        spans = []
        for start in range(0, max(n - overlap, 1), step):
            end = min(start + window, n)
            keep_lo = start if start == 0 else start + half
            keep_hi = end if end == n else end - half
            spans.append((start, end, keep_lo, keep_hi))
            if end == n:
                break
    for start, end, lo, hi in spans:
        chunk = torch.as_tensor(np.asarray(ids[start:end], dtype=np.int64), device=device)[None]
        chunk = torch.where(chunk == 11, PAD_ID, chunk)  # N is [PAD] to the model, as in pretraining
        logp, feats, head = _run(model, chunk, autocast)
        if logp is not None:
            observed = chunk[0, lo - start:hi - start] - 7
            is_base = (observed >= 0) & (observed < 4)
            values = logp[lo - start:hi - start].gather(1, observed.clamp(0, 3)[:, None])[:, 0]
            loglik[lo:hi] = torch.where(is_base, values, torch.nan).cpu().numpy()
        part = feats[lo - start:hi - start].sum(0).double().cpu()
        feat_sum = part if feat_sum is None else feat_sum + part
        if head is not None:
            weight = float(hi - lo)
            head_sum = head.double().cpu() * weight if head_sum is None else head_sum + head.double().cpu() * weight
            head_weight += weight
        if progress is not None:
            progress.update(hi - lo)
    out = {"loglik": loglik, "embedding": (feat_sum / max(n, 1)).float().numpy()}
    if head_sum is not None:
        out["head"] = (head_sum / head_weight).float()
    return out


BYTES_PER_BASE_AND_CHANNEL = 20
"""Peak GPU memory of a whole-record pass, per base and hidden channel (measured on an H100: 24.25 GiB for 2.81 Mb
and 48.99 GiB for 5.69 Mb at hidden width 512, bf16 autocast, i.e. ~18 bytes), rounded up."""


def resolve_mode(model: nn.Module, length: int, mode: str, window: int) -> tuple[str, int]:
    """``auto``: a whole-record pass on a GPU when it fits in the free memory (with 20% to spare), else windows
    of 2^20 bases (GPU) or ``window`` bases (CPU)."""
    if mode != "auto":
        return mode, window
    device = next(model.parameters()).device
    if device.type != "cuda":
        return "windowed", window
    cad = _caduceus(model)
    conjoin = 1 if cad.config.rcps else 2
    need = length * cad.hidden_width * BYTES_PER_BASE_AND_CHANNEL * conjoin
    free, _ = torch.cuda.mem_get_info(device)
    return ("whole", window) if need < 0.8 * free else ("windowed", max(window, 1 << 20))


def score_fasta(model: nn.Module, fasta: str | os.PathLike, out: str | os.PathLike,
                mode: Literal["auto", "whole", "windowed"] = "auto", window: int = 16384, overlap: int = 1024,
                per_base: bool = True, progress: bool = True) -> dict[str, Path]:
    """Score every record of a FASTA (plain/.gz/bgzip/.xz); returns the paths written (see module docstring).
    ``mode="auto"``: whole records on a GPU when they fit in its free memory (else windows of 2^20 bases with
    ``overlap``), windows of ``window`` bases on a CPU."""
    import polars as pl
    from tqdm.auto import tqdm

    from seqmamba.data.dna import Genome

    device = next(model.parameters()).device
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    genome = Genome(fasta)
    is_mlm = isinstance(model, CaduceusForMaskedLM)
    total = sum(genome.lengths.values())
    bar = tqdm(total=total, unit="bp", unit_scale=True, desc=f"scoring {Path(str(fasta)).name}",
               disable=not progress)
    rows = {"record": [], "length": [], "mean_loglik": [], "embedding": []}
    predictions = []
    parts_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        parts = []
        for index, (name, ids) in enumerate(genome.records.items()):
            record_mode, record_window = resolve_mode(model, len(ids), mode, window)
            result = score_record(model, ids, record_mode, record_window, min(overlap, record_window // 2), bar)
            rows["record"].append(name)
            rows["length"].append(len(ids))
            rows["mean_loglik"].append(float(np.nanmean(result["loglik"])) if is_mlm and
                                       np.isfinite(result["loglik"]).any() else None)
            rows["embedding"].append(result["embedding"].tolist())
            if "head" in result:
                head = result["head"]
                predictions.append(head.tolist() if getattr(model, "task", "") == "regression"
                                   else head.softmax(-1).tolist())
            if per_base and is_mlm:
                part = parts_dir / f"{index}.parquet"
                pl.DataFrame({"record": pl.Series([name] * len(ids), dtype=pl.Categorical),
                              "position": np.arange(len(ids), dtype=np.int64),
                              "base": _BASES[np.asarray(ids)].view("S1").astype(str),
                              "loglik": result["loglik"]}).write_parquet(part)
                parts.append(part)
        bar.close()
        table = pl.DataFrame(rows)
        if predictions:
            table = table.with_columns(pl.Series("prediction", predictions))
        written = {"records": out}
        atomic_write(out, lambda tmp: table.write_parquet(tmp))
        if parts:
            bases = out.with_name(out.name.removesuffix(".parquet") + ".bases.parquet")
            atomic_write(bases, lambda tmp: pl.scan_parquet(parts).sink_parquet(tmp))
            written["bases"] = bases
        return written
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)


def plot_track(bases_parquet: str | os.PathLike, record: str, start: int, end: int,
               out_png: str | os.PathLike, column: str = "loglik", smooth: int = 1) -> Path:
    """Draw a per-base column (default the log-likelihood) of ``record[start:end]`` to a PNG (atomically);
    ``smooth`` > 1 adds a running mean over that many bases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import polars as pl

    track = (pl.scan_parquet(bases_parquet)
             .filter((pl.col("record").cast(pl.String) == record) & (pl.col("position") >= start)
                     & (pl.col("position") < end))
             .select("position", column).collect().sort("position"))
    if track.height == 0:
        raise ValueError(f"{bases_parquet}: no rows for {record}:{start}-{end}")
    x, y = track["position"].to_numpy(), track[column].to_numpy().astype(float)
    fig, ax = plt.subplots(figsize=(12, 3))
    ax.plot(x, y, lw=0.5, color="0.6" if smooth > 1 else "C0", label=column)
    if smooth > 1:
        kernel = np.ones(smooth) / smooth
        filled = np.where(np.isnan(y), np.nanmean(y), y)
        ax.plot(x, np.convolve(filled, kernel, mode="same"), lw=1.2, color="C0", label=f"{smooth}-bp mean")
    ax.set_xlabel(f"{record} position (0-based)")
    ax.set_ylabel(column)
    ax.set_xlim(start, end)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    out_png = Path(out_png)
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out_png
