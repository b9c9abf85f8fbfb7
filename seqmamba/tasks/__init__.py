"""Task registry: task name -> module that defines the task's LightningModule and LightningDataModule.

Importing a task module defines its classes as subclasses of LightningModule / LightningDataModule, which is
what lets a config name them by short class name (``class_path: SomeTaskModule``) instead of a dotted path.
Only the CLI imports the task modules; the core package never imports ``seqmamba.tasks``.
"""

from importlib import import_module

TASKS: dict[str, str] = {
    "dna": "seqmamba.tasks.dna",
    "separation": "seqmamba.tasks.separation",
    "recommendation": "seqmamba.tasks.recommendation",
}

# Task commands beside fit/validate/test/predict: ``seqmamba NAME ARGS...`` calls ``main(ARGS)`` of the module,
# imported only when the command is used. ``main`` takes an argv list and returns an exit status or None (0).
COMMANDS: dict[str, tuple[str, str]] = {
    "score": ("seqmamba.tasks.dna.score",
              "DNA: score a (multi-)FASTA: per-record embeddings and per-base log-likelihoods to parquet"),
    "separate": ("seqmamba.tasks.separation.__main__",
                 "speech: separate WAV/FLAC files of any length into one file per speaker"),
    "recommend": ("seqmamba.tasks.recommendation.api",
                  "recommendation: top-K items for every user of an interaction log, to parquet"),
}


def register_task(name: str, module_path: str) -> None:
    """Register task ``name`` as defined in ``module_path`` (for plugins and tests).

    Re-registering a name with the same module is a no-op; with another module it is an error.
    """
    known = TASKS.get(name)
    if known is not None and known != module_path:
        raise ValueError(f"task {name!r} is already registered as {known!r}, not {module_path!r}")
    TASKS[name] = module_path


def import_task_modules(strict: bool = True) -> dict[str, ImportError]:
    """Import the module of every registered task.

    strict=True raises on the first module that cannot be imported. strict=False imports what it can and
    returns {task name: ImportError} for the others, so one task's missing dependency does not block the rest.
    """
    failed = {}
    for name, module_path in TASKS.items():
        try:
            import_module(module_path)
        except ImportError as err:
            if strict:
                raise ImportError(f"task {name!r}: cannot import {module_path!r}: {err}") from err
            failed[name] = err
    return failed
