"""The README is the contract: CI runs its commands, and its Python example runs."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_install_and_test_commands():
    install, main_job, test = (block.strip() for block in code_blocks("bash")[:3])
    assert install.startswith("pip install") and test.startswith("python -m pytest"), (install, test)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci, f"README install command {install!r} is not a line of .ci/run"
    assert test in ci, f"README test command {test!r} is not a line of .ci/run"
    assert ci.index(install) < ci.index(test)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    example = next(block for block in code_blocks("python") if "from seqmamba import BackboneConfig" in block)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (2, 1024, 64)
    assert namespace["h"].shape == (2, 1024, 64)
    assert (tmp_path / "my-backbone" / "model.safetensors").is_file()
