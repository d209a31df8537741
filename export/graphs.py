"""The graphs of an engine directory as torch modules with flat, named inputs and outputs.

Each spec says, for one graph, which module to trace, the names and symbolic shapes of its
inputs and outputs, and how to make example inputs of a given size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from deedsr.runtime.contract import (
    ADAPTER,
    DENOISER,
    LEARNER,
    ROLES,
    UNET,
    VAE_DECODER,
    VAE_DECODER_TILED,
    VAE_ENCODER,
    VAE_ENCODER_TILED,
)
from deedsr.runtime.profiles import LATENT_STD
from torch import nn

from deedsr.models import DeeDSR
from deedsr.vae_tiling import TiledVaePart


def condition_names(model: DeeDSR) -> list[str]:
    levels = len(model.adapter.da_blocks)
    return [f"da{level}_{kind}{k}" for level in range(levels) for k in (1, 2) for kind in ("kernel", "scale")]


def condition_shapes(model: DeeDSR) -> list[list]:
    shapes = []
    for ch in model.config.adapter.level_channels:
        for _ in (1, 2):
            shapes += [["batch", ch, 3, 3], ["batch", ch]]
    return shapes


class LearnerGraph(nn.Module):
    """LR -> degradation vector and every adapter input that depends only on it."""

    def __init__(self, model: DeeDSR):
        super().__init__()
        self.learner, self.adapter = model.learner, model.adapter

    def forward(self, lr):
        d = self.learner(lr)
        return (d, *self.adapter.condition(d))


class VaeEncoderGraph(nn.Module):
    """Image -> the scaled posterior's mean (`latent`) and standard deviation (`latent_std`,
    for profiles that sample the posterior)."""

    def __init__(self, model: DeeDSR):
        super().__init__()
        self.model = model

    def forward(self, image):
        return self.model.encode_posterior(image)


class VaeDecoderGraph(nn.Module):
    def __init__(self, model: DeeDSR):
        super().__init__()
        self.model = model

    def forward(self, latent):
        return self.model.decode(latent)


class AdapterGraph(nn.Module):
    def __init__(self, model: DeeDSR):
        super().__init__()
        self.adapter = model.adapter

    def forward(self, z_lr, timestep, *conditions):
        local, tokens = self.adapter(z_lr, timestep, list(conditions))
        return (*local, tokens)


class UNetGraph(nn.Module):
    def __init__(self, model: DeeDSR):
        super().__init__()
        self.unet = model.unet

    def forward(self, x_t, timestep, tokens, *local):
        return self.unet(x_t, timestep, tokens, list(local))


class DenoiserGraph(nn.Module):
    """Adapter and UNet fused: one graph per step."""

    def __init__(self, model: DeeDSR):
        super().__init__()
        self.model = model

    def forward(self, x_t, timestep, z_lr, *conditions):
        return self.model.denoise(x_t, timestep, z_lr, list(conditions))


@dataclass
class GraphSpec:
    name: str
    stage: str  # contract.PER_IMAGE | contract.PER_STEP
    module: nn.Module
    inputs: list[tuple[str, list]]
    outputs: list[tuple[str, list]]
    example: Callable[[int, int, int], tuple[torch.Tensor, ...]]  # (batch, height, width) in the graph's own dims

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for name, shape in self.inputs + self.outputs:
            named = {i: str(d).replace("*", "x").replace("/", "_") for i, d in enumerate(shape) if isinstance(d, str)}
            if named:
                axes[name] = named
        return axes


def graph_specs(model: DeeDSR, fuse_denoiser: bool = False) -> list[GraphSpec]:
    cfg = model.config
    ad = cfg.adapter
    lat = cfg.vae["latent_channels"]
    conds = list(zip(condition_names(model), condition_shapes(model)))
    levels = len(ad.level_channels)
    local = [
        (f"local_{i}", ["batch", ad.local_channels, f"tile_height/{2**i}", f"tile_width/{2**i}"])
        for i in range(levels)
    ]
    m = cfg.latent_multiple
    tokens = ("tokens", ["batch", f"tile_height/{m}*tile_width/{m}", ad.token_dim])
    down = cfg.latent_downscale
    tile = ["batch", lat, "tile_height", "tile_width"]
    timestep = ("timestep", ["batch"])

    def randn(*shape):
        return torch.randn(*shape)

    def cond_examples(b):
        d = torch.randn(b, ad.degradation_dim)
        with torch.no_grad():
            return tuple(model.adapter.condition(d))

    def t_example(b):
        return torch.full((b,), 481.0)

    def local_examples(b, h, w):
        return tuple(randn(b, ad.local_channels, h // 2**i, w // 2**i) for i in range(levels))

    specs = [
        GraphSpec(
            LEARNER, ROLES[LEARNER].stage, LearnerGraph(model),
            [("lr", ["batch", 3, "lr_height", "lr_width"])],
            [("degradation", ["batch", ad.degradation_dim])] + conds,
            lambda b, h, w: (torch.rand(b, 3, h, w),),
        ),
        GraphSpec(
            VAE_ENCODER, ROLES[VAE_ENCODER].stage, VaeEncoderGraph(model),
            [("image", ["batch", 3, "image_height", "image_width"])],
            [(name, ["batch", lat, f"image_height/{down}", f"image_width/{down}"]) for name in ("latent", LATENT_STD)],
            lambda b, h, w: (torch.rand(b, 3, h, w) * 2 - 1,),
        ),
        GraphSpec(
            ADAPTER, ROLES[ADAPTER].stage, AdapterGraph(model),
            [("z_lr", tile), timestep] + conds,
            local + [tokens],
            lambda b, h, w: (randn(b, lat, h, w), t_example(b), *cond_examples(b)),
        ),
        GraphSpec(
            UNET, ROLES[UNET].stage, UNetGraph(model),
            [("x_t", tile), timestep, tokens] + local,
            [("eps", tile)],
            lambda b, h, w: (randn(b, lat, h, w), t_example(b), randn(b, (h // m) * (w // m), ad.token_dim),
                             *local_examples(b, h, w)),
        ),
        GraphSpec(
            VAE_DECODER, ROLES[VAE_DECODER].stage, VaeDecoderGraph(model),
            [("latent", ["batch", lat, "latent_height", "latent_width"])],
            [("image", ["batch", 3, f"latent_height*{down}", f"latent_width*{down}"])],
            lambda b, h, w: (randn(b, lat, h, w),),
        ),
    ]
    specs += tiled_vae_specs(model)
    if fuse_denoiser:
        specs.append(GraphSpec(
            DENOISER, ROLES[DENOISER].stage, DenoiserGraph(model),
            [("x_t", tile), timestep, ("z_lr", tile)] + conds,
            [("eps", tile)],
            lambda b, h, w: (randn(b, lat, h, w), t_example(b), randn(b, lat, h, w), *cond_examples(b)),
        ))
    return specs


def tiled_vae_specs(model: DeeDSR) -> list[GraphSpec]:
    """The VAE halves as tile graphs (one tile per call; runtime/vae_tiling.py)."""
    lat, down = model.config.vae["latent_channels"], model.config.latent_downscale
    h, w = "vae_tile_height", "vae_tile_width"
    specs = []
    for name, part, channels, in_scale, out_scale, names in (
            (VAE_ENCODER_TILED, "encoder", (3, lat), down, 1, ("image", "latent")),
            (VAE_DECODER_TILED, "decoder", (lat, 3), 1, down, ("latent", "image"))):
        module = TiledVaePart(model, part)
        stats = [1, module.norms, module.groups, 2]

        def side(dim, scale):
            return dim if scale == 1 else f"{dim}*{scale}"

        def example(b, th, tw, module=module, c=channels[0], s=in_scale):
            mask = torch.zeros(1, 1, th, tw)
            mask[..., 1:-1, 1:-1] = 1.0
            st = torch.stack([torch.randn(module.norms, module.groups) * 0.1,
                              torch.rand(module.norms, module.groups) + 0.5], dim=-1)[None]
            return torch.randn(1, c, th * s, tw * s), mask, st, torch.zeros(1)

        specs.append(GraphSpec(
            name, ROLES[name].stage, module,
            [(names[0], [1, channels[0], side(h, in_scale), side(w, in_scale)]), ("mask", [1, 1, h, w]),
             ("stats", stats), ("own", [1])],
            [(names[1], [1, channels[1], side(h, out_scale), side(w, out_scale)]), ("moments", stats)],
            example,
        ))
    return specs
