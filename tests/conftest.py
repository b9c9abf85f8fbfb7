import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_restore_dtype():
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    yield
    torch.set_default_dtype(default)


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A scratch current directory for CLI runs; argv, seed variables and every RNG state are restored."""
    import random
    import sys

    import numpy as np

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["seqmamba"])
    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "SEQMAMBA_RUN_DIR"):
        monkeypatch.delenv(var, raising=False)
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield tmp_path
    random.setstate(py_state)
    np.random.set_state(np_state)
