"""Reference sampler: LR image -> x4 SR image with the PyTorch model.

Random numbers come only from `numpy.random.Generator(numpy.random.PCG64(seed))`, one
generator per image, drawn in this order (every draw `standard_normal(shape, float32)`
with shape (1, 4, h, w), the whole padded latent):
  0. under the `reference-code` profile only, the VAE posterior's noise: z_lr = mean + std * noise
     (the public code encodes, then samples; under `paper` z_lr is the mean and nothing is drawn);
  1. the initial noise x_T (also used by the LR initialisation);
  2. at every DDIM step, when eta > 0, the step's variance noise, after the step's epsilon.
The profile's host maths (bicubic, padding, encoder input range, posterior draw, uint8
quantisation) are the runtime's own (deedsr.runtime.profiles).
Tiles never draw: noise is drawn for the whole latent, so the tile size does not change
the result's randomness. The numpy runtime draws in the same order.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from .color import color_fix
from .config import SamplerConfig
from .models import DeeDSR
from .runtime.errors import Cancelled, StepInfo
from .runtime.imageops import check_image
from .runtime.profiles import get_profile
from .runtime.sampler import INITS, guided_for_steps
from .runtime.tiling import gaussian_weights, tiles
from .schedule import make_scheduler
from .vae_tiling import TiledVae

__all__ = ["Cancelled", "DeeDSRPipeline", "StepInfo", "latent_shape"]


class DeeDSRPipeline:
    """`pipe(lr_uint8_hwc, seed=0) -> sr_uint8_hwc` with the reference PyTorch model."""

    def __init__(self, model: DeeDSR, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.config = model.config
        self.vae = TiledVae(self.model)  # the runtime's tile layout and statistics passes

    def sampler_config(self, **overrides) -> SamplerConfig:
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "noise_guidance_steps" in overrides:
            overrides["noise_guidance_steps"] = tuple(overrides["noise_guidance_steps"])
        elif "steps" in overrides:  # the checkpoint's guided steps, at the same share of this step count
            default = self.config.sampler
            overrides["noise_guidance_steps"] = guided_for_steps(default.noise_guidance_steps, default.steps,
                                                                 int(overrides["steps"]))
        cfg = replace(self.config.sampler, **overrides)
        if cfg.init not in INITS:
            raise ValueError(f"unknown init '{cfg.init}'; choose one of {', '.join(INITS)}")
        if not 0.0 <= cfg.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {cfg.eta}")
        get_profile(cfg.profile)  # ValueError for an unknown one
        if cfg.tile % self.config.latent_multiple:
            raise ValueError(f"tile must be a multiple of {self.config.latent_multiple}, got {cfg.tile}")
        return cfg

    @torch.no_grad()
    def __call__(
        self,
        image: np.ndarray,
        *,
        seed: int = 0,
        callback: Callable[[StepInfo], bool | None] | None = None,
        **overrides,
    ) -> np.ndarray:
        check_image(image)
        cfg = self.sampler_config(**overrides)
        model, scale = self.model, self.config.upscale
        rng = np.random.Generator(np.random.PCG64(seed))
        h, w = image.shape[:2]

        lr = image.astype(np.float32) / 255.0
        profile = get_profile(cfg.profile)
        pixel_multiple = self.config.latent_multiple * self.config.latent_downscale // scale
        up = self._to_tensor(profile.upscale(lr, scale, pixel_multiple))
        z_lr = self.encode_lr(up, profile, rng)
        d = model.learner(self._to_tensor(lr))
        conditions = model.adapter.condition(d)

        latent = self.sample(z_lr, conditions, cfg, rng, callback)
        sr = (self.vae.decode(latent).clamp(-1, 1) + 1) / 2
        sr = color_fix(sr, up, cfg.color_fix).clamp(0, 1)
        sr = sr[0].permute(1, 2, 0).cpu().numpy()[: h * scale, : w * scale]
        return profile.to_uint8(sr)

    def encode_lr(self, up: torch.Tensor, profile, rng: np.random.Generator) -> torch.Tensor:
        """The x4 image in [0, 1] -> z_lr, as the profile makes it: the posterior mean through the
        tiled VAE (as the runtime), or a posterior sample from the untiled encoder (the tiled
        graphs have no standard-deviation output yet)."""
        if not profile.samples_posterior:
            return self.vae.encode(profile.encoder_input(up))
        mean, std = self.model.encode_posterior(profile.encoder_input(up))
        encoded = {"latent": mean.cpu().numpy(), "latent_std": std.cpu().numpy()}
        return torch.from_numpy(profile.lr_latent(encoded, rng)).to(self.device)

    def _to_tensor(self, hwc: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))[None].to(self.device)

    def _noise(self, rng: np.random.Generator, shape) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(self.device)

    def sample(self, z_lr, conditions, cfg: SamplerConfig, rng, callback=None) -> torch.Tensor:
        """DDIM from x_T to x_0 on the whole latent; returns the scaled latent x_0."""
        scheduler = make_scheduler(self.config.scheduler, cfg.steps)
        abar = scheduler.alphas_cumprod.to(self.device)
        timesteps = [int(t) for t in scheduler.timesteps]
        guided = {i if i >= 0 else len(timesteps) + i for i in cfg.noise_guidance_steps}

        noise = self._noise(rng, z_lr.shape)
        if cfg.init == "lr":
            a = abar[timesteps[0]]
            x = a.sqrt() * z_lr + (1 - a).sqrt() * noise
        else:
            x = noise
        for i, t in enumerate(timesteps):
            a = abar[t]
            if i in guided:
                eps = (x - a.sqrt() * z_lr) / (1 - a).sqrt()
            else:
                eps = self.predict_noise(x, t, z_lr, conditions, cfg)
            variance_noise = self._noise(rng, x.shape) if cfg.eta > 0 else None
            x = scheduler.step(eps, t, x, eta=cfg.eta, variance_noise=variance_noise).prev_sample
            if callback is not None and callback(StepInfo(i, len(timesteps), t, i in guided)) is False:
                raise Cancelled(f"cancelled after step {i + 1} of {len(timesteps)}")
        return x

    def predict_noise(self, x, t: int, z_lr, conditions, cfg: SamplerConfig) -> torch.Tensor:
        """Epsilon over the whole latent: one model call per tile, Gaussian-blended."""
        _, _, height, width = x.shape
        layout = tiles(height, width, cfg.tile, cfg.tile_overlap)
        if len(layout) == 1:
            return self.model.denoise(x, self._timestep(t, x.shape[0]), z_lr, conditions)
        eps = torch.zeros_like(x)
        total = torch.zeros_like(x[:, :1])
        for top, left, th, tw in layout:
            window = (slice(None), slice(None), slice(top, top + th), slice(left, left + tw))
            out = self.model.denoise(x[window], self._timestep(t, x.shape[0]), z_lr[window], conditions)
            weight = torch.from_numpy(gaussian_weights(th, tw)).to(x)
            eps[window] += out * weight
            total[window] += weight
        return eps / total

    def _timestep(self, t: int, batch: int) -> torch.Tensor:
        return torch.full((batch,), float(t), device=self.device)


def latent_shape(config, height: int, width: int, profile: str | None = None) -> tuple[int, int]:
    """Latent (h, w) the sampler uses for an LR image of height x width (default: the
    config's profile)."""
    scale, down = config.upscale, config.latent_downscale
    multiple = config.latent_multiple * down // scale
    ph, pw = get_profile(profile or config.sampler.profile).padded_lr_size(height, width, multiple)
    return ph * scale // down, pw * scale // down
