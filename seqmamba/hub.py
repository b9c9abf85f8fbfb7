"""``save_pretrained`` / ``from_pretrained``: a directory with ``config.json`` and ``model.safetensors``.

The layout is the one users know from Hugging Face. Files are written to a temporary name first and renamed,
so an interrupted save never leaves a file that looks complete. Loading never unpickles anything.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import safetensors.torch
import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the mode an ordinary open would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class PretrainedMixin:
    """For ``nn.Module``s built as ``cls(config)`` where ``config`` has ``to_dict`` / ``from_dict``.

    Subclasses set ``config_class`` and keep the config as ``self.config``.
    """

    config_class: type

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"model_type": type(self).__name__, **self.config.to_dict()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: safetensors.torch.save_model(self, tmp))
        atomic_write(directory / CONFIG_NAME,
                     lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2) + "\n"))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu", **kwargs):
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{cls.__name__}.from_pretrained: {path} does not exist")
        data = json.loads(config_path.read_text())
        model_type = data.pop("model_type", cls.__name__)
        if model_type != cls.__name__:
            raise ValueError(f"{config_path}: model_type is {model_type!r}, expected {cls.__name__!r}")
        model = cls(cls.config_class.from_dict(data), **kwargs)
        missing, unexpected = safetensors.torch.load_model(model, weights_path, strict=False, device=str(device))
        if missing or unexpected:
            raise ValueError(f"{weights_path}: missing keys {missing}, unexpected keys {unexpected}")
        return model.to(device)
