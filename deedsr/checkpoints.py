"""DeeDSR checkpoints: a folder with config.json and one safetensors file per component.

Loading checks every tensor (missing, unexpected, mis-shaped) and names the file at
fault. Nothing is ever unpickled. This module is the format only; the model is built by
`deedsr.models.load_checkpoint` (= `DeeDSR.from_pretrained`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import DeeDSRConfig

CONFIG_NAME = "config.json"
FORMAT = "deedsr-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used; the message names the file at fault."""


def component_file(path: str | Path, component: str) -> Path:
    return Path(path) / f"{component}.safetensors"


def save_components(config: DeeDSRConfig, modules: dict[str, torch.nn.Module], path: str | Path,
                    dtype: torch.dtype | None = None, trained: bool = True) -> Path:
    """Write config.json + <name>.safetensors for each module, atomically (a temporary sibling
    folder, then rename). With `dtype`, floating-point tensors are stored in that dtype. A folder
    with only some components is a partial checkpoint (e.g. stage I writes the learner).
    `trained=False` marks weights that no training or import produced (an untrained preset)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "trained": bool(trained), "config": config.to_dict()}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        for name, module in modules.items():
            state = {}
            for key, tensor in module.state_dict().items():
                tensor = tensor.detach().to("cpu").contiguous()
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                state[key] = tensor.clone()
            save_file(state, str(component_file(tmp, name)), metadata={"component": name})
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private; checkpoints are meant to be shared
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_checkpoint(model, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Every component of a DeeDSR model (`model.COMPONENTS`)."""
    return save_components(model.config, {name: getattr(model, name) for name in model.COMPONENTS}, path, dtype,
                           trained=model.trained)


def read_config(path: str | Path) -> DeeDSRConfig:
    meta = read_meta(path)
    try:
        return DeeDSRConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(path) / CONFIG_NAME}: bad config ({e})") from None


def is_trained(path: str | Path) -> bool:
    """False only for checkpoints marked as untrained weights (folders without the mark are trained)."""
    return read_meta(path).get("trained", True) is not False


def read_meta(path: str | Path) -> dict:
    """config.json of a checkpoint folder, checked for format and version."""
    path = Path(path)
    file = path / CONFIG_NAME
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (is {path} a DeeDSR checkpoint?)")
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a DeeDSR checkpoint config")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: checkpoint format version {meta.get('version')}, this deedsr reads {FORMAT_VERSION}"
        )
    return meta


def load_state(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None


def check_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Raise CheckpointError on the first missing, unexpected or mis-shaped tensor."""
    expected = module.state_dict()
    for key, ref in expected.items():
        if key not in state:
            raise CheckpointError(f"{where}: missing tensor '{key}'")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{where}: tensor '{key}' has shape {tuple(state[key].shape)}, "
                f"the config needs {tuple(ref.shape)}"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor '{extra[0]}' ({len(extra)} in all)")
