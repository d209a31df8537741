"""MoCo for the degradation learner (paper §3.2; He et al. 2020, Chen et al. 2020).

Query and positive key are two patches of one degraded LR image; negatives are the keys of
other images held in a queue. The key encoder is a momentum copy of the query encoder. Both
encoders are the learner followed by a projection head (MoCo v2's MLP) that is used only for
training: stage II and inference use the learner's pooled vector d.

BatchNorm and the "cheating" problem: with the keys and queries of the same images
normalised with the same batch statistics, the network can find the positive through the
statistics instead of the content. Remedy (MoCo's shuffling BN):
* under DDP (world > 1) keys are computed on a batch shuffled across ranks: every rank
  gathers all key images, takes its slice of a permutation that all ranks draw from the
  same seeded generator, encodes it, and the keys are gathered back and un-shuffled;
* on one process the batch is cut into `bn_groups` sub-batches, each normalised on its own:
  queries in their order, keys in a shuffled order (the same remedy, emulated).
Gathered keys of all ranks are enqueued (in rank order), so every rank's queue is the same.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from . import dist as tdist

__all__ = ["ContrastiveEncoder", "MoCo", "ProjectionHead"]


class ProjectionHead(nn.Module):
    def __init__(self, dim: int, out_dim: int, mlp: bool = True):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, out_dim)) if mlp else nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ContrastiveEncoder(nn.Module):
    """learner + head -> L2-normalised embedding. With groups > 1 the batch is encoded in that
    many contiguous sub-batches (separate BatchNorm statistics)."""

    def __init__(self, learner: nn.Module, head: nn.Module):
        super().__init__()
        self.learner = learner
        self.head = head

    def forward(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        if groups > 1:
            feats = torch.cat([self.learner(c) for c in x.chunk(groups)])
        else:
            feats = self.learner(x)
        return F.normalize(self.head(feats).float(), dim=1)


class MoCo(nn.Module):
    def __init__(self, learner: nn.Module, *, queue_size: int, temperature: float, key_momentum: float,
                 head_dim: int = 0, mlp: bool = True):
        super().__init__()
        width = learner.config.out_dim
        dim = head_dim or width
        self.encoder_q = ContrastiveEncoder(learner, ProjectionHead(width, dim, mlp))
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.queue_size = queue_size
        self.temperature = temperature
        self.key_momentum = key_momentum
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        m = self.key_momentum
        for q, k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            k.mul_(m).add_(q.detach(), alpha=1.0 - m)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write `keys` (N x dim) at the pointer, wrapping around the end of the queue."""
        n = keys.shape[0]
        if n > self.queue_size:
            raise ValueError(f"{n} keys do not fit a queue of {self.queue_size}")
        ptr = int(self.queue_ptr)
        index = (ptr + torch.arange(n, device=self.queue.device)) % self.queue_size
        self.queue[:, index] = keys.to(self.queue.dtype).T
        self.queue_ptr.fill_((ptr + n) % self.queue_size)

    @torch.no_grad()
    def keys(self, im_k: torch.Tensor, generator: torch.Generator, info: tdist.DistInfo,
             groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys of all ranks in rank order, this rank's keys), computed with shuffled BN.
        `generator` (CPU) must be seeded the same on every rank."""
        if info.distributed:
            images = tdist.all_gather_cat(im_k)
            total, local = images.shape[0], im_k.shape[0]
            perm = torch.randperm(total, generator=generator).to(images.device)
            mine = perm.view(info.world, -1)[info.rank]
            encoded = tdist.all_gather_cat(self.encoder_k(images[mine]))
            keys = torch.empty_like(encoded)
            keys[perm] = encoded
            return keys, keys[info.rank * local : (info.rank + 1) * local]
        perm = torch.randperm(im_k.shape[0], generator=generator).to(im_k.device)
        encoded = self.encoder_k(im_k[perm], groups=groups)
        keys = torch.empty_like(encoded)
        keys[perm] = encoded
        return keys, keys

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(N, 1 + queue) logits / temperature; the positive is column 0."""
        q, k = q.float(), k.float()
        l_pos = (q * k).sum(dim=1, keepdim=True)
        l_neg = q @ self.queue.clone().detach()
        return torch.cat([l_pos, l_neg], dim=1) / self.temperature
