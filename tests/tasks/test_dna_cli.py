"""DNA configs through the seqmamba CLI on a 2-core CPU: two-step pretraining and fine-tuning fits (tiny sizes),
resume from last.ckpt to the same loss, `seqmamba test` on a user table, and the quickstart's smoke mode."""
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import lightning as L

from seqmamba.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "dna"
TINY_MODEL = ["--model.init_args.d_model=8", "--model.init_args.n_layer=1", "--model.init_args.d_state=2"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu",
         "--trainer.precision=32-true", "--trainer.devices=1"]


def run(capsys, *args) -> Path:
    main(list(args))
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if x.startswith("run directory: ")][-1]
    return Path(line.split(": ", 1)[1])


def metrics(run_dir: Path) -> pl.DataFrame:
    return pl.read_csv(run_dir / "metrics.csv")


PRETRAIN = ["--data.init_args.length=24", "--data.init_args.batch_size=2", "--data.init_args.train_samples=4",
            "--data.init_args.val_samples=2", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2",
            "--trainer.log_every_n_steps=1"]


@pytest.mark.parametrize("config", ["quickstart_pretrain.yaml", "pretrain_1k_ph.yaml"])
def test_pretrain_two_steps(workdir, capsys, config):
    run_dir = run(capsys, "fit", "-c", str(CONFIGS / config), "--trainer.max_steps=2", *TINY_MODEL, *QUIET, *PRETRAIN,
                  "--data.init_args.num_workers=0")
    table = metrics(run_dir)
    for column in ("train_loss", "train_acc", "val_loss", "val_acc", "val_ppl", "lr"):
        assert table[column].drop_nulls().len() > 0, column
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "learning_curves.png").is_file()
    assert (run_dir / "pretrained" / "model.safetensors").is_file()


class StopAtStep(L.Callback):
    """Interrupts a run (as Ctrl-C would) when it reaches ``step``."""

    def __init__(self, step: int = 2):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["epoch_end", "mid_epoch"])
def test_resume_from_last_gives_the_same_losses(workdir, capsys, where):
    """Interrupted after the checkpoint at step 2 (the end of an epoch of 2 steps, or the middle of one of 4),
    resumed from last.ckpt: steps 2 and 3 have the losses of an uninterrupted run."""
    samples = {"epoch_end": 4, "mid_epoch": 8}[where]
    base = ["-c", str(CONFIGS / "quickstart_pretrain.yaml"), *TINY_MODEL, *QUIET, *PRETRAIN,
            f"--data.init_args.train_samples={samples}", "--trainer.max_steps=4"]
    straight = run(capsys, "fit", *base)
    with pytest.raises(SystemExit):  # Lightning shuts down gracefully, then exits
        main(["fit", *base, "--trainer.callbacks+=tests.tasks.test_dna_cli.StopAtStep",
              "--trainer.callbacks.init_args.step=3"])
    first = Path([x for x in capsys.readouterr().out.splitlines() if x.startswith("run directory: ")][-1][15:])
    resumed = run(capsys, "fit", *base, f"--ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    want = metrics(straight).filter(pl.col("step") >= 2)["train_loss"].drop_nulls().to_list()
    got = metrics(resumed)["train_loss"].drop_nulls().to_list()
    assert len(want) == 2 and np.allclose(got, want, rtol=1e-5, atol=1e-6), (got, want)


def write_tables(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    paths = {}
    for split, n in (("train", 8), ("val", 4), ("test", 6)):
        seqs = ["".join(rng.choice(list("ACGT"), size=int(rng.integers(8, 15)))) for _ in range(n)]
        paths[split] = folder / f"{split}.csv"
        pl.DataFrame({"sequence": seqs, "label": [i % 2 for i in range(n)]}).write_csv(paths[split])
    return paths


def test_finetune_from_pretrained_then_test(workdir, capsys):
    pre = run(capsys, "fit", "-c", str(CONFIGS / "quickstart_pretrain.yaml"), "--trainer.max_steps=1", *TINY_MODEL,
              *QUIET, *PRETRAIN)
    tables = write_tables(workdir)
    data = [f"--data.init_args.{s}={p}" for s, p in tables.items()] + ["--data.init_args.batch_size=4"]
    common = ["-c", str(CONFIGS / "finetune.yaml"), *QUIET, "--trainer.log_every_n_steps=1"]
    fit_dir = run(capsys, "fit", *common, "--trainer.max_steps=2", *data,
                  f"--model.init_args.pretrained={pre / 'checkpoints' / 'last.ckpt'}")
    assert metrics(fit_dir)["val_auroc"].drop_nulls().len() > 0
    test_dir = run(capsys, "test", *common, f"--data.init_args.test={tables['test']}",
                   f"--ckpt_path={fit_dir / 'checkpoints' / 'last.ckpt'}")
    row = metrics(test_dir)
    assert 0 <= row["test_acc"].drop_nulls()[-1] <= 1 and row["test_auroc"].drop_nulls().len() == 1
    from seqmamba.tasks.dna import api
    probs = api.predict(api.load(fit_dir / "checkpoints" / "last.ckpt"), ["ACGTTGCA", "GGA"])
    assert probs.shape == (2, 2)
    mlm = api.load(pre / "checkpoints" / "last.ckpt")
    assert api.embed(mlm, ["ACGTTGCA"]).shape == (1, 8)


def test_quickstart_smoke(workdir, capsys):
    from seqmamba.tasks.dna import quickstart
    quickstart.main(["--fast", "--out", str(workdir / "qs")])
    out = capsys.readouterr().out
    assert "DNA quickstart done" in out and "test_acc" in out
    assert (workdir / "qs" / "tables" / "train.csv").is_file()
    assert list((workdir / "qs" / "finetune").rglob("learning_curves.png"))


def test_token_level_fit(workdir, capsys):
    rng = np.random.default_rng(1)
    seqs = ["".join(rng.choice(list("ACGT"), size=10)) for _ in range(6)]
    labels = ["".join("1" if c in "GC" else "0" for c in s) for s in seqs]
    pl.DataFrame({"sequence": seqs, "label": labels}).write_csv(workdir / "tok.csv")
    run_dir = run(capsys, "fit", "-c", str(CONFIGS / "finetune.yaml"), *QUIET, "--trainer.max_steps=2",
                  "--trainer.log_every_n_steps=1", *TINY_MODEL, "--model.init_args.level=token",
                  "--model.init_args.rc_mode=invariant", f"--data.init_args.train={workdir / 'tok.csv'}",
                  f"--data.init_args.val={workdir / 'tok.csv'}", "--data.init_args.level=token",
                  "--data.init_args.batch_size=3")
    assert metrics(run_dir)["val_acc"].drop_nulls().len() > 0


def test_ddp_fit_on_two_cpu_processes(workdir):
    """Two gloo processes through the real CLI: rank-0-only hooks must not call collectives (trainer.log_dir)."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "seqmamba.cli", "fit", "-c", str(CONFIGS / "pretrain_1k.yaml"),
            "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.precision=32",
            "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=1",
            "--model.init_args.d_model=16", "--model.init_args.n_layer=1", "--data.init_args.length=64",
            "--data.init_args.batch_size=2", "--data.init_args.num_workers=0", "--data.init_args.val_samples=4"]
    done = subprocess.run(args, cwd=workdir, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (workdir / "runs" / "DNAMaskedLM").iterdir()
    assert (run_dir / "pretrained" / "model.safetensors").is_file() and (run_dir / "metrics.csv").is_file()
