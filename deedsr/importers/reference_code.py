"""Checkpoints saved by the public reference implementation (ControlNet/ldm layout)."""
from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Callable

import torch

from ..checkpoints import CheckpointError
from ..config import AdapterConfig, DeeDSRConfig, preset
from ..models.model import DeeDSR
from ..models.unet import _resnets_in_order
from ..runtime.profiles import REFERENCE_CODE
from .common import (
    REF_ADAPTER,
    REF_IGNORED_UNDER_PREFIXES,
    REF_UNET,
    REF_VAE,
    _fit,
    _listing,
    _safetensors_load,
    _torch_load,
)

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# Reference implementation checkpoints (ControlNet / ldm layout)
# --------------------------------------------------------------------------------------

# ldm ResBlock -> diffusers ResnetBlock2D
_RESBLOCK = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

# reference DAG_chain (one DAB) -> our DABlock
_DAG_CHAIN = {
    "chain.0": "compress",
    "body.0.conv1": "conv1",
    "body.0.conv2": "conv2",
    "body.1": "conv_out",
}
for _n in (1, 2):
    _DAG_CHAIN.update(
        {
            f"body.0.da_conv{_n}.kernel.0": f"da_conv{_n}.kernel.0",
            f"body.0.da_conv{_n}.kernel.2": f"da_conv{_n}.kernel.2",
            f"body.0.da_conv{_n}.conv": f"da_conv{_n}.conv",
            f"body.0.da_conv{_n}.ca.conv_du.0": f"da_conv{_n}.channel_attention.0",
            f"body.0.da_conv{_n}.ca.conv_du.2": f"da_conv{_n}.channel_attention.2",
        }
    )

# reference SPADE -> our Modulation
_SPADE = {"mlp_shared.0": "shared", "mlp_gamma": "gamma", "mlp_beta": "beta"}

Placement = list[tuple[str, torch.Tensor]]  # (our model-level key, tensor)
Sourced = list[tuple[str, torch.Tensor, str]]  # (our model-level key, tensor, source key)


def _split_module_leaf(suffix: str) -> tuple[str, str] | None:
    module, _, leaf = suffix.rpartition(".")
    return (module, leaf) if module else None


def _adapter_rules(cfg: AdapterConfig) -> list[tuple[str, str, str]]:
    """(reference prefix under Encoder_degrad., our model-level prefix, kind) for every
    sub-module of the reference Encoder_degrad (num_res_blocks = 1, resblock_updown)."""
    rules = [
        ("time_embed.0.", "adapter.time_embedding.linear_1.", "plain"),
        ("time_embed.2.", "adapter.time_embedding.linear_2.", "plain"),
        ("input_blocks.0.0.", "adapter.conv_in.", "plain"),
        ("middle_block.0.", "adapter.mid_resnet1.", "resnet"),
        ("middle_block.1.", "adapter.mid_attention.", "attention"),
        ("middle_block.2.", "adapter.mid_resnet2.", "resnet"),
        ("degrad_encoder.", "learner.", "learner"),
    ]
    levels = len(cfg.channel_mult)
    index = 1
    for level in range(levels):
        rules.append((f"input_blocks.{index}.0.", f"adapter.resnets.{level}.", "resnet"))
        rules.append((f"input_blocks.{index}.1.", f"adapter.da_blocks.{level}.", "dablock"))
        if level in cfg.attention_levels:
            rules.append((f"input_blocks.{index}.2.", f"adapter.attentions.{level}.", "attention"))
        index += 1
        if level != levels - 1:
            rules.append((f"input_blocks.{index}.0.", f"adapter.downsamplers.{level}.", "resnet"))
            index += 1
        rules.append((f"fea_tran.{level}.", f"adapter.local_heads.{level}.", "resnet"))
    return rules


def _legacy_qkv_split(tensor: torch.Tensor, heads: int) -> list[torch.Tensor] | None:
    """ldm AttentionBlock `qkv` (1x1 conv, 3C outputs in the legacy order: per head, q then
    k then v) -> the q, k, v projections of diffusers' Attention (head-major rows)."""
    if tensor.dim() == 3 and tensor.shape[-1] == 1:
        tensor = tensor[..., 0]
    width = tensor.shape[0]
    if width % (3 * heads):
        return None
    ch = width // (3 * heads)
    parts = tensor.reshape(heads, 3, ch, *tensor.shape[1:])
    return [parts[:, i].reshape(heads * ch, *tensor.shape[1:]).clone() for i in range(3)]


