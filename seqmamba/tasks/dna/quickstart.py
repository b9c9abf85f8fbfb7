"""The DNA quickstart: pretrain a tiny Caduceus-PS on the packaged lambda phage genome, then fine-tune it to
tell phage DNA from base-shuffled DNA, then test it; about five minutes on a 2-core CPU.

    python -m seqmamba.tasks.dna.quickstart [--out DIR] [--fast]

Runs ``configs/dna/quickstart_pretrain.yaml`` and ``configs/dna/quickstart_finetune.yaml`` through the
``seqmamba`` CLI (``seqmamba.cli.main``) and prints where the runs, metrics and learning curves are.
The fine-tuning label: 1 = a 100-base window of the lambda genome, 0 = the same window with its bases
shuffled (same composition). Tables: train from the first 80% of the genome, val from the next 10%, test
from the last 10%, so no test window overlaps a training one.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from seqmamba.cli import main as cli_main
from seqmamba.data.dna import shuffled_windows_table

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "dna"
SPLITS = {"train": (0.0, 0.8, 480), "val": (0.8, 0.9, 64), "test": (0.9, 1.0, 256)}
WINDOW = 100


def write_tables(folder: Path, window: int = WINDOW, sizes: dict | None = None) -> dict[str, Path]:
    """The quickstart's labelled tables (CSV: sequence, label, record, start) from the packaged genome."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for seed, (split, (lo, hi, n)) in enumerate(SPLITS.items()):
        n = (sizes or {}).get(split, n)
        paths[split] = folder / f"{split}.csv"
        shuffled_windows_table("builtin:lambda_phage", window, lo, hi, n, seed=seed).write_csv(paths[split])
    return paths


def _log_dir(root: Path) -> Path:
    versions = sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        raise RuntimeError(f"no run was written under {root}")
    return versions[-1]


def run(out: Path, extra_pretrain: list[str] = (), extra_finetune: list[str] = (),
        sizes: dict | None = None) -> dict:
    """Run the three steps under ``out``; returns the paths and the test metrics."""
    for name in ("quickstart_pretrain.yaml", "quickstart_finetune.yaml"):
        if not (CONFIGS / name).is_file():
            raise FileNotFoundError(f"{CONFIGS / name} not found: run the quickstart from a source checkout "
                                    "(pip install -e .)")
    out = out.resolve()
    sys.argv = sys.argv[:1]  # LightningCLI reads arguments from ``args``; keep ours out of its way
    tables = write_tables(out / "tables", sizes=sizes)
    print(f"tables: {tables['train']}, {tables['val']}, {tables['test']}")

    cli_main(["fit", "-c", str(CONFIGS / "quickstart_pretrain.yaml"),
              f"--trainer.default_root_dir={out / 'pretrain'}", *extra_pretrain])
    pre_dir = _log_dir(out / "pretrain")
    pretrained = pre_dir / "pretrained"

    data_args = [f"--data.init_args.{split}={path}" for split, path in tables.items()]
    cli_main(["fit", "-c", str(CONFIGS / "quickstart_finetune.yaml"), f"--trainer.default_root_dir={out / 'finetune'}",
              f"--model.init_args.pretrained={pretrained}", *data_args, *extra_finetune])
    ft_dir = _log_dir(out / "finetune")
    ckpt = ft_dir / "checkpoints" / "last.ckpt"

    cli_main(["test", "-c", str(CONFIGS / "quickstart_finetune.yaml"), f"--trainer.default_root_dir={out / 'test'}",
              f"--model.init_args.pretrained={pretrained}", f"--data.init_args.test={tables['test']}",
              f"--ckpt_path={ckpt}"])
    test_dir = _log_dir(out / "test")
    metrics = _last_row(test_dir / "metrics.csv")
    return {"pretrain": pre_dir, "finetune": ft_dir, "test": test_dir, "pretrained": pretrained, "checkpoint": ckpt,
            "test_metrics": metrics}


def _last_row(path: Path) -> dict:
    import polars as pl

    if not path.is_file():
        return {}
    table = pl.read_csv(path)
    row = {}
    for column in table.columns:
        values = table[column].drop_nulls()
        if len(values):
            row[column] = values[-1]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m seqmamba.tasks.dna.quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/dna_quickstart/<time>)")
    parser.add_argument("--fast", action="store_true", help="a few steps only (a smoke test, no real learning)")
    args = parser.parse_args(argv)
    out = args.out or Path("runs") / "dna_quickstart" / time.strftime("%Y%m%d-%H%M%S")
    fast = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false"] if args.fast else []
    sizes = {"train": 32, "val": 16, "test": 16} if args.fast else None
    start = time.time()
    result = run(out, fast, fast, sizes)
    minutes = (time.time() - start) / 60
    print("\n=== DNA quickstart done in %.1f min ===" % minutes)
    for step in ("pretrain", "finetune", "test"):
        folder = result[step]
        png = folder / "learning_curves.png"
        print(f"{step:9s} run: {folder}\n          metrics: {folder / 'metrics.csv'}"
              + (f"\n          learning curves: {png}" if png.is_file() else ""))
    print(f"pretrained model (save_pretrained dir): {result['pretrained']}")
    print(f"fine-tuned checkpoint: {result['checkpoint']}")
    shown = {k: round(float(v), 4) for k, v in result["test_metrics"].items() if k.startswith("test_")}
    print(f"test metrics (phage vs shuffled, held-out last 10% of the genome): {shown}")


if __name__ == "__main__":
    main()
