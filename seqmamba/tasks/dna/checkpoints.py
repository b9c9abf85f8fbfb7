"""Loading weights: released Caduceus checkpoints (local Hugging Face style directories), our own
``save_pretrained`` directories, and Lightning ``.ckpt`` files of the DNA modules.

Nothing here executes code from a file: ``model.safetensors`` is read with safetensors, ``pytorch_model.bin``
and ``.ckpt`` with ``torch.load(weights_only=True)``; a pickle that needs more than tensors and plain
containers is refused with ``UnsafeCheckpointError``. Nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import safetensors.torch
import torch

from seqmamba import MambaConfig
from seqmamba.tasks.dna.model import COMPLEMENT_MAP, VOCAB_SIZE, Caduceus, CaduceusConfig, CaduceusForMaskedLM

# Caduceus ssm_cfg keys that map onto MambaConfig fields; others that do not change the math are ignored.
_SSM_KEYS = {"d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init_floor", "dt_scale",
             "conv_bias", "bias"}
_SSM_IGNORED = {"dt_init", "use_fast_path", "layer_idx", "device", "dtype"}


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint that would need to run code (import classes or call functions) to load."""


def safe_torch_load(path: str | os.PathLike):
    """``torch.load(path, weights_only=True)`` on the CPU, with a clear error for pickles that need more."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        detail = re.search(r"(Unsupported global: [^\n]+|GLOBAL [^\n]+)", str(err))
        raise UnsafeCheckpointError(
            f"{path}: refused to load: the pickle needs more than tensors and plain containers "
            f"({detail[0] if detail else first}). seqmamba never runs code from a checkpoint; convert it to "
            "model.safetensors with code you trust.") from err


def read_state_dict(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of ``model.safetensors`` (preferred) or ``pytorch_model.bin`` in a directory."""
    directory = Path(directory)
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = directory / name
        if path.is_file():
            if name.endswith(".safetensors"):
                return safetensors.torch.load_file(path), path
            state = safe_torch_load(path)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError(f"{path}: expected a dict of tensors")
            return state, path
    raise FileNotFoundError(f"{directory}: neither model.safetensors nor pytorch_model.bin is there")


def caduceus_config_from_hf(data: dict, state: dict[str, torch.Tensor], source: str) -> CaduceusConfig:
    """A released Caduceus ``config.json`` (model_type "caduceus") -> ``CaduceusConfig``. The vocabulary size
    (padded, 16) is read from the embedding weight; the complement map is extended with identity over padding."""
    rcps = bool(data.get("rcps", any(k.endswith("word_embeddings.embedding.weight") for k in state)))
    if data.get("bidirectional", True) is not True:
        raise ValueError(f"{source}: bidirectional=False Caduceus models are not supported (the released "
                         "models are bidirectional)")
    emb = next((v for k, v in state.items() if k.endswith("word_embeddings.weight")
                or k.endswith("word_embeddings.embedding.weight")), None)
    if emb is None:
        raise ValueError(f"{source}: no word_embeddings weight in the checkpoint")
    vocab_size, d_model = emb.shape
    if "d_model" in data and int(data["d_model"]) != d_model:
        raise ValueError(f"{source}: config d_model={data['d_model']} but the embedding is {tuple(emb.shape)}")
    cmap = list(range(vocab_size))
    raw = data.get("complement_map")
    if isinstance(raw, dict):
        for k, v in raw.items():
            cmap[int(k)] = int(v)
    elif isinstance(raw, list):
        cmap[: len(raw)] = [int(v) for v in raw]
    else:
        cmap = list(COMPLEMENT_MAP) + list(range(len(COMPLEMENT_MAP), vocab_size))
        cmap = cmap[:vocab_size]
    ssm = dict(data.get("ssm_cfg") or {})
    unknown = sorted(set(ssm) - _SSM_KEYS - _SSM_IGNORED)
    if unknown:
        raise ValueError(f"{source}: ssm_cfg key(s) {unknown} are not supported")
    mamba = MambaConfig(**{k: v for k, v in ssm.items() if k in _SSM_KEYS})
    n_layer = data.get("n_layer")
    if n_layer is None:
        n_layer = 1 + max(int(m[1]) for k in state if (m := re.search(r"layers\.(\d+)\.", k)))
    return CaduceusConfig(
        d_model=d_model, n_layer=int(n_layer), rcps=rcps, vocab_size=vocab_size, complement_map=tuple(cmap),
        mamba=mamba, bidirectional_strategy=data.get("bidirectional_strategy", "add"),
        bidirectional_weight_tie=bool(data.get("bidirectional_weight_tie", True)),
        norm="rmsnorm" if data.get("rms_norm", True) else "layernorm",
        norm_eps=float(data.get("norm_epsilon", 1e-5)), residual_in_fp32=bool(data.get("residual_in_fp32", True)))