def _place_adapter_key(sub: str, tensor: torch.Tensor, rules, heads: int) -> Placement | None:
    for prefix, target, kind in rules:
        if not sub.startswith(prefix):
            continue
        rest = sub[len(prefix):]
        if kind == "learner":
            if rest.startswith("layer"):
                head, dot, tail = rest[len("layer"):].partition(".")
                if not (dot and head.isdigit() and int(head) >= 1):
                    return None
                rest = f"layers.{int(head) - 1}.{tail}"
            return [(target + rest, tensor)]
        split = _split_module_leaf(rest)
        if split is None:
            return [(target + rest, tensor)] if kind == "plain" else None
        module, leaf = split
        if kind == "resnet":
            return [(f"{target}{_RESBLOCK[module]}.{leaf}", tensor)] if module in _RESBLOCK else None
        if kind == "dablock":
            return [(f"{target}{_DAG_CHAIN[module]}.{leaf}", tensor)] if module in _DAG_CHAIN else None
        if kind == "attention":
            if module == "norm":
                return [(f"{target}group_norm.{leaf}", tensor)]
            if module == "proj_out":
                return [(f"{target}to_out.0.{leaf}", tensor)]
            if module == "qkv":
                parts = _legacy_qkv_split(tensor, heads)
                if parts is None:
                    return None
                return [(f"{target}{name}.{leaf}", p) for name, p in zip(("to_q", "to_k", "to_v"), parts)]
            return None
        return None
    return None


def _probe_conversion(keys_and_ndims: dict[str, int], convert: Callable[[dict], dict]) -> dict[str, str]:
    """Run one of diffusers' ldm -> diffusers converters on stand-in tensors and read off the
    key mapping it applies ({diffusers key: ldm key}). The stand-ins keep each tensor's rank
    (the converters reshape by rank) and hold the index of their source key."""
    names = list(keys_and_ndims)
    probes = {
        name: torch.full((1,) * ndim, i, dtype=torch.int64) for i, (name, ndim) in enumerate(keys_and_ndims.items())
    }
    converted = convert(probes)
    return {key: names[int(value.reshape(-1)[0])] for key, value in converted.items() if value is not None}


def _convert_unet(unet_state: dict[str, torch.Tensor], model: DeeDSR) -> tuple[Sourced, list[str]]:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = model.config.unet
    mapping = _probe_conversion(
        {k: v.dim() for k, v in unet_state.items()},
        lambda probes: convert_ldm_unet_checkpoint(probes, config),
    )
    backbone = model.unet.unet
    names = {id(module): name for name, module in backbone.named_modules()}
    resnet_index = {names[id(r)]: i for i, (r, _) in enumerate(_resnets_in_order(backbone))}

    placed: Sourced = []
    used: dict[str, str] = {}
    unplaced: list[str] = []
    for diffusers_key, ldm_key in mapping.items():
        if ldm_key in used:
            unplaced.append(ldm_key)  # the converter mapped one source tensor twice: refuse
            continue
        used[ldm_key] = diffusers_key
        tensor = unet_state[ldm_key]
        if ".spade." in diffusers_key:
            resnet, _, rest = diffusers_key.partition(".spade.")
            split = _split_module_leaf(rest)
            if resnet not in resnet_index or split is None or split[0] not in _SPADE:
                unplaced.append(ldm_key)
                continue
            placed.append((f"unet.modulation.{resnet_index[resnet]}.{_SPADE[split[0]]}.{split[1]}", tensor, ldm_key))
        else:
            placed.append((f"unet.unet.{diffusers_key}", tensor, ldm_key))
    unplaced += [k for k in unet_state if k not in used]
    return placed, unplaced


def _convert_vae(vae_state: dict[str, torch.Tensor], model: DeeDSR) -> tuple[Sourced, list[str]]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = model.config.vae
    mapping = _probe_conversion(
        {k: v.dim() for k, v in vae_state.items()},
        lambda probes: convert_ldm_vae_checkpoint(probes, config),
    )
    placed: Sourced = []
    used: set[str] = set()
    unplaced: list[str] = []
    for diffusers_key, ldm_key in mapping.items():
        if ldm_key in used:
            unplaced.append(ldm_key)
            continue
        used.add(ldm_key)
        placed.append((f"vae.{diffusers_key}", vae_state[ldm_key], ldm_key))
    unplaced += [k for k in vae_state if k not in used]
    return placed, unplaced


def _read_reference_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    if path.suffix == ".safetensors":
        state = _safetensors_load(path)
    else:
        state = _torch_load(path)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds no state dict")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path}: holds no tensors")
    return state


def _unshare(state: dict[str, torch.Tensor]) -> None:
    """Clone tensors that share storage with an earlier one (safetensors refuses to save those)."""
    seen: set[tuple[int, int]] = set()
    for key, tensor in state.items():
        storage = tensor.untyped_storage()
        ident = (storage.data_ptr(), storage.nbytes())
        if storage.nbytes() and ident in seen:
            state[key] = tensor.clone()
        seen.add(ident)


