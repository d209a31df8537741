import numpy as np
import pytest
import torch
from deedsr.runtime.tiling import gaussian_weights, tiles
from diffusers import DDIMScheduler

from deedsr.config import SchedulerConfig
from deedsr.pipeline import DeeDSRPipeline, latent_shape
from deedsr.schedule import alphas_cumprod, make_scheduler


@pytest.mark.parametrize("steps", [50, 20])
def test_ddim_coefficients_equal_diffusers(steps):
    ref = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading", clip_sample=False,
    )
    ref.set_timesteps(steps)
    ours = make_scheduler(SchedulerConfig(), steps)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    if steps == 50:
        assert ours.timesteps.tolist() == list(range(981, 0, -20))
    # independent check of the schedule: scaled-linear betas from their definition
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(alphas_cumprod(SchedulerConfig()), np.cumprod(1 - betas), rtol=1e-6)
    # one eta=1 step against the closed form (DDIM Eq. 12 with sigma from Eq. 16)
    x, eps, z = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = int(ours.timesteps[1])
    a_t = float(np.cumprod(1 - betas)[t])
    a_prev = float(np.cumprod(1 - betas)[t - 1000 // steps])
    sigma = np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    expected = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps + sigma * z
    got = ours.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4)


class CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.calls = []

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def denoise(self, x_t, t, z_lr, conditions):
        self.calls.append(float(t[0]))
        return self.inner.denoise(x_t, t, z_lr, conditions)


def test_noise_guidance_reproduces_eq11_and_skips_the_model(tiny_model):
    pipe = DeeDSRPipeline(tiny_model)
    counting = CountingModel(tiny_model)
    pipe.model = counting
    z_lr = torch.randn(1, 4, 16, 16)
    conditions = tiny_model.adapter.condition(torch.randn(1, 64))
    cfg = pipe.sampler_config(steps=4, eta=0.0, noise_guidance_steps=(0, 2))
    rng = np.random.Generator(np.random.PCG64(3))
    x_T = torch.from_numpy(np.random.Generator(np.random.PCG64(3)).standard_normal((1, 4, 16, 16), dtype=np.float32))
    with torch.no_grad():
        out = pipe.sample(z_lr, conditions, cfg, rng)
    assert counting.calls == [501.0, 1.0]  # steps 1 and 3 of t = 751, 501, 251, 1
    # first step by hand: eps from Eq. 11, so the predicted x0 is z_lr exactly
    sched = make_scheduler(tiny_model.config.scheduler, 4)
    a = sched.alphas_cumprod[751]
    eps = (x_T - a.sqrt() * z_lr) / (1 - a).sqrt()
    x0 = (x_T - (1 - a).sqrt() * eps) / a.sqrt()
    torch.testing.assert_close(x0, z_lr, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(out).all()


def test_all_steps_guided_with_eta0_stays_on_the_lr_trajectory(tiny_model):
    # With every step guided and eta = 0, each step keeps the same epsilon direction, so
    # x_0 = sqrt(abar_0) z_lr + sqrt(1 - abar_0) eps_T: the model is never needed.
    pipe = DeeDSRPipeline(tiny_model)
    z_lr = torch.randn(1, 4, 8, 8)
    cfg = pipe.sampler_config(steps=5, eta=0.0, noise_guidance_steps=range(5))
    with torch.no_grad():
        out = pipe.sample(z_lr, [], cfg, np.random.Generator(np.random.PCG64(0)))
    noise = torch.from_numpy(np.random.Generator(np.random.PCG64(0)).standard_normal((1, 4, 8, 8), dtype=np.float32))
    abar = make_scheduler(tiny_model.config.scheduler, 5).alphas_cumprod
    eps_T = (noise - abar[801].sqrt() * z_lr) / (1 - abar[801]).sqrt()
    expected = abar[0].sqrt() * z_lr + (1 - abar[0]).sqrt() * eps_T
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_seed_determinism_and_tiling(tiny_model, photo):
    pipe = DeeDSRPipeline(tiny_model)
    a = pipe(photo, seed=7, steps=3, tile=16, tile_overlap=8)
    b = pipe(photo, seed=7, steps=3, tile=16, tile_overlap=8)
    c = pipe(photo, seed=8, steps=3, tile=16, tile_overlap=8)
    assert a.shape == (160, 192, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1
    assert latent_shape(tiny_model.config, 40, 48) == (24, 24)
    assert len(tiles(24, 24, 16, 8)) == 4


def test_lr_init_and_color_fixes_run(tiny_model, photo):
    pipe = DeeDSRPipeline(tiny_model)
    outs = [pipe(photo, seed=1, steps=2, init="lr", color_fix=fix) for fix in ("none", "adain", "wavelet")]
    assert all(o.shape == (160, 192, 3) for o in outs)
    assert not np.array_equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="unknown colour fix"):
        pipe(photo, steps=1, color_fix="sepia")
    with pytest.raises(ValueError, match="unknown init"):
        pipe(photo, steps=1, init="zeros")


def test_gaussian_weights_peak_at_centre():
    w = gaussian_weights(16, 8)
    assert w.shape == (16, 8) and w.min() > 0
    assert np.unravel_index(w.argmax(), w.shape) in {(7, 3), (7, 4), (8, 3), (8, 4)}


def test_callback_can_cancel(tiny_model, photo):
    from deedsr.runtime.errors import Cancelled

    seen = []
    pipe = DeeDSRPipeline(tiny_model)
    with pytest.raises(Cancelled):
        pipe(photo, steps=4, callback=lambda info: seen.append(info.index) or info.index < 1)
    assert seen == [0, 1]
