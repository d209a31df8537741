"""Model configuration: one dataclass per component and the two presets.

`sd21-base` is the paper's model (parameter counts in README.md, The model). `tiny` has the same classes and
code paths with small channel counts so that a whole sample runs in seconds on a CPU.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config_check import check_config_dict


@dataclass
class LearnerConfig:
    """ResNet of BasicBlocks that maps an LR image to its degradation vector."""

    stem_channels: int = 64
    widths: tuple[int, ...] = (128, 256, 512, 1024)
    blocks: tuple[int, ...] = (3, 4, 6, 3)

    @property
    def out_dim(self) -> int:
        return self.widths[-1]


@dataclass
class AdapterConfig:
    """Degradation-aware adapter (a simplified ControlNet encoder)."""

    in_channels: int = 4
    base_channels: int = 256
    channel_mult: tuple[int, ...] = (1, 1, 2, 2)
    attention_levels: tuple[int, ...] = (0, 1, 2)
    num_heads: int = 4
    local_channels: int = 256
    degradation_dim: int = 1024
    da_reduction: int = 32
    norm_groups: int = 32
    dropout: float = 0.0

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.base_channels

    @property
    def level_channels(self) -> list[int]:
        return [m * self.base_channels for m in self.channel_mult]

    @property
    def token_dim(self) -> int:
        return self.level_channels[-1]


def sd21_unet_config(cross_attention_dim: int = 512) -> dict[str, Any]:
    """diffusers UNet2DConditionModel config of SD 2.1-base, with our cross-attention width."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": cross_attention_dim,
        "use_linear_projection": True,
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def sd21_vae_config() -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


@dataclass
class SchedulerConfig:
    """Training noise schedule (scaled-linear betas, epsilon prediction)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"


@dataclass
class SamplerConfig:
    """Defaults of the reference sampler; every one can be overridden per call."""

    steps: int = 50
    eta: float = 1.0
    noise_guidance_steps: tuple[int, ...] = (0,)
    init: str = "noise"  # "noise" | "lr"
    tile: int = 64  # latent tile side for aggregation sampling
    tile_overlap: int = 32
    color_fix: str = "none"  # "adain" | "wavelet" | "none"
    # "paper" | "reference-code": how the LR latent is made and pixels quantised
    # (deedsr.runtime.profiles); the profile the weights were trained under.
    profile: str = "paper"


@dataclass
class DeeDSRConfig:
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    unet: dict[str, Any] = field(default_factory=sd21_unet_config)
    modulation_hidden: int = 128
    vae: dict[str, Any] = field(default_factory=sd21_vae_config)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    upscale: int = 4
    preset: str = "sd21-base"

    def __post_init__(self) -> None:
        if self.adapter.degradation_dim != self.learner.out_dim:
            raise ValueError(
                f"adapter.degradation_dim ({self.adapter.degradation_dim}) must equal the learner's "
                f"output width ({self.learner.out_dim})"
            )
        if self.unet["cross_attention_dim"] != self.adapter.token_dim:
            raise ValueError(
                f"unet cross_attention_dim ({self.unet['cross_attention_dim']}) must equal the adapter's "
                f"token width ({self.adapter.token_dim})"
            )
        if len(self.adapter.channel_mult) != len(self.unet["block_out_channels"]):
            raise ValueError("the adapter and the UNet must have the same number of resolution levels")
        latent = self.vae["latent_channels"]
        for name, value in (("adapter.in_channels", self.adapter.in_channels),
                            ("unet.in_channels", self.unet["in_channels"]),
                            ("unet.out_channels", self.unet["out_channels"])):
            if value != latent:
                raise ValueError(f"{name} ({value}) must equal vae.latent_channels ({latent}): the latent the "
                                 "adapter and the UNet see is the VAE's")

    @property
    def latent_channels(self) -> int:
        return int(self.vae["latent_channels"])

    @property
    def latent_downscale(self) -> int:
        """Image side / latent side: diffusers' AutoencoderKL halves the image in every block but
        the last, so this is 2 ** (VAE blocks - 1)."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_multiple(self) -> int:
        """Latent sides must be a multiple of this (the UNet halves the latent this many times)."""
        return 2 ** (len(self.unet["block_out_channels"]) - 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeeDSRConfig":
        check_config_dict(data)  # types, signs and sizes, one line naming the field (config_check.py)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        parts = {
            "learner": LearnerConfig,
            "adapter": AdapterConfig,
            "scheduler": SchedulerConfig,
            "sampler": SamplerConfig,
        }
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in parts:
                kwargs[key] = _dataclass_from_dict(parts[key], value, key)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "DeeDSRConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _dataclass_from_dict(cls, value: dict[str, Any], where: str):
    if not isinstance(value, dict):
        raise ValueError(f"config '{where}' must be a mapping, got {type(value).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(value) - set(fields)
    if unknown:
        raise ValueError(f"unknown keys in config '{where}': {sorted(unknown)}")
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    return cls(**converted)


def sd21_base() -> DeeDSRConfig:
    return DeeDSRConfig()


def tiny() -> DeeDSRConfig:
    """Small channels, one block per level, the same classes and code paths as sd21-base."""
    unet = sd21_unet_config(cross_attention_dim=64)
    unet.update(
        sample_size=32,
        block_out_channels=[32, 64, 64, 64],
        layers_per_block=1,
        attention_head_dim=[2, 4, 4, 4],
        norm_num_groups=8,
    )
    vae = sd21_vae_config()
    vae.update(block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8, sample_size=256)
    return DeeDSRConfig(
        learner=LearnerConfig(stem_channels=16, widths=(16, 32, 64, 64), blocks=(1, 1, 1, 1)),
        adapter=AdapterConfig(
            base_channels=32,
            num_heads=2,
            local_channels=32,
            degradation_dim=64,
            da_reduction=8,
            norm_groups=8,
        ),
        unet=unet,
        modulation_hidden=16,
        vae=vae,
        sampler=SamplerConfig(tile=32, tile_overlap=16),
        preset="tiny",
    )


def with_latent(config: DeeDSRConfig, channels: int | None = None, downscale: int | None = None) -> DeeDSRConfig:
    """The same model with another latent: `channels` latent channels (VAE, adapter input, UNet
    input and output) and an image-to-latent factor `downscale` (a power of two: VAE blocks are
    dropped from, or the last width repeated at, the end of its block list)."""
    vae, unet = dict(config.vae), dict(config.unet)
    adapter = dataclasses.replace(config.adapter)
    if channels is not None:
        vae["latent_channels"] = unet["in_channels"] = unet["out_channels"] = adapter.in_channels = int(channels)
    if downscale is not None:
        blocks = int(downscale).bit_length() - 1
        if downscale < 1 or 2**blocks != downscale or blocks > 7:
            raise ValueError(f"latent downscale must be a power of two in 1..128, got {downscale}")
        widths = list(vae["block_out_channels"])
        widths = (widths + [widths[-1]] * blocks)[: blocks + 1]
        vae.update(block_out_channels=widths, down_block_types=[vae["down_block_types"][0]] * len(widths),
                   up_block_types=[vae["up_block_types"][0]] * len(widths))
    return dataclasses.replace(config, vae=vae, unet=unet, adapter=adapter)


PRESETS = {"sd21-base": sd21_base, "tiny": tiny}


def preset(name: str) -> DeeDSRConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}") from None
