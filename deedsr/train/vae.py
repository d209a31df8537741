"""Autoencoder training for models that have no SD 2.1-base VAE to start from (the tiny preset).

The part of the recipe the paper takes from Stable Diffusion, reduced to what a CPU can do:
reconstruction (L1 and/or L2; no LPIPS, no discriminator) plus a small KL term,
    loss = l1 * mean|x - x'| + l2 * mean (x - x')^2 + kl_weight * KL / (3 H W),
KL summed over the latent per image, so kl_weight means what it does in SD's autoencoder
(1e-6, relative to a reconstruction summed over pixels). After training the latent scaling
factor is set to 1 / std of the latents of training crops (SD's recipe), so that the
diffusion model sees latents of unit variance. The deliverable is <out_dir>/vae: a
checkpoint folder with config.json (vae.scaling_factor measured) and vae.safetensors.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..models.attention import use_scaled_attention
from . import dist as tdist
from .artifacts import resolve_model_config, save_components
from .config import VaeConfig
from .data import DegradedImages
from .trainer import Stage, autocast, derive_seed, scheduled_lr

log = logging.getLogger("deedsr.train")

__all__ = ["VaeStage"]


class _Reconstruct(nn.Module):
    """What DDP wraps: image -> (reconstruction, KL per image)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, noise: torch.Tensor):
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * noise
        return self.vae.decode(z).sample, posterior.kl()


class VaeStage(Stage):
    name = "vae"
    data_mode = "hr"

    def __init__(self, cfg: VaeConfig, info: tdist.DistInfo):
        super().__init__(cfg, info)
        self.model_config = resolve_model_config(cfg.model, "vae.model")
        self.latent_channels = int(self.model_config.vae["latent_channels"])
        self.downscale = self.model_config.latent_downscale

    def dataset(self, files) -> DegradedImages:
        return DegradedImages(files, self.cfg.data, self.cfg.seed, "hr", scale=self.model_config.upscale,
                              degraded_fraction=self.cfg.degraded_fraction)

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.cfg.max_steps or 10000

    def build(self) -> None:
        cfg = self.cfg
        self.vae = AutoencoderKL(**self.model_config.vae).to(self.device)
        use_scaled_attention(self.vae)
        self.vae.train()
        self.module = _Reconstruct(self.vae)
        if self.info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = DDP(self.module, device_ids=ids)
        self.optimizer = torch.optim.Adam(self.vae.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas))
        self.make_scaler()

    def generator(self, step: int, micro: int) -> torch.Generator:
        seed = derive_seed(self.cfg.seed, 3, step, self.info.rank, micro)
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        return torch.Generator(device=dev).manual_seed(seed)

    def loss(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        b, _, h, w = x.shape
        shape = (b, self.latent_channels, h // self.downscale, w // self.downscale)
        noise = torch.randn(shape, generator=generator, device=generator.device).to(self.device)
        with autocast(self.device, cfg.mixed_precision):
            rec, kl = self.module(x, noise)
        rec = rec.float()
        l1 = (rec - x).abs().mean()
        l2 = F.mse_loss(rec, x)
        kl = kl.float().mean() / (3 * h * w)
        loss = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.kl_weight * kl
        return loss, {"l1": float(l1.detach()), "kl": float(kl.detach())}

    def train_step(self, step: int, micro_batches) -> dict[str, float]:
        lr = self.set_lr(scheduled_lr(self.cfg.lr, step, self.total_steps(0), self.cfg.lr_schedule))
        self.optimizer.zero_grad(set_to_none=True)
        n = len(micro_batches)
        totals: dict[str, float] = {}
        loss_sum = 0.0
        for i, batch in enumerate(micro_batches):
            sync = self.info.distributed and i < n - 1
            ctx = self.module.no_sync() if sync else contextlib.nullcontext()
            with ctx:
                loss, parts = self.loss(batch["hr"] * 2 - 1, self.generator(step, i))
                self.scaler.scale(loss / n).backward()
            loss_sum += float(loss.detach())
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v / n
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {"loss": loss_sum / n, **totals, "lr": lr}

    def replica_tensors(self) -> list[torch.Tensor]:
        return list(self.vae.parameters())

    def state_payload(self) -> dict[str, Any]:
        return {"vae": self.vae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_payload(self, payload: dict[str, Any]) -> None:
        self.vae.load_state_dict(payload["vae"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scaler.load_state_dict(payload["scaler"])

    @torch.no_grad()
    def measure_scaling_factor(self, dataset: DegradedImages) -> float:
        """1 / std of posterior samples of `scaling_samples` training crops (fixed keys)."""
        self.vae.eval()
        latents = []
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, 4))
        for i in range(self.cfg.scaling_samples):
            x = torch.from_numpy(dataset[(10**6, i % len(dataset))]["hr"])[None].to(self.device) * 2 - 1
            posterior = self.vae.encode(x).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=g).to(self.device)
            latents.append((posterior.mean + posterior.std * noise).flatten().cpu())
        self.vae.train()
        std = float(torch.cat(latents).double().std())
        return 1.0 / std

    def finalize(self, out_dir: Path) -> Path:
        cfg = self.cfg
        if cfg.scaling_factor > 0:
            factor = cfg.scaling_factor
        else:
            from .data import list_images

            factor = self.measure_scaling_factor(self.dataset(list_images(cfg.data, cfg.data.gt_size)))
            log.info("vae: latent std %.4f -> scaling_factor %.5f", 1 / factor, factor)
        config = dataclasses.replace(self.model_config, vae={**self.model_config.vae, "scaling_factor": round(factor, 6)})
        self.vae.eval()
        return save_components(config, {"vae": self.vae}, out_dir / "vae")


def reconstruction_psnr(vae: AutoencoderKL, images: list[np.ndarray]) -> float:
    """Mean PSNR (RGB) of encode-decode on uint8 images, a quick check of a trained VAE."""
    from ..metrics import psnr

    scores = []
    with torch.no_grad():
        for img in images:
            x = torch.from_numpy(img.astype(np.float32).transpose(2, 0, 1) / 255.0)[None] * 2 - 1
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
            out = ((rec[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
            scores.append(psnr(out, img.astype(np.float32) / 255.0, y_channel=False))
    return float(np.mean(scores))
