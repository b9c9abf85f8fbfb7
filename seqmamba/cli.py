"""The ``seqmamba`` command: ``seqmamba fit|validate|test|predict -c CONFIG.yaml [--key=value ...]``, and the
task commands ``seqmamba score|separate|recommend ARGS...`` (``seqmamba.tasks.COMMANDS``; ``--help`` on each).

A LightningCLI whose config picks the LightningModule (``model:``) and LightningDataModule (``data:``) by
``class_path`` -- a full dotted path, or the short class name of a registered task (see ``seqmamba.tasks``) --
with ``init_args``. Any key can be overridden on the command line: ``--model.init_args.lr=1e-3``,
``--trainer.max_steps=10``.

Run directory: unless the config sets ``trainer.default_root_dir``, every command gets a fresh one,
``runs/<ModelClass>/<YYYYmmdd-HHMMSS>`` under the current directory (with ``default_root_dir`` set and no logger:
``<default_root_dir>/lightning_logs/version_<N>``), printed as ``run directory: PATH`` before the command starts.
Unless the config sets ``trainer.logger``, metrics go to ``PATH/metrics.csv`` (CSVLogger); unless it sets a
ModelCheckpoint, checkpoints incl. ``last.ckpt`` go to ``PATH/checkpoints/``. The resolved config is saved as
``PATH/config.yaml``.

Task commands print one ``seqmamba <command>: error: ...`` line on stderr and exit with status 2 when their
input is bad (a ``ValueError``, ``KeyError`` or ``OSError``: unreadable or malformed files, unknown ids, unsafe
checkpoints); ``SEQMAMBA_DEBUG=1`` raises instead.

Bad input -- unknown subcommand, unknown model/data class, unknown key, bad value, missing config or checkpoint
file, a config the classes or the Trainer reject when built -- ends with one ``seqmamba: error: ...`` message on
stderr and exit status 2. ``JSONARGPARSE_DEBUG=true`` raises the exception instead.
"""

import os
import re
from argparse import RawDescriptionHelpFormatter
from importlib import import_module
import sys
import time
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from seqmamba import tasks

RUNS_ROOT = "runs"
# Exported by the launching process: the ranks that Lightning's DDP launcher starts reuse its run directory.
_RUN_DIR_ENV = "SEQMAMBA_RUN_DIR"
# Lightning's ckpt_path values that are not file names.
_CKPT_KEYWORDS = ("best", "last", "hpc", "registry")
# Substrings of jsonargparse's messages when a class_path cannot be resolved.
_UNKNOWN_CLASS = (
    "Expected a dot import path string",
    "does not correspond to a subclass of",
    "No module named",
    "has no attribute",
)


class ConfigError(Exception):
    """A config that parses but that the classes, the Trainer or the file system reject."""


class SeqMambaCLI(LightningCLI):
    """LightningCLI that gives every command its own run directory with a CSV log and a last.ckpt."""

    run_dir: Path | None = None

    def before_instantiate_classes(self) -> None:
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path and not _is_ckpt_keyword(ckpt_path) and not Path(ckpt_path).is_file():
            raise ConfigError(f"ckpt_path: file does not exist: {ckpt_path!r}")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, MisconfigurationException) as err:
            if self.run_dir is not None and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()
            raise ConfigError(f"{type(err).__name__}: {_tidy(str(err))}") from err

    def instantiate_trainer(self, **kwargs) -> Trainer:
        cfg = self._get(self.config_init, "trainer", default={})
        if cfg.get("default_root_dir") is None:
            self.run_dir = _new_run_dir(Path(RUNS_ROOT) / type(self.model).__name__)
            kwargs.setdefault("default_root_dir", str(self.run_dir))
        if cfg.get("logger") in (None, True):
            # our own directory: metrics.csv right in it; the user's may hold earlier runs: number this one
            own = self.run_dir is not None
            logger = CSVLogger(self.run_dir, name="", version="") if own else CSVLogger(cfg["default_root_dir"])
            kwargs.setdefault("logger", logger)
        callbacks = _as_list(cfg.get("callbacks"))
        keyed = [self._get(self.config_init, k) for k in self._parser(self.subcommand).callback_keys]
        has_ckpt = any(isinstance(c, ModelCheckpoint) for c in callbacks + keyed)
        if cfg.get("enable_checkpointing") is not False and not has_ckpt:
            kwargs.setdefault("callbacks", callbacks + [ModelCheckpoint(save_last=True)])
        return super().instantiate_trainer(**kwargs)

    def after_instantiate_classes(self) -> None:
        _print_run_dir(self.trainer)


