"""Stage I: contrastive (MoCo) training of the degradation learner, paper §3.2 and §4.1.

Defaults are the paper's: 64x64 LR patches, batch 64, queue 16384, temperature 0.07, SGD
lr 0.03 (momentum 0.9, weight decay 1e-4 as MoCo) decayed x0.1 at epochs 120 and 240, 630
epochs; key encoder momentum 0.999 and the MLP projection head as the reference's MoCo v2.
The deliverable is <out_dir>/learner: a checkpoint folder with config.json and
learner.safetensors (the projection head is training-only and not part of it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ..models.learner import DegradationLearner
from . import dist as tdist
from .artifacts import resolve_model_config, save_components
from .config import ConfigError, Stage1Config
from .data import DegradedImages
from .moco import MoCo
from .trainer import Stage, autocast, derive_seed

__all__ = ["Stage1"]


class Stage1(Stage):
    name = "stage1"
    data_mode = "moco"

    def __init__(self, cfg: Stage1Config, info: tdist.DistInfo):
        super().__init__(cfg, info)
        self.model_config = resolve_model_config(cfg.model, "stage1.model")
        self.steps_per_epoch = 1

    @property
    def micro_batch(self) -> int:
        cfg, world = self.cfg, self.info.world
        if cfg.batch_size % world:
            raise ConfigError(f"stage1.batch_size {cfg.batch_size} is not divisible by {world} ranks")
        return cfg.batch_size // world

    def check(self) -> None:
        cfg = self.cfg
        if cfg.queue_size < cfg.batch_size:
            raise ConfigError(f"stage1.queue_size ({cfg.queue_size}) must be at least batch_size ({cfg.batch_size})")
        groups = self.bn_groups
        if self.micro_batch % groups or self.micro_batch // groups < 2:
            raise ConfigError(
                f"stage1.bn_groups ({groups}) must split the batch of {self.micro_batch} into groups of at least 2"
            )

    @property
    def bn_groups(self) -> int:
        return 1 if self.info.distributed else self.cfg.bn_groups

    def dataset(self, files) -> DegradedImages:
        return DegradedImages(files, self.cfg.data, self.cfg.seed, "moco", scale=self.model_config.upscale,
                              patch_size=self.cfg.patch_size)

    def total_steps(self, steps_per_epoch: int) -> int:
        self.steps_per_epoch = steps_per_epoch
        return self.cfg.max_steps or self.cfg.epochs * steps_per_epoch

    def lr_at(self, step: int) -> float:
        epoch = step // self.steps_per_epoch
        decays = sum(1 for m in self.cfg.lr_milestones if epoch >= m)
        return self.cfg.lr * self.cfg.lr_gamma**decays

    def build(self) -> None:
        cfg = self.cfg
        learner = DegradationLearner(self.model_config.learner)
        self.moco = MoCo(learner, queue_size=cfg.queue_size, temperature=cfg.temperature,
                         key_momentum=cfg.key_momentum, head_dim=cfg.head_dim, mlp=cfg.mlp_head).to(self.device)
        self.moco.train()
        self.encoder = self.moco.encoder_q
        if self.info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.encoder = DDP(self.moco.encoder_q, device_ids=ids)
        self.optimizer = torch.optim.SGD(self.moco.encoder_q.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.make_scaler()

    def train_step(self, step: int, micro_batches) -> dict[str, float]:
        (batch,) = micro_batches
        lr = self.set_lr(self.lr_at(step))
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.seed, 1, step))  # same on every rank
        with autocast(self.device, self.cfg.mixed_precision):
            q = self.encoder(batch["q"], self.bn_groups)
            self.moco.momentum_update()
            all_keys, k = self.moco.keys(batch["k"], generator, self.info, self.bn_groups)
            logits = self.moco.logits(q, k)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.moco.enqueue(all_keys)
        # Cosines of query and keys: a collapse shows here (neg_sim rising toward pos_sim)
        # where the loss alone could also mean harder negatives.
        sims = logits.detach() * self.moco.temperature
        neg = sims[:, 1:]
        return {"loss": float(loss.detach()), "acc1": float((sims.argmax(dim=1) == 0).float().mean()), "lr": lr,
                "pos_sim": float(sims[:, 0].mean()), "neg_sim": float(neg.mean()),
                "hardest_neg_sim": float(neg.max(dim=1).values.mean())}

    def before_save(self) -> None:
        # DDP gives every rank rank 0's BatchNorm statistics at the start of each forward;
        # doing it now too changes nothing in training and makes the saved ranks identical.
        if self.info.distributed:
            tdist.broadcast_buffers(self.moco)

    def replica_tensors(self) -> list[torch.Tensor]:
        return list(self.moco.encoder_q.parameters()) + list(self.moco.encoder_q.buffers()) + \
            list(self.moco.encoder_k.parameters()) + [self.moco.queue, self.moco.queue_ptr]

    def state_payload(self) -> dict[str, Any]:
        return {"moco": self.moco.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_payload(self, payload: dict[str, Any]) -> None:
        self.moco.load_state_dict(payload["moco"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scaler.load_state_dict(payload["scaler"])

    def finalize(self, out_dir: Path) -> Path:
        return save_components(self.model_config, {"learner": self.moco.encoder_q.learner}, out_dir / "learner")
