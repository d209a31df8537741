"""The DDIM schedule of DeeDSR, as diffusers' DDIMScheduler defines it."""
from __future__ import annotations

import numpy as np
from diffusers import DDIMScheduler

from .config import SchedulerConfig
from .runtime.sampler import Schedule


def make_scheduler(config: SchedulerConfig, steps: int) -> DDIMScheduler:
    """scaled-linear betas, epsilon prediction, t = 981, 961, ..., 1 for 50 steps."""
    scheduler = DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule=config.beta_schedule,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    # the runtime's rule for which step counts the schedule can space (t must stay < T)
    Schedule(scheduler.alphas_cumprod.numpy(), steps_offset=1).timesteps(steps)
    scheduler.set_timesteps(steps)
    return scheduler


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """The training schedule's cumulative alphas (float64), what a runtime needs to rebuild DDIM."""
    return make_scheduler(config, 1).alphas_cumprod.double().numpy()