def _is_ckpt_keyword(ckpt_path: str) -> bool:
    return ckpt_path.split(":")[0] in _CKPT_KEYWORDS or "://" in ckpt_path


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _new_run_dir(parent: Path) -> Path:
    """Create ``parent/<YYYYmmdd-HHMMSS>`` (``-1``, ``-2``, ... if taken) and return its absolute path.

    Only rank 0 creates it: it alone writes logs, config and checkpoints, and broadcasts their paths. Ranks that
    Lightning's launcher started from this process inherit the directory through the environment.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if rank_zero_only.rank != 0:
        return Path(os.environ.get(_RUN_DIR_ENV) or parent / stamp).resolve()
    parent.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        run_dir = (parent / (stamp if i == 0 else f"{stamp}-{i}")).resolve()
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        os.environ[_RUN_DIR_ENV] = str(run_dir)
        return run_dir
    raise FileExistsError(f"no free run directory for {parent / stamp}")


@rank_zero_only
def _print_run_dir(trainer: Trainer) -> None:
    # not trainer.log_dir: it broadcasts across ranks, which needs a strategy that is already set up
    logger = trainer.logger
    path = (getattr(logger, "log_dir", None) or logger.save_dir) if logger is not None else None
    print(f"run directory: {Path(path or trainer.default_root_dir).resolve()}", flush=True)


def _tidy(message: str) -> str:
    """Fold jsonargparse's multi-line Union report into one line: the key, then the errors of the real subtypes.

    Parser key "model":                                   ->  Parser key "model": Problem with given class_path
      Does not validate against any of the Union subtypes     'm.Toy': Option 'hiddn' is not accepted
      Subtypes: [LightningModule, NoneType]
      Errors:
        - Problem with given class_path 'm.Toy':
            Option 'hiddn' is not accepted
        - Expected a <class 'NoneType'>
      Given value: ...
    """
    lines = message.splitlines()
    at = next((i for i, line in enumerate(lines) if line.strip() == "Errors:"), None)
    if at is None:
        return message
    indent = len(lines[at]) - len(lines[at].lstrip())
    items: list[str] = []
    for line in lines[at + 1 :]:
        depth = len(line) - len(line.lstrip())
        if depth <= indent:
            break
        if depth == indent + 2 and line.lstrip().startswith("- "):
            items.append(line.strip()[2:])
        elif items:
            items[-1] += " " + line.strip()
    items = [item for item in items if item != "Expected a <class 'NoneType'>"]
    if not items:
        return message
    # instantiation errors have no "Parser key" line: name the class instead
    head = lines[0].strip() if lines[0].startswith("Parser key") else ""
    if not head and (match := re.search(r"class_path='([^']+)'", message)):
        head = f"{match[1]}:"
    return f"{head} {'; '.join(items)}".strip()


def _tasks_hint(failed: dict[str, ImportError]) -> str:
    if tasks.TASKS:
        known = ", ".join(f"{name} ({path})" for name, path in tasks.TASKS.items())
        hint = f"registered tasks: {known}. Use a class of one of them, or a full dotted class_path."
    else:
        hint = "no tasks are registered yet (seqmamba.tasks.TASKS): give class_path as a full dotted path."
    for name, err in failed.items():
        hint += f"\n  task {name!r} ({tasks.TASKS[name]}) could not be imported: {err}"
    return hint


def _error_message(err: Exception, failed: dict[str, ImportError]) -> str:
    message = _tidy(str(err))
    if isinstance(err, ArgumentError) and any(marker in message for marker in _UNKNOWN_CLASS):
        message += "\n  " + _tasks_hint(failed)
    return message


def run_task_command(name: str, args: list[str]) -> int:
    """Run ``seqmamba NAME ARGS...`` for a task command of ``seqmamba.tasks.COMMANDS``; return its exit status."""
    module_path, _ = tasks.COMMANDS[name]
    try:
        status = import_module(module_path).main(args)
    except (ValueError, KeyError, OSError) as err:
        if os.environ.get("SEQMAMBA_DEBUG", "") not in ("", "0"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        sys.stderr.write(f"seqmamba {name}: error: {message}\n")
        return 2
    return status if isinstance(status, int) else 0


def _commands_help() -> str:
    width = max(map(len, tasks.COMMANDS))
    lines = [f"  {name:<{width}}  {about}" for name, (_, about) in tasks.COMMANDS.items()]
    return "Task commands (seqmamba COMMAND --help):\n" + "\n".join(lines)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``seqmamba`` console script; ``args`` like ``["fit", "-c", "cfg.yaml"]``."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in tasks.COMMANDS:
        sys.exit(run_task_command(argv[0], argv[1:]))
    failed = tasks.import_task_modules(strict=False)
    run_dir_env = os.environ.get(_RUN_DIR_ENV)
    try:
        SeqMambaCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "prog": "seqmamba",
                "description": "Train and evaluate seqmamba models from a config file.\n\n" + _commands_help(),
                "formatter_class": RawDescriptionHelpFormatter,
                "exit_on_error": False,
            },
            args=args,
        )
    except (ArgumentError, ConfigError) as err:
        if os.environ.get("JSONARGPARSE_DEBUG", "").lower() == "true":
            raise
        sys.stderr.write(f"seqmamba: error: {_error_message(err, failed)}\n")
        sys.exit(2)
    finally:
        if run_dir_env is None:
            os.environ.pop(_RUN_DIR_ENV, None)
        else:
            os.environ[_RUN_DIR_ENV] = run_dir_env


if __name__ == "__main__":
    main()
