"""The reference model behind the same small interface as the runtime's Upscaler, so
`deedsr upscale --backend torch` drives it like any other backend."""
from __future__ import annotations

import numpy as np
import torch

from .checkpoints import load_checkpoint
from .config import preset as preset_config
from .models import DeeDSR
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
    def default_steps(self) -> int:
        return self.config.sampler.steps

    def upscale(self, image: np.ndarray, *, seed: int = 0, callback=None, **options) -> np.ndarray:
        return self.pipeline(image, seed=seed, callback=callback, **options)
