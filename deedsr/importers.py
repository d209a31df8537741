"""Importers for weights made elsewhere.

* `init_from_sd_base(model, folder)`: start a DeeDSR model from a local Stable Diffusion
  2.1-base *diffusers* folder (`unet/` and `vae/`). Every UNet backbone tensor whose key and
  shape match is copied; the cross-attention key/value projections (1024 wide in SD 2.1,
  512 here) are skipped with reason "shape" and keep their fresh initialisation; the
  modulation layers are not touched (zero-initialised gamma/beta: identity). The VAE must
  load completely.
* `import_reference_checkpoint(path, config)`: read a checkpoint saved by the public
  reference implementation (github.com/bichunyang419/DeeDSR, ControlNet/ldm layout) and
  return a DeeDSR model. Every weight under `model.diffusion_model.`, `first_stage_model.`
  and `Encoder_degrad.` must find a place in our model and every tensor of our model must be
  filled, or CheckpointError says which keys are at fault.

Nothing here touches the network, and pickles are only read with `weights_only=True`.
"""
from __future__ import annotations

import json
import logging
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .checkpoints import CheckpointError, check_state
from .config import AdapterConfig, DeeDSRConfig, preset
from .models.model import DeeDSR
from .models.unet import _resnets_in_order

logger = logging.getLogger(__name__)

__all__ = ["ImportReport", "init_from_sd_base", "import_reference_checkpoint"]

WEIGHTS_NAME = "diffusion_pytorch_model"

# Key prefixes of the reference (ControlLDM) layout.
REF_UNET = "model.diffusion_model."
REF_VAE = "first_stage_model."
REF_ADAPTER = "Encoder_degrad."
# Training-only parts of the first-stage model (LPIPS / discriminator), never model weights.
REF_IGNORED_UNDER_PREFIXES = ("first_stage_model.loss.",)


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _listing(keys, n: int = 5) -> str:
    keys = list(keys)
    shown = ", ".join(f"'{k}'" for k in keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _strip_trailing_ones(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    while shape and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _fit(tensor: torch.Tensor, shape) -> torch.Tensor | None:
    """`tensor` in `shape`, allowing only a 1x1 convolution <-> linear reshape (trailing
    singleton dimensions); None when it cannot fit."""
    shape = tuple(shape)
    if tuple(tensor.shape) == shape:
        return tensor
    if tensor.numel() == math.prod(shape) and _strip_trailing_ones(tensor.shape) == _strip_trailing_ones(shape):
        return tensor.reshape(shape)
    return None


def _torch_load(file: Path):
    """torch.load restricted to tensors and plain containers."""
    try:
        return torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file}: this file needs unsafe unpickling (it holds more than tensors and plain "
            f"containers), which deedsr refuses; convert it to .safetensors with a trusted tool "
            f"first ({str(e).splitlines()[0]})"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable torch file ({e})") from None


def _safetensors_load(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


@dataclass
class ImportReport:
    """What an import did: how many tensors were copied and which were skipped, and why.

    `skipped` maps a model-level key (as in `model.state_dict()`, e.g.
    'unet.unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight') to a
    reason: "shape" (present in both, shapes differ: keeps its fresh initialisation),
    "missing" (ours, absent from the source) or "unexpected" (in the source only).
    """

    source: str
    loaded: int = 0
    by_component: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = ", ".join(f"{name}: {count}" for name, count in self.by_component.items())
        text = f"Loaded {self.loaded} tensors from {self.source}" + (f" ({parts})." if parts else ".")
        if self.skipped:
            reasons: dict[str, list[str]] = {}
            for key, reason in self.skipped.items():
                reasons.setdefault(reason, []).append(key)
            detail = "; ".join(
                f"{len(keys)} for reason '{reason}' (e.g. {keys[0]})" for reason, keys in sorted(reasons.items())
            )
            text += f" Skipped {len(self.skipped)}: {detail}; those keep their fresh initialisation."
        else:
            text += " Nothing was skipped."
        if self.notes:
            text += " " + " ".join(self.notes)
        return text


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
    """
    path = Path(path)
    config = config if config is not None else preset("sd21-base")
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
    return model.eval()
