"""Two-step CPU fits of every separation config through the ``seqmamba`` CLI (tiny sizes), then ``test``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import soundfile as sf
import torch

from seqmamba.cli import main
from seqmamba.data.separation import make_synthetic_speakers
from seqmamba.tasks.separation import Separator

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "separation"
TINY = ["--trainer.accelerator=cpu", "--trainer.max_steps=2", "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=2", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--model.init_args.n_filters=16", "--model.init_args.n_layers=1", "--model.init_args.chunk_size=20",
        "--data.init_args.segment_seconds=0.1", "--data.init_args.eval_max_seconds=0.25",
        "--data.init_args.n_val_mixtures=2", "--data.init_args.n_test_mixtures=2",
        "--data.init_args.batch_size=2", "--data.init_args.num_workers=0"]


def run(capsys, *args) -> Path:
    main(list(args))
    out = capsys.readouterr().out
    return Path([line for line in out.splitlines() if line.startswith("run directory: ")][-1].split(": ", 1)[1])


@pytest.mark.parametrize("config", ["quickstart.yaml", "mamba_tasnet_s_8k.yaml", "dpmamba_s_8k.yaml"])
def test_two_step_fit_then_test(workdir, capsys, config):
    extra = []
    if config != "quickstart.yaml":  # the recipes need speaker folders: give them synthetic ones
        make_synthetic_speakers(workdir / "spk", n_speakers=6, utterances=2, seconds=0.5)
        extra = ["--data.init_args.train_dir=spk", "--data.init_args.val_fraction=0.34",
                 "--data.init_args.test_fraction=0.34"]
    else:
        extra = ["--data.init_args.synthetic_speakers=6", "--data.init_args.synthetic_utterances=2",
                 "--data.init_args.synthetic_seconds=0.5", "--data.init_args.val_fraction=0.34",
                 "--data.init_args.test_fraction=0.34"]
    run_dir = run(capsys, "fit", "-c", str(CONFIGS / config), *TINY, *extra)
    metrics = pl.read_csv(run_dir / "metrics.csv", infer_schema_length=None)
    assert {"train/loss", "val/si_snri", "val/sdri", "val/si_snr"} <= set(metrics.columns)
    assert metrics["train/loss"].drop_nulls().len() >= 1 and metrics["val/si_snri"].drop_nulls().is_finite().all()
    assert (run_dir / "learning_curves.png").is_file()
    assert list((run_dir / "spectrograms").glob("val_step*.png"))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    test_dir = run(capsys, "test", "-c", str(CONFIGS / config), *TINY, *extra, f"--ckpt_path={ckpt}")
    tested = pl.read_csv(test_dir / "metrics.csv", infer_schema_length=None)
    assert tested["test/si_snri"].drop_nulls().len() == 1
    # the checkpoint loads into the separation API
    sep = Separator.load(ckpt)
    assert sep.separate(torch.randn(900), window_seconds=0.05, overlap_seconds=0.01).shape == (2, 900)
    if config == "quickstart.yaml":
        separate_files_with_the_checkpoint(workdir, ckpt, capsys)


def separate_files_with_the_checkpoint(workdir: Path, ckpt: Path, capsys) -> None:
    """``seqmamba separate CKPT FILE...`` writes one file per speaker of each input's length."""
    def separate(argv):
        with pytest.raises(SystemExit) as exc:
            main(["separate", *argv])
        return exc.value.code

    rng = np.random.default_rng()
    lengths = {"a": 2500, "b": 1700}
    for stem, n in lengths.items():
        sf.write(workdir / f"{stem}.wav", (0.1 * rng.standard_normal(n)).astype(np.float32), 8000)
    argv = [str(ckpt), "a.wav", "b.wav", "--out_dir", "sep", "--window_seconds", "0.15", "--overlap_seconds", "0.03",
            "--device", "cpu"]
    assert separate(argv) == 0
    written = sorted(p.name for p in (workdir / "sep").iterdir())
    assert written == ["a_spk1.wav", "a_spk2.wav", "b_spk1.wav", "b_spk2.wav"]
    for stem, n in lengths.items():
        outs = [sf.read(workdir / "sep" / f"{stem}_spk{i}.wav", dtype="float32")[0] for i in (1, 2)]
        assert all(len(o) == n and np.isfinite(o).all() for o in outs)
        assert max(np.abs(o).max() for o in outs) > 0  # a trained-for-2-steps model still writes audio
    capsys.readouterr()
    assert separate([str(ckpt), "missing.wav", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seqmamba separate: error:") and "missing.wav" in err[0]
    assert separate(["a.wav", "b.wav", "--device", "cpu"]) == 2  # a WAV where the model should be
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "a.wav: not a SeparationModule checkpoint" in err[0]


def test_mismatched_n_src_is_a_clear_error(workdir, capsys):
    make_synthetic_speakers(workdir / "spk", n_speakers=6, utterances=1, seconds=0.5)
    with pytest.raises(ValueError, match=r"SeparationModule.n_src=3 but the data has n_src=2"):
        main(["fit", "-c", str(CONFIGS / "mamba_tasnet_xs_8k.yaml"), *TINY, "--data.init_args.train_dir=spk",
              "--data.init_args.val_fraction=0.34", "--data.init_args.test_fraction=0.34",
              "--model.init_args.n_src=3"])