def hf_to_ours(key: str) -> str:
    """A released key -> ours: ``caduceus.backbone.embeddings.*`` -> ``caduceus.embeddings.*``; the rest keeps
    its name (layers, norm_f, lm_head). A leading ``model.`` is dropped."""
    key = key.removeprefix("model.")
    return key.replace("caduceus.backbone.embeddings.", "caduceus.embeddings.", 1)


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict loading that accepts tied tensors stored once (safetensors drops duplicates) and checks that
    tensors stored twice for one tied parameter agree."""
    ours = model.state_dict(keep_vars=True)
    unexpected = sorted(set(state) - set(ours))
    if unexpected:
        raise ValueError(f"{source}: unexpected key(s) {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    groups: dict[int, list[str]] = {}
    for key, tensor in ours.items():
        groups.setdefault(id(tensor), []).append(key)
    missing = []
    for keys in groups.values():
        present = [k for k in keys if k in state]
        if not present:
            if not keys[0].endswith("complement_map"):
                missing += keys
            continue
        for key in present[1:]:
            if not torch.equal(state[key], state[present[0]]):
                raise ValueError(f"{source}: {key} and {present[0]} are one tied parameter here but differ in the "
                                 "checkpoint (bidirectional_weight_tie=False in config.json?)")
        for key in present:
            if state[key].shape != ours[key].shape:
                raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, the model expects "
                                 f"{tuple(ours[key].shape)}")
            if key.endswith("complement_map") and not torch.equal(state[key].long(), ours[key].long()):
                raise ValueError(f"{source}: {key} differs from the config's complement map")
    if missing:
        raise ValueError(f"{source}: missing key(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    model.load_state_dict(state, strict=False)


def load_caduceus_mlm(directory: str | os.PathLike, device: str | torch.device = "cpu",
                      backend: str = "auto") -> CaduceusForMaskedLM:
    """A ``CaduceusForMaskedLM`` from a local directory: a released Caduceus checkpoint (``config.json`` with
    model_type "caduceus", PS or Ph, any size) or one written by our ``save_pretrained``."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (expected a Hugging Face style directory)")
    data = json.loads(config_path.read_text())
    model_type = data.get("model_type")
    if model_type in ("CaduceusForMaskedLM", "Caduceus"):
        if model_type == "Caduceus":
            data.pop("model_type")
            config = CaduceusConfig.from_dict(data)
            model = CaduceusForMaskedLM(config, backend)
            state, path = read_state_dict(directory)
            load_state_into(model.caduceus, state, str(path))
            return model.to(device)
        return CaduceusForMaskedLM.from_pretrained(directory, device=device, backend=backend)
    if model_type != "caduceus":
        raise ValueError(f"{config_path}: model_type {model_type!r} is not a Caduceus model")
    raw, path = read_state_dict(directory)
    state = {hf_to_ours(k): v for k, v in raw.items()}
    config = caduceus_config_from_hf(data, state, str(config_path))
    model = CaduceusForMaskedLM(config, backend)
    if not any(k.startswith("lm_head.") for k in state):  # a backbone-only CaduceusModel: head is tied anyway
        load_state_into(model.caduceus, {k.removeprefix("caduceus."): v for k, v in state.items()}, str(path))
    else:
        load_state_into(model, state, str(path))
    return model.to(device)


def backbone_from_source(source: str | os.PathLike, backend: str = "auto") -> Caduceus:
    """The pretrained ``Caduceus`` backbone (embedding + blocks) from a directory (released or ours) or a
    Lightning ``.ckpt`` of ``DNAMaskedLM`` / ``DNASequenceModule``."""
    path = Path(source)
    if path.is_dir():
        return load_caduceus_mlm(path, backend=backend).caduceus
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint does not exist: {path}")
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    config = config_from_hparams(ckpt.get("hyper_parameters", {}), str(path))
    model = Caduceus(config, backend)
    prefix = "model.caduceus."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{path}: no '{prefix}*' weights (a DNA module checkpoint was expected)")
    load_state_into(model, state, str(path))
    return model


def config_from_hparams(hparams: dict, source: str = "hparams") -> CaduceusConfig:
    """CaduceusConfig from a DNA LightningModule's hyperparameters."""
    try:
        return CaduceusConfig(
            d_model=int(hparams["d_model"]), n_layer=int(hparams["n_layer"]), rcps=bool(hparams["rcps"]),
            vocab_size=int(hparams.get("vocab_size", VOCAB_SIZE)),
            mamba=MambaConfig(d_state=int(hparams.get("d_state", 16)), d_conv=int(hparams.get("d_conv", 4)),
                              expand=int(hparams.get("expand", 2))))
    except KeyError as err:
        raise ValueError(f"{source}: hyperparameter {err} missing; not a seqmamba DNA checkpoint") from err
