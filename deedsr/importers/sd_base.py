"""Start a DeeDSR model from a local Stable Diffusion 2.1-base diffusers folder."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..checkpoints import CheckpointError, check_state
from ..models.model import DeeDSR
from .common import (
    WEIGHTS_NAME,
    ImportReport,
    _listing,
    _safetensors_load,
    _torch_load,
)

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# SD 2.1-base diffusers folder
# --------------------------------------------------------------------------------------


def _read_diffusers_weights(folder: Path, variant: str | None) -> tuple[dict[str, torch.Tensor], Path]:
    """State dict of one diffusers model folder (single file or sharded, safetensors
    preferred, .bin only through weights_only torch.load). Returns (state, file named in errors)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: missing (expected a diffusers model folder)")
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{config}: missing (is {folder} a diffusers model folder?)")
    stem = WEIGHTS_NAME if variant is None else f"{WEIGHTS_NAME}.{variant}"
    for ext, reader in (("safetensors", _safetensors_load), ("bin", _torch_load)):
        single = folder / f"{stem}.{ext}"
        if single.is_file():
            state = reader(single)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"{single}: not a state dict of tensors")
            return state, single
        index = folder / f"{stem}.{ext}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                file = folder / shard
                if not file.is_file():
                    raise CheckpointError(f"{file}: missing (listed in {index.name})")
                part = reader(file)
                if not isinstance(part, dict):
                    raise CheckpointError(f"{file}: not a state dict of tensors")
                state.update(part)
            absent = sorted(set(weight_map) - set(state))
            if absent:
                raise CheckpointError(f"{index}: shards lack tensors it lists: {_listing(absent)}")
            return state, index
    raise CheckpointError(
        f"{folder}: no weights found (looked for {stem}.safetensors, {stem}.safetensors.index.json, "
        f"{stem}.bin, {stem}.bin.index.json)"
    )


def _fix_deprecated_attention_keys(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Old diffusers files name the VAE mid-block attention query/key/value/proj_attn;
    rename those to to_q/to_k/to_v/to_out.0 (what diffusers' own loader does)."""
    renames = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    for name, sub in module.named_modules():
        if not getattr(sub, "_from_deprecated_attn_block", False):
            continue
        for old, new in renames.items():
            for leaf in ("weight", "bias"):
                src, dst = f"{name}.{old}.{leaf}", f"{name}.{new}.{leaf}"
                if src in state and dst not in state:
                    state[dst] = state.pop(src)


# Settings of our config that do not show in tensor shapes but change what the weights compute.
_IGNORED_CONFIG_KEYS = {"cross_attention_dim", "sample_size"}


def _check_config(folder: Path, ours: dict) -> None:
    file = folder / "config.json"
    try:
        theirs = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(theirs, dict):
        raise CheckpointError(f"{file}: not a diffusers config")

    def norm(value):
        return list(value) if isinstance(value, tuple) else value

    for key, value in ours.items():
        if key in _IGNORED_CONFIG_KEYS or key not in theirs:
            continue
        if norm(theirs[key]) != norm(value):
            raise CheckpointError(
                f"{file}: '{key}' is {theirs[key]!r}, this model needs {value!r} "
                f"(pass strict=False to import what fits anyway)"
            )


def _is_attn2_kv(key: str) -> bool:
    return ".attn2.to_k." in key or ".attn2.to_v." in key


def init_from_sd_base(
    model: DeeDSR, folder: str | Path, *, variant: str | None = None, strict: bool = True
) -> ImportReport:
    """Initialise `model`'s UNet backbone and VAE from a local SD 2.1-base diffusers folder.

    The UNet backbone (`model.unet.unet`) gets every tensor whose key and shape match;
    mismatches are reported in `ImportReport.skipped`. With `strict` (the default) the only
    tolerated skips are the cross-attention key/value projections (attn2.to_k / attn2.to_v,
    whose input width differs); anything else skipped, and any setting of the folder's
    config.json that contradicts ours, raises CheckpointError. The VAE must load completely
    (missing or mis-shaped tensor -> CheckpointError naming the file). The learner, the
    adapter and the modulation layers are not touched.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: missing (expected a Stable Diffusion diffusers folder)")
    report = ImportReport(source=str(folder))

    # Read and check everything before writing into the model.
    unet_state, unet_file = _read_diffusers_weights(folder / "unet", variant)
    vae_state, vae_file = _read_diffusers_weights(folder / "vae", variant)
    if strict:
        _check_config(folder / "unet", model.config.unet)
        _check_config(folder / "vae", model.config.vae)

    backbone = model.unet.unet
    ours = backbone.state_dict()
    unet_load: dict[str, torch.Tensor] = {}
    for key, tensor in unet_state.items():
        if key not in ours:
            report.skipped[f"unet.unet.{key}"] = "unexpected"
        elif tuple(tensor.shape) != tuple(ours[key].shape):
            report.skipped[f"unet.unet.{key}"] = "shape"
        else:
            unet_load[key] = tensor
    for key in ours:
        if key not in unet_state:
            report.skipped[f"unet.unet.{key}"] = "missing"
    if strict:
        bad = [k for k, reason in report.skipped.items() if not (reason == "shape" and _is_attn2_kv(k))]
        if bad:
            raise CheckpointError(
                f"{unet_file}: does not fit this model's UNet backbone beyond the attn2 key/value "
                f"projections: {_listing(f'{k} ({report.skipped[k]})' for k in bad)} "
                f"(pass strict=False to import what fits anyway)"
            )

    vae = model.vae
    _fix_deprecated_attention_keys(vae, vae_state)
    check_state(vae, vae_state, str(vae_file))

    with torch.no_grad():
        missing, unexpected = backbone.load_state_dict(unet_load, strict=False)
        assert not unexpected, unexpected
        vae.load_state_dict(vae_state, strict=True)
    report.by_component = {"unet": len(unet_load), "vae": len(vae_state)}
    report.loaded = len(unet_load) + len(vae_state)
    report.notes.append("Modulation layers, adapter and learner were not touched.")
    logger.info(report.summary())
    return report


