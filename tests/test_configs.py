"""Every YAML under configs/ parses and validates against its classes (keys, types, class paths)."""
from pathlib import Path

import pytest

from seqmamba.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_validates(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(config), "--print_config"])
    captured = capsys.readouterr()
    assert exit_info.value.code in (0, None), f"{config}: {captured.err.strip()}"
    assert "model:" in captured.out and "trainer:" in captured.out


def test_a_bad_key_is_caught_by_the_same_check(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: lightning.pytorch.demos.boring_classes.BoringModel\n"
                   "trainer:\n  max_stepz: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(bad), "--print_config"])
    assert exit_info.value.code == 2 and "max_stepz" in capsys.readouterr().err
