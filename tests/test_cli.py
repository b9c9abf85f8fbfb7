"""The ``seqmamba`` CLI on a toy task (tests/cli_toy.py): run directory, overrides, checkpoints, clean errors."""

import csv
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from seqmamba import tasks
from seqmamba.cli import main

TESTS = Path(__file__).resolve().parent  # holds cli_toy.py

TOY_YAML = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 2
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
model:
  class_path: cli_toy.ToyRegressor
  init_args:
    hidden: 4
data:
  class_path: cli_toy.ToyData
  init_args:
    n_samples: 16
    batch_size: 8
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch current directory holding toy.yaml; env vars and RNG states are restored afterwards."""
    path = tmp_path_factory.mktemp("cli")
    (path / "toy.yaml").write_text(TOY_YAML)
    py_state, np_state = random.getstate(), np.random.get_state()
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng(devices=[]):
        mp.chdir(path)
        mp.syspath_prepend(str(TESTS))
        mp.setattr(sys, "argv", ["seqmamba"])
        for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "SEQMAMBA_RUN_DIR"):
            mp.delenv(var, raising=False)
        yield path
    random.setstate(py_state)
    np.random.set_state(np_state)


def run_ok(capsys, *args) -> tuple[Path, str]:
    main(list(args))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("run directory: ")]
    assert len(lines) == 1, out
    return Path(lines[0].removeprefix("run directory: ")), out


def run_err(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("seqmamba: error: ") and err.count("error:") == 1, err
    assert "Traceback" not in err, err
    return err


def metric_names(run_dir: Path) -> set[str]:
    with open(run_dir / "metrics.csv") as f:
        return set(next(csv.reader(f)))


def test_fit_writes_run_dir_metrics_and_checkpoint(workdir, capsys):
    run_dir, _ = run_ok(capsys, "fit", "-c", "toy.yaml", "--model.init_args.hidden=8")
    assert run_dir.parent == (workdir / "runs" / "ToyRegressor").resolve()
    assert {"train_loss", "val_loss"} <= metric_names(run_dir)
    assert (run_dir / "config.yaml").is_file()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    # the command-line override reached the model: hparams and weight shape
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["hyper_parameters"]["hidden"] == 8
    assert state["state_dict"]["net.0.weight"].shape == (8, 3)
    assert "hidden: 8" in (run_dir / "config.yaml").read_text()

    # validate / test / predict from it: the model is rebuilt from the checkpoint's hparams (hidden=8, yaml: 4)
    for sub, metric in (("validate", "val_loss"), ("test", "test_loss")):
        eval_dir, out = run_ok(capsys, sub, "-c", "toy.yaml", f"--ckpt_path={ckpt}")
        assert eval_dir != run_dir and eval_dir.parent == run_dir.parent
        assert metric in metric_names(eval_dir), out
    pred_dir, _ = run_ok(capsys, "predict", "-c", "toy.yaml", f"--ckpt_path={ckpt}")
    assert pred_dir.is_dir()


def test_default_root_dir_is_respected(workdir, capsys):
    root, runs = workdir / "mine", workdir / "runs"
    before = set(runs.rglob("*"))
    run_dir, _ = run_ok(capsys, "fit", "-c", "toy.yaml", f"--trainer.default_root_dir={root}")
    assert run_dir == (root / "lightning_logs" / "version_0").resolve()
    assert (run_dir / "metrics.csv").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert set(runs.rglob("*")) == before  # nothing made under runs/


def test_short_class_name_of_registered_task(workdir, tmp_path, capsys, monkeypatch):
    # a task module nobody has imported yet: its short class name resolves only once it is registered
    (tmp_path / "cli_toy_task.py").write_text("from cli_toy import ToyRegressor\nclass TaskToy(ToyRegressor): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ("fit", "-c", "toy.yaml", "--model.class_path=TaskToy", "--trainer.max_steps=1")
    assert "TaskToy" in run_err(capsys, *args)
    monkeypatch.setitem(tasks.TASKS, "toy", "cli_toy_task")
    run_dir, _ = run_ok(capsys, *args)
    assert run_dir.parent.name == "TaskToy"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_bad_key_is_one_error(workdir, capsys):
    (workdir / "bad.yaml").write_text(TOY_YAML.replace("hidden: 4", "hiddn: 4"))
    err = run_err(capsys, "fit", "-c", "bad.yaml")
    assert "hiddn" in err and len(err.splitlines()) == 1, err
    err = run_err(capsys, "fit", "-c", "toy.yaml", "--trainer.max_stepz=3")
    assert "max_stepz" in err


def test_unknown_class_lists_tasks(workdir, capsys, monkeypatch):
    monkeypatch.setitem(tasks.TASKS, "toy", "cli_toy")
    monkeypatch.setitem(tasks.TASKS, "broken", "cli_toy_missing_module")
    err = run_err(capsys, "fit", "-c", "toy.yaml", "--model.class_path=NoSuchModel")
    assert "NoSuchModel" in err
    assert "toy (cli_toy)" in err
    assert "'broken'" in err and "could not be imported" in err
    err = run_err(capsys, "fit", "-c", "toy.yaml", "--data.class_path=cli_toy.ToyRegressor")
    assert "LightningDataModule" in err


def test_missing_files_and_unknown_subcommand(workdir, capsys):
    assert "missing.yaml" in run_err(capsys, "fit", "-c", "missing.yaml")
    assert "missing.ckpt" in run_err(capsys, "test", "-c", "toy.yaml", "--ckpt_path=missing.ckpt")
    err = run_err(capsys, "train", "-c", "toy.yaml")
    assert "train" in err and "fit" in err


def test_values_rejected_when_built(workdir, capsys):
    """Values that parse but that a class or the Trainer rejects: one error, and no empty run directory left."""
    runs = workdir / "runs" / "ToyRegressor"
    before = set(runs.iterdir()) if runs.exists() else set()
    err = run_err(capsys, "fit", "-c", "toy.yaml", "--data.init_args.batch_size=0")
    assert "cli_toy.ToyData: batch_size must be >= 1" in err and len(err.splitlines()) == 1, err
    err = run_err(capsys, "fit", "-c", "toy.yaml", "--trainer.max_steps=-5")
    assert "max_steps" in err
    assert (set(runs.iterdir()) if runs.exists() else set()) == before


def test_registry(monkeypatch):
    monkeypatch.setattr(tasks, "TASKS", {})
    monkeypatch.syspath_prepend(str(TESTS))
    tasks.register_task("toy", "cli_toy")
    tasks.register_task("toy", "cli_toy")  # the same module again: fine
    with pytest.raises(ValueError, match="already registered"):
        tasks.register_task("toy", "elsewhere")
    assert tasks.import_task_modules() == {}
    tasks.register_task("broken", "cli_toy_missing_module")
    assert set(tasks.import_task_modules(strict=False)) == {"broken"}
    with pytest.raises(ImportError, match="'broken'"):
        tasks.import_task_modules()


def test_task_commands_dispatch_and_errors(monkeypatch, capsys):
    """``seqmamba NAME ...`` runs the task command's main; bad input is one error line and exit status 2."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setitem(tasks.COMMANDS, "toy-cmd", ("cli_toy", "a toy command"))
    monkeypatch.delenv("SEQMAMBA_DEBUG", raising=False)

    def exit_status(*args):
        with pytest.raises(SystemExit) as exc:
            main(list(args))
        return exc.value.code

    assert exit_status("toy-cmd", "ok", "--flag") == 0
    assert "toy command ran with ['ok', '--flag']" in capsys.readouterr().out
    assert exit_status("toy-cmd", "status", "3") == 3
    assert exit_status("toy-cmd", "fail") == 2
    err = capsys.readouterr().err
    assert err == "seqmamba toy-cmd: error: toy.txt, line 3: not a number: 'x'\n", err
    assert exit_status("toy-cmd", "bad-file") == 2
    assert "no/such/toy.file" in capsys.readouterr().err
    monkeypatch.setenv("SEQMAMBA_DEBUG", "1")
    with pytest.raises(ValueError, match="not a number"):
        main(["toy-cmd", "fail"])


def test_help_lists_task_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("score", "separate", "recommend"):
        assert f"  {name}" in out, out


def test_console_entry_point_bad_key(workdir):
    """The real process: python -m seqmamba.cli prints one error line, no traceback, exit status 2."""
    (workdir / "bad.yaml").write_text(TOY_YAML.replace("hidden: 4", "hiddn: 4"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    env.pop("JSONARGPARSE_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "seqmamba.cli", "fit", "-c", "bad.yaml"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "hiddn" in proc.stderr and proc.stderr.count("error:") == 1, proc.stderr
