"""The reference model behind the same small interface as the runtime's Upscaler, so
`deedsr upscale --backend torch` drives it like any other backend."""
from __future__ import annotations

import numpy as np
import torch

from .config import preset as preset_config
from .models import DeeDSR, load_checkpoint
from .pipeline import DeeDSRPipeline

RANDOM_INIT_SEED = 0


class TorchUpscaler:
    backend = "torch"

    def __init__(self, pipeline: DeeDSRPipeline):
        self.pipeline = pipeline
        self.config = pipeline.config

    @classmethod
    def from_checkpoint(cls, path, device: str = "cpu") -> "TorchUpscaler":
        return cls(DeeDSRPipeline(load_checkpoint(path), device))

    @classmethod
    def from_preset(cls, name: str, device: str = "cpu") -> "TorchUpscaler":
        """Untrained weights, seeded so that they are the same on every run."""
        with torch.random.fork_rng():
            torch.manual_seed(RANDOM_INIT_SEED)
            model = DeeDSR(preset_config(name))
        return cls(DeeDSRPipeline(model, device))

    @property
    def trained(self) -> bool:
        return self.pipeline.model.trained

    @property
    def default_steps(self) -> int:
        return self.config.sampler.steps

    def preload(self) -> None:
        """The model is in memory from the start."""

    def options(self, **overrides):
        """The sampler settings for these overrides; ValueError for a bad one (before any image)."""
        return self.pipeline.sampler_config(**overrides)

    def check(self, height: int, width: int, tile: int | None = None, profile: str | None = None) -> None:
        """The reference takes any size of at least 8 px a side; memory is the user's to judge."""
        if min(height, width) < 8:
            raise ValueError(f"image is {width}x{height}; each side must be at least 8 pixels")

    def upscale(self, image: np.ndarray, *, seed: int = 0, callback=None, **options) -> np.ndarray:
        return self.pipeline(image, seed=seed, callback=callback, **options)
