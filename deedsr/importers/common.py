"""What both importers share: tolerant tensor loading, shape fitting and the ImportReport."""
from __future__ import annotations

import logging
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..checkpoints import CheckpointError

logger = logging.getLogger(__name__)


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


