"""What the stages read and write besides training state: model configs and checkpoint folders
in the format of deedsr.checkpoints (config.json + one safetensors file per component).

A stage that trains one component writes a *partial* checkpoint folder: config.json (the whole
model config, so the component's shape is defined) and only that component's file, e.g.
stage I writes learner.safetensors. `deedsr.models.load_checkpoint(path,
components=("learner",))` reads it, and so does `load_component` here.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoints import (
    FORMAT,
    CheckpointError,
    check_state,
    component_file,
    load_state,
    read_config,
    save_components,
)
from ..config import PRESETS, DeeDSRConfig, preset
from .config import ConfigError

__all__ = ["resolve_model_config", "save_components", "load_component"]


def resolve_model_config(spec: str, where: str) -> DeeDSRConfig:
    """A preset name, a DeeDSR checkpoint folder, or a config.json (checkpoint meta or plain)."""
    if spec in PRESETS:
        return preset(spec)
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            return read_config(path)
        if path.is_file():
            data = json.loads(path.read_text())
            if isinstance(data, dict) and data.get("format") == FORMAT:
                return read_config(path.parent)
            return DeeDSRConfig.from_dict(data)
    except CheckpointError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {path}: not a usable model config ({e})") from None
    raise ConfigError(f"{where}: '{spec}' is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing path")


def load_component(path: str | Path, name: str, module: torch.nn.Module, where: str) -> DeeDSRConfig:
    """Load component `name` of checkpoint folder `path` into `module` (checked tensor by
    tensor); returns the folder's model config. Errors are ConfigError naming `where`."""
    path = Path(path).expanduser()
    try:
        config = read_config(path)
        file = component_file(path, name)
        state = load_state(file)
        check_state(module, state, str(file))
    except CheckpointError as e:
        raise ConfigError(f"{where}: {e}") from None
    module.load_state_dict(state)
    return config