def import_reference_checkpoint(path: str | Path, config: DeeDSRConfig | None = None) -> DeeDSR:
    """Build a DeeDSR model from a checkpoint of the public reference implementation.

    `path`: a `.ckpt` (torch pickle, read with weights_only=True, whose `state_dict` is used)
    or a `.safetensors` file with the ControlLDM keys. `config` defaults to the sd21-base preset.
    Keys outside `model.diffusion_model.`, `first_stage_model.` and `Encoder_degrad.` (noise
    schedule buffers, EMA copies, text encoder, ...) are ignored, as is `first_stage_model.loss.`.
    The UNet and VAE keys go through diffusers' own ldm converters; the SPADE layers of each
    ResBlockDual become `unet.modulation[i]` (i = that block's place in diffusers' down, mid,
    up order); the adapter's 1x1 `qkv` convolutions are split in the legacy head-first order
    with `config.adapter.num_heads` heads (4 in the reference config).
    Raises CheckpointError, naming the keys, when a weight cannot be placed, does not fit
    the config's shape, or when any tensor of the model is left unfilled.
    The model's sampler profile is `reference-code`: the weights were trained and evaluated
    under the public code's test-time host maths (deedsr.runtime.profiles).
    """
    path = Path(path)
    config = config if config is not None else preset("sd21-base")
    config = copy.copy(config)  # the caller's stays as it was; not replace(): no re-validation here
    config.sampler = dataclasses.replace(config.sampler, profile=REFERENCE_CODE)
    state = _read_reference_state(path)

    unet_state, vae_state, adapter_state = {}, {}, {}
    ignored = []
    for key, tensor in state.items():
        if key.startswith(REF_IGNORED_UNDER_PREFIXES):
            ignored.append(key)
        elif key.startswith(REF_UNET):
            unet_state[key] = tensor  # the diffusers converter strips this prefix itself
        elif key.startswith(REF_VAE):
            vae_state[key] = tensor
        elif key.startswith(REF_ADAPTER):
            adapter_state[key[len(REF_ADAPTER):]] = tensor
        else:
            ignored.append(key)
    del state
    if not (unet_state or vae_state or adapter_state):
        raise CheckpointError(
            f"{path}: no key under '{REF_UNET}', '{REF_VAE}' or '{REF_ADAPTER}'; "
            f"is it a checkpoint of the reference DeeDSR implementation?"
        )

    with torch.device("meta"):
        model = DeeDSR(config)
    expected = model.state_dict()

    placed: Sourced = []
    unplaced: list[str] = []
    for part, convert in ((unet_state, _convert_unet), (vae_state, _convert_vae)):
        if not part:
            continue
        try:
            p, u = convert(part, model)
        except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{path}: diffusers' ldm key conversion failed ({e!r})") from None
        placed += p
        unplaced += u
    rules = _adapter_rules(config.adapter)
    for sub, tensor in adapter_state.items():
        p = _place_adapter_key(sub, tensor, rules, config.adapter.num_heads)
        if p is None:
            unplaced.append(REF_ADAPTER + sub)
        else:
            placed += [(k, t, REF_ADAPTER + sub) for k, t in p]

    final: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for key, tensor, source in placed:
        if key not in expected or key in final:
            unplaced.append(source)
            continue
        fitted = _fit(tensor, expected[key].shape)
        if fitted is None:
            mismatched.append(f"{key} {tuple(tensor.shape)} != {tuple(expected[key].shape)}")
            continue
        if fitted.is_floating_point() and expected[key].is_floating_point():
            fitted = fitted.to(expected[key].dtype)
        final[key] = fitted

    unfilled = [k for k in expected if k not in final]
    problems = []
    if mismatched:
        problems.append(
            f"{len(mismatched)} tensor(s) do not fit the config's shapes (wrong config?): {_listing(mismatched)}"
        )
    if unplaced:
        problems.append(
            f"{len(unplaced)} weight(s) of the reference model have no place in this DeeDSR model: "
            f"{_listing(sorted(unplaced))}"
        )
    if unfilled:
        problems.append(f"{len(unfilled)} tensor(s) of the model are not in the checkpoint: {_listing(unfilled)}")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))

    _unshare(final)
    model.load_state_dict(final, strict=True, assign=True)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:  # a tensor outside the state dict: cannot come from any checkpoint
        raise CheckpointError(f"{path}: model tensors left uninitialised: {_listing(left_on_meta)}")
    if ignored:
        logger.info("%s: ignored %d non-model keys (e.g. %s)", path, len(ignored), ignored[0])
    model.trained = True
    return model.eval()
