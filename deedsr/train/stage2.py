"""Stage II: the diffusion loss of Eq. 9 with the degradation learner frozen (paper §3.3, §4.1).

    L = E || eps - eps_theta(z_t, t, H_DA(z_lr, d_lr)) ||^2

z_0 is the scaled VAE latent of the HR crop, z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps
with t uniform in [0, 1000), z_lr the scaled VAE latent of the bicubic x4 LR made as the
sampler makes it under the config's profile (`paper`: Pillow bicubic, encoded from [-1, 1],
posterior mean; `reference-code`: torch's bicubic, encoded from [0, 1], a posterior sample),
d_lr = learner(LR). The profile is written into the checkpoint, so test samples as trained. Trainable, exactly: the adapter, the
modulation layers and the UNet's cross-attention (attn2) layers. The learner, the VAE and the
rest of the UNet are frozen SD 2.1-base (`train_backbone = true` also trains the UNet
backbone, for models such as the tiny preset that have no SD weights to start from).

Defaults are the paper's: 512x512, Adam lr 1e-5, global batch 128 (gradient accumulation
when micro_batch x ranks is smaller), 65,840 iterations. The deliverable is <out_dir>/model,
a full DeeDSR checkpoint folder (EMA weights when ema_decay > 0).
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
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..checkpoints import save_checkpoint
from ..models import DeeDSR
from ..runtime.profiles import get_profile
from ..schedule import alphas_cumprod
from . import dist as tdist
from .artifacts import load_component, resolve_model_config
from .config import ConfigError, Stage2Config
from .data import DegradedImages
from .trainer import Stage, autocast, derive_seed, scheduled_lr

log = logging.getLogger("deedsr.train")

__all__ = ["Stage2", "Denoiser", "set_trainable", "trainable_names"]


def trainable_names(model: DeeDSR, train_backbone: bool = False) -> list[str]:
    """Names (as in model.named_parameters()) of what stage II trains."""
    names = []
    for name, _ in model.named_parameters():
        if name.startswith("adapter."):
            names.append(name)
        elif name.startswith("unet.modulation."):
            names.append(name)
        elif name.startswith("unet.unet."):
            if train_backbone or ".attn2." in name:
                names.append(name)
    return names


def set_trainable(model: DeeDSR, train_backbone: bool = False) -> list[str]:
    """Freeze everything but the stage-II set; returns the trainable names."""
    names = set(trainable_names(model, train_backbone))
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    return [n for n, _ in model.named_parameters() if n in names]


class Denoiser(nn.Module):
    """What DDP wraps: adapter + modulated UNet, (x_t, t, z_lr, d) -> eps."""

    def __init__(self, adapter: nn.Module, unet: nn.Module):
        super().__init__()
        self.adapter = adapter
        self.unet = unet

    def forward(self, x_t, t, z_lr, d):
        local, tokens = self.adapter(z_lr, t, self.adapter.condition(d))
        return self.unet(x_t, t, tokens, local)


class Stage2(Stage):
    name = "stage2"
    data_mode = "pair"

    def __init__(self, cfg: Stage2Config, info: tdist.DistInfo):
        super().__init__(cfg, info)
        self.model_config = resolve_model_config(cfg.model, "stage2.model")
        if cfg.init:
            self.model_config = resolve_model_config(cfg.init, "stage2.init")
        elif cfg.vae:
            # A trained VAE brings its own settings (its measured scaling factor).
            vae_config = resolve_model_config(cfg.vae, "stage2.vae")
            self.model_config = dataclasses.replace(self.model_config, vae=dict(vae_config.vae))
        if cfg.profile:
            self.model_config = dataclasses.replace(
                self.model_config, sampler=dataclasses.replace(self.model_config.sampler, profile=cfg.profile))
        self.profile = get_profile(self.model_config.sampler.profile)

    def check(self) -> None:
        cfg = self.cfg
        for key in ("sd_base", "learner", "vae", "init"):
            value = getattr(cfg, key)
            if value and not Path(value).expanduser().exists():
                raise ConfigError(f"stage2.{key}: {value}: not found")
        if not cfg.init:
            if not cfg.learner:
                raise ConfigError("stage2.learner: required: the stage-I output folder (<stage1 out_dir>/learner)")
            if not (cfg.sd_base or cfg.vae):
                raise ConfigError(
                    "stage2: no VAE weights: set sd_base (a Stable Diffusion 2.1-base diffusers folder) or "
                    "vae (a checkpoint folder with vae.safetensors)"
                )
            if not cfg.sd_base and not cfg.train_backbone and self.model_config.preset == "sd21-base":
                raise ConfigError("stage2.sd_base: required for sd21-base (the frozen UNet comes from SD 2.1-base)")
            learner_config = resolve_model_config(cfg.learner, "stage2.learner")
            if learner_config.learner != self.model_config.learner:
                raise ConfigError(f"stage2.learner: {cfg.learner}: a learner of another shape than stage2.model's")
        for image in cfg.val_images:
            if not Path(image).expanduser().is_file():
                raise ConfigError(f"stage2.val_images: {image}: not found")
        multiple = self.model_config.latent_multiple * self.model_config.latent_downscale
        if cfg.data.gt_size % multiple:
            raise ConfigError(f"stage2.data.gt_size ({cfg.data.gt_size}) must be a multiple of {multiple} for this model")

    def dataset(self, files) -> DegradedImages:
        return DegradedImages(files, self.cfg.data, self.cfg.seed, "pair", scale=self.model_config.upscale,
                              profile=self.profile.name)

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.cfg.max_steps or 65840

    def build(self) -> None:
        cfg = self.cfg
        model = DeeDSR(self.model_config)
        if cfg.init:
            for name in model.COMPONENTS:
                load_component(cfg.init, name, getattr(model, name), "stage2.init")
        else:
            if cfg.sd_base:
                from ..importers import init_from_sd_base

                try:
                    report = init_from_sd_base(model, cfg.sd_base)
                except ValueError as e:
                    raise ConfigError(f"stage2.sd_base: {e}") from None
                log.info("%s", report.summary())
            if cfg.vae:
                load_component(cfg.vae, "vae", model.vae, "stage2.vae")
            load_component(cfg.learner, "learner", model.learner, "stage2.learner")
        self.model = model.to(self.device)
        self.names = set_trainable(model, cfg.train_backbone)
        self.params = dict(model.named_parameters())
        model.learner.eval()
        model.vae.eval()
        model.adapter.train()
        model.unet.train()
        model.adapter.gradient_checkpointing = cfg.gradient_checkpointing
        model.unet.gradient_checkpointing = cfg.gradient_checkpointing
        self.denoiser = Denoiser(model.adapter, model.unet)
        if self.info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.denoiser = DDP(self.denoiser, device_ids=ids)
        trainable = [self.params[n] for n in self.names]
        opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt(trainable, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
        self.ema = {n: self.params[n].detach().clone() for n in self.names} if cfg.ema_decay > 0 else None
        abar = alphas_cumprod(self.model_config.scheduler)
        self.abar = torch.from_numpy(abar).float().to(self.device)
        self.num_timesteps = min(len(abar), cfg.max_timestep) if cfg.max_timestep > 0 else len(abar)
        self.make_scaler()

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        return scheduled_lr(cfg.lr, step, self.total_steps(0), cfg.lr_schedule, cfg.warmup_steps)

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """Eq. 9 on one micro-batch; all randomness from `generator`."""
        model, cfg = self.model, self.cfg
        sf = model.scaling_factor
        with torch.no_grad(), autocast(self.device, cfg.mixed_precision):
            posterior = model.vae.encode(batch["hr"] * 2 - 1).latent_dist
            z0 = posterior.sample(generator=generator) if cfg.sample_posterior else posterior.mean
            z0 = z0.float() * sf
            z_lr = self.lr_latent(batch["lr_up"], generator)
            d = model.learner(batch["lr"]).float()
        b = z0.shape[0]
        t = torch.randint(0, self.num_timesteps, (b,), generator=generator, device=generator.device).to(self.device)
        noise = torch.randn(z0.shape, generator=generator, device=generator.device).to(self.device)
        a = self.abar[t].view(b, 1, 1, 1)
        target = noise
        if cfg.lr_anchor_fraction > 0:
            anchored = (torch.rand(b, generator=generator, device=generator.device) < cfg.lr_anchor_fraction)
            anchored = anchored.to(self.device).view(b, 1, 1, 1)
            # x_t where the noise-guided steps leave it; epsilon is what takes it to the HR latent
            target = torch.where(anchored, noise + (a / (1 - a)).sqrt() * (z_lr - z0), noise)
            x_t = a.sqrt() * torch.where(anchored, z_lr, z0) + (1 - a).sqrt() * noise
        else:
            x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with autocast(self.device, cfg.mixed_precision):
            eps = self.denoiser(x_t, t.float(), z_lr, d)
        if cfg.min_snr_gamma > 0:
            snr = a / (1 - a)
            weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr
            return (weight * (eps.float() - target) ** 2).mean()
        return F.mse_loss(eps.float(), target)

    def lr_latent(self, lr_up: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """z_lr of the bicubic x4 LR in [0, 1] as the sampler makes it under the training profile."""
        posterior = self.model.vae.encode(self.profile.encoder_input(lr_up)).latent_dist
        z = posterior.sample(generator=generator) if self.profile.samples_posterior else posterior.mean
        return z.float() * self.model.scaling_factor

    def generator(self, step: int, micro: int) -> torch.Generator:
        seed = derive_seed(self.cfg.seed, 2, step, self.info.rank, micro)
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        return torch.Generator(device=dev).manual_seed(seed)

    def train_step(self, step: int, micro_batches) -> dict[str, float]:
        lr = self.set_lr(self.lr_at(step))
        self.optimizer.zero_grad(set_to_none=True)
        n = len(micro_batches)
        total = 0.0
        for i, batch in enumerate(micro_batches):
            sync = self.info.distributed and i < n - 1
            ctx = self.denoiser.no_sync() if sync else contextlib.nullcontext()
            with ctx:
                loss = self.loss(batch, self.generator(step, i))
                self.scaler.scale(loss / n).backward()
            total += float(loss.detach())
        metrics = {"loss": total / n, "lr": lr}
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_([self.params[k] for k in self.names], self.cfg.grad_clip)
            metrics["grad_norm"] = float(norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            decay = self.cfg.ema_decay
            with torch.no_grad():
                for name, shadow in self.ema.items():
                    shadow.lerp_(self.params[name].detach(), 1.0 - decay)
        return metrics

    def replica_tensors(self) -> list[torch.Tensor]:
        return [self.params[n] for n in self.names]

    def state_payload(self) -> dict[str, Any]:
        return {
            "trainable": {n: self.params[n] for n in self.names},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema or {},
        }

    def load_payload(self, payload: dict[str, Any]) -> None:
        trainable = payload["trainable"]
        if set(trainable) != set(self.names):
            raise ConfigError("stage2: the checkpoint's trainable set differs from this config's")
        with torch.no_grad():
            for name, value in trainable.items():
                self.params[name].copy_(value)
            if self.ema is not None:
                for name, value in payload["ema"].items():
                    self.ema[name].copy_(value)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scaler.load_state_dict(payload["scaler"])

    @contextlib.contextmanager
    def ema_weights(self):
        """Temporarily swap the EMA weights in (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        backup = {n: self.params[n].detach().clone() for n in self.names}
        with torch.no_grad():
            for n in self.names:
                self.params[n].copy_(self.ema[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n in self.names:
                    self.params[n].copy_(backup[n])

    def validate(self, step: int, out_dir: Path) -> None:
        from PIL import Image

        from ..degradations import degrade_level
        from ..metrics import psnr
        from ..pipeline import DeeDSRPipeline
        from ..runtime.imageops import bicubic_upscale
        from .data import load_rgb

        cfg = self.cfg
        folder = out_dir / "samples" / f"step-{step:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        modes = {m: m.training for m in self.model.modules()}
        scores = []
        try:
            with self.ema_weights():
                pipe = DeeDSRPipeline(self.model, self.device)
                for image in cfg.val_images:
                    hr = _center_crop(load_rgb(image), cfg.val_size, self.model_config.upscale)
                    lr = degrade_level(hr, cfg.val_level, np.random.default_rng(0))
                    lr8 = np.round(lr * 255).astype(np.uint8)
                    sr = pipe(lr8, seed=0, steps=cfg.val_steps)
                    bic = np.round(np.clip(bicubic_upscale(lr, self.model_config.upscale), 0, 1) * 255).astype(np.uint8)
                    scores.append(psnr(sr, hr))
                    Image.fromarray(np.concatenate([bic, sr, hr], axis=1)).save(folder / f"{Path(image).stem}.png")
        finally:
            for m, training in modes.items():
                m.train(training)
        if scores:
            log.info("stage2 step %d: validation PSNR(Y) %.2f dB (bicubic | model | HR in %s)",
                     step, float(np.mean(scores)), folder)

    def finalize(self, out_dir: Path) -> Path:
        with self.ema_weights():
            self.model.trained = True
            return save_checkpoint(self.model, out_dir / "model")


def _center_crop(img: np.ndarray, side: int, multiple: int) -> np.ndarray:
    h, w = img.shape[:2]
    ch = min(h, side) // multiple * multiple
    cw = min(w, side) // multiple * multiple
    top, left = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(img[top : top + ch, left : left + cw])
