"""The whole DeeDSR model: learner, adapter, modulated UNet and VAE under one config."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn

from ..checkpoints import (
    check_state,
    component_file,
    is_trained,
    load_state,
    read_config,
    save_checkpoint,
)
from ..config import DeeDSRConfig
from .adapter import DegradationAwareAdapter
from .attention import use_scaled_attention
from .learner import DegradationLearner
from .unet import ModulatedUNet

COMPONENTS = ("learner", "adapter", "unet", "vae")


class DeeDSR(nn.Module):
    COMPONENTS = COMPONENTS

    def __init__(self, config: DeeDSRConfig):
        super().__init__()
        self.config = config
        self.learner = DegradationLearner(config.learner)
        self.adapter = DegradationAwareAdapter(config.adapter)
        self.unet = ModulatedUNet(config.unet, config.adapter.local_channels, config.modulation_hidden)
        self.vae = AutoencoderKL(**config.vae)
        use_scaled_attention(self.vae)
        # False until weights come from training, a checkpoint or an import: checkpoints and
        # engine directories made from such a model are marked untrained (their output is noise).
        self.trained = False

    @property
    def scaling_factor(self) -> float:
        return float(self.config.vae["scaling_factor"])

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> scaled latent mean (deterministic)."""
        return self.vae.encode(image).latent_dist.mean * self.scaling_factor

    def encode_posterior(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image -> the scaled posterior's mean and standard deviation (logvar clamped to
        [-30, 20], as diffusers and ldm): a sample is `mean + std * noise`."""
        posterior = self.vae.encode(image).latent_dist
        return posterior.mean * self.scaling_factor, posterior.std * self.scaling_factor

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image in [-1, 1] (not clamped)."""
        return self.vae.decode(latent / self.scaling_factor).sample

    def denoise(self, x_t, t, z_lr, conditions) -> torch.Tensor:
        """One epsilon prediction: adapter then modulated UNet."""
        local, tokens = self.adapter(z_lr, t, conditions)
        return self.unet(x_t, t, tokens, local)

    @classmethod
    def from_pretrained(cls, path, components: tuple[str, ...] = COMPONENTS) -> "DeeDSR":
        """Build the model from a checkpoint's config.json and load the named components' weights."""
        model = cls(read_config(path))
        for name in components:
            file = component_file(path, name)
            state = load_state(file)
            module = getattr(model, name)
            check_state(module, state, str(file))
            module.load_state_dict(state)
        model.trained = is_trained(path)
        return model.eval()

    def save_pretrained(self, path, dtype: torch.dtype | None = None):
        return save_checkpoint(self, path, dtype)


def load_checkpoint(path, components: tuple[str, ...] = COMPONENTS) -> DeeDSR:
    return DeeDSR.from_pretrained(path, components)
