"""DDIM in numpy (float32 host maths), as the reference sampler (deedsr/pipeline.py) runs it.

- Schedule: the manifest's `alphas_cumprod` (float32, as diffusers holds it), "leading"
  spacing t_i = i * (T // steps) + steps_offset, abar_prev = alphas_cumprod[0] past the end.
- Random numbers: one `numpy.random.Generator(PCG64(seed))` per image; first x_T over the whole
  padded latent, then at every step with eta > 0 the step's variance noise, after epsilon.
- Noise guidance at chosen steps: eps = (x - sqrt(a) z_lr) / sqrt(1 - a), no graph runs.
- Aggregation: the latent is cut into tiles of side `tile` with stride `tile - overlap` (the
  last flush with the edge); every tile's eps is weighted with a Gaussian and the sum divided by
  the summed weights. Tiles of one size, from every image of a batch, go through the graphs
  together, up to the engines' largest batch per call.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from .errors import Cancelled, StepInfo
from .tiling import gaussian_weights, tiles

log = logging.getLogger(__name__)

INITS = ("noise", "lr")


# ------------------------------------------------------------------------- schedule
class Schedule:
    """DDIM coefficients from the training schedule's cumulative alphas."""

    def __init__(self, alphas_cumprod: np.ndarray, steps_offset: int = 1):
        self.abar = np.asarray(alphas_cumprod, dtype=np.float32)
        self.num_train = len(self.abar)
        self.steps_offset = steps_offset

    def timesteps(self, steps: int) -> list[int]:
        k = self.num_train // steps if steps >= 1 else 0
        top = (steps - 1) * k + self.steps_offset if steps >= 1 else -1
        if steps < 1 or k == 0 or top >= self.num_train:  # k == 0: more steps than training timesteps
            limit = max(s for s in range(1, self.num_train + 1)
                        if (s - 1) * (self.num_train // s) + self.steps_offset < self.num_train)
            raise ValueError(f"steps must be in 1..{limit}, got {steps}")
        return [i * k + self.steps_offset for i in range(steps - 1, -1, -1)]

    def alpha(self, t: int) -> np.float32:
        return self.abar[t]

    def alpha_prev(self, t: int, steps: int) -> np.float32:
        prev = t - self.num_train // steps
        return self.abar[prev] if prev >= 0 else self.abar[0]

    def step(self, eps: np.ndarray, t: int, x: np.ndarray, steps: int, eta: float,
             noise: np.ndarray | None) -> np.ndarray:
        """One DDIM update x_t -> x_{t-k}, operation for operation as diffusers' DDIMScheduler.step."""
        a, a_prev = self.alpha(t), self.alpha_prev(t, steps)
        beta = np.float32(1) - a
        x0 = (x - np.sqrt(beta) * eps) / np.sqrt(a)
        variance = ((np.float32(1) - a_prev) / beta) * (np.float32(1) - a / a_prev)
        std = np.float32(eta) * np.sqrt(variance)
        direction = np.sqrt(np.float32(1) - a_prev - std**2) * eps
        prev = np.sqrt(a_prev) * x0 + direction
        if eta > 0:
            prev = prev + std * noise
        return prev


# -------------------------------------------------------------------------- options
def guided_for_steps(indices, default_steps: int, steps: int) -> tuple[int, ...]:
    """Noise-guided step indices given for `default_steps` steps, moved to a run of `steps`. A
    leading run 0..K-1 keeps its share of the schedule (0..46 of 50 becomes 0..18 of 20; the
    paper's (0,) stays (0,)); other indices move to the same fraction; negative ones count from
    the end and stay. A default under which the model runs keeps at least one model step."""
    if steps == default_steps:
        return tuple(indices)
    ahead = sorted({i for i in indices if i >= 0})
    behind = sorted({i for i in indices if i < 0})
    if not ahead:
        moved = []
    elif ahead == list(range(len(ahead))):
        moved = list(range(max(round(len(ahead) * steps / default_steps), 1)))
    else:
        moved = sorted({i * steps // default_steps for i in ahead})
    if len(ahead) < default_steps and len(moved) >= steps:
        moved = moved[: steps - 1]
    return tuple(moved + behind)


@dataclass(frozen=True)
class SamplerOptions:
    steps: int = 50
    eta: float = 1.0
    noise_guidance_steps: tuple[int, ...] = (0,)
    init: str = "noise"
    tile: int = 64
    tile_overlap: int = 32
    tile_weight_variance: float = 0.01
    color_fix: str = "none"
    profile: str = "paper"  # host maths only (deedsr.runtime.profiles); the sampling loop is the same

    def guided(self) -> set[int]:
        return {i if i >= 0 else self.steps + i for i in self.noise_guidance_steps}

    def model_steps(self) -> int:
        """How many steps run the model (the rest are noise-guided)."""
        return sum(1 for i in range(self.steps) if i not in self.guided())


@dataclass
class Job:
    """One image's sampling state: its scaled LR latent, per-image conditions and generator."""

    z_lr: np.ndarray  # (1, C, h, w) float32
    conditions: dict[str, np.ndarray]  # name -> (1, ...) float32
    rng: np.random.Generator
    x: np.ndarray | None = None


class Denoise(Protocol):
    def __call__(self, x_t: np.ndarray, timestep: np.ndarray, z_lr: np.ndarray,
                 conditions: dict[str, np.ndarray]) -> np.ndarray: ...


def _noise(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


class TiledEps:
    """Per-image tile layout, weights and weight sums (fixed for a whole sampling run)."""

    def __init__(self, height: int, width: int, options: SamplerOptions):
        self.layout = tiles(height, width, options.tile, options.tile_overlap)
        self.single = len(self.layout) == 1
        if not self.single:
            th, tw = self.layout[0][2:]
            self.weight = gaussian_weights(th, tw, options.tile_weight_variance)
            total = np.zeros((1, 1, height, width), np.float32)
            for top, left, h, w in self.layout:
                total[:, :, top:top + h, left:left + w] += self.weight
            self.total = total

    def blend(self, shape, outputs: Sequence[np.ndarray]) -> np.ndarray:
        if self.single:
            return outputs[0]
        eps = np.zeros(shape, np.float32)
        for (top, left, h, w), out in zip(self.layout, outputs):
            eps[:, :, top:top + h, left:left + w] += out * self.weight
        return eps / self.total


def predict_eps(denoise: Denoise, jobs: Sequence[Job], layouts: Sequence[TiledEps], t: int,
                max_batch: int) -> list[np.ndarray]:
    """Epsilon of every image: all tiles of one size (across images) in calls of <= max_batch."""
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for j, layout in enumerate(layouts):
        for k, (_, _, th, tw) in enumerate(layout.layout):
            groups.setdefault((th, tw), []).append((j, k))
    results: list[list] = [[None] * len(layout.layout) for layout in layouts]
    for (th, tw), members in groups.items():
        for start in range(0, len(members), max_batch):
            chunk = members[start:start + max_batch]
            xs, zs = [], []
            for j, k in chunk:
                top, left = layouts[j].layout[k][:2]
                xs.append(jobs[j].x[:, :, top:top + th, left:left + tw])
                zs.append(jobs[j].z_lr[:, :, top:top + th, left:left + tw])
            names = jobs[chunk[0][0]].conditions.keys()
            if len({j for j, _ in chunk}) == 1:
                conds = {n: np.repeat(jobs[chunk[0][0]].conditions[n], len(chunk), axis=0) for n in names}
            else:
                conds = {n: np.concatenate([jobs[j].conditions[n] for j, _ in chunk]) for n in names}
            timestep = np.full((len(chunk),), float(t), dtype=np.float32)
            out = denoise(np.concatenate(xs), timestep, np.concatenate(zs), conds)
            for i, (j, k) in enumerate(chunk):
                results[j][k] = out[i:i + 1]
    return [layout.blend(job.x.shape, results[j]) for j, (job, layout) in enumerate(zip(jobs, layouts))]


def sample(denoise: Denoise, jobs: Sequence[Job], schedule: Schedule, options: SamplerOptions,
           max_batch: int = 1, callback: Callable[[StepInfo], bool | None] | None = None) -> list[np.ndarray]:
    """DDIM from x_T to x_0 for every job; returns the scaled latents x_0 (1, C, h, w)."""
    if options.init not in INITS:
        raise ValueError(f"unknown init '{options.init}'; choose one of {', '.join(INITS)}")
    if not 0.0 <= options.eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {options.eta}")
    timesteps = schedule.timesteps(options.steps)
    guided = options.guided()
    layouts = [TiledEps(job.z_lr.shape[2], job.z_lr.shape[3], options) for job in jobs]
    a0 = schedule.alpha(timesteps[0])
    for job in jobs:
        noise = _noise(job.rng, job.z_lr.shape)
        if options.init == "lr":
            job.x = np.sqrt(a0) * job.z_lr + np.sqrt(np.float32(1) - a0) * noise
        else:
            job.x = noise
    for i, t in enumerate(timesteps):
        a = schedule.alpha(t)
        if i in guided:
            eps = [(job.x - np.sqrt(a) * job.z_lr) / np.sqrt(np.float32(1) - a) for job in jobs]
        else:
            eps = predict_eps(denoise, jobs, layouts, t, max_batch)
        for job, e in zip(jobs, eps):
            variance_noise = _noise(job.rng, job.x.shape) if options.eta > 0 else None
            job.x = schedule.step(e, t, job.x, options.steps, options.eta, variance_noise)
        if callback is not None and callback(StepInfo(i, len(timesteps), t, i in guided)) is False:
            raise Cancelled(f"cancelled after step {i + 1} of {len(timesteps)}")
    return [job.x for job in jobs]
