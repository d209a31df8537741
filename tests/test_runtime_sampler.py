"""The runtime's numpy sampler against the PyTorch reference, with the reference model itself
behind the runtime's Backend interface (no ONNX): this isolates the host maths (schedule, DDIM,
noise order, tiles, colour fix, bicubic, padding)."""
import dataclasses
import threading
from collections import Counter

import numpy as np
import pytest
import torch
from deedsr.runtime import imageops, profiles, sampler
from deedsr.runtime.backends import Backend
from deedsr.runtime.errors import Cancelled
from deedsr.runtime.manifest import Manifest
from deedsr.runtime.upscaler import Upscaler
from helpers import manifest_dict, write

from deedsr import color as ref_color
from deedsr import pipeline as ref_pipeline
from deedsr.config import SchedulerConfig
from deedsr.pipeline import DeeDSRPipeline
from deedsr.schedule import alphas_cumprod, make_scheduler

CONDITION_NAMES = [f"da{level}_{kind}{k}" for level in range(4) for k in (1, 2) for kind in ("kernel", "scale")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TorchGraphs(Backend):
    """The reference model's pieces behind the runtime's graph names; counts calls per graph."""

    name = "torch-graphs"

    def __init__(self, manifest, model):
        super().__init__(manifest, "fp32", use_denoiser=False)
        self.model = model
        self.calls = Counter()
        self.lock = threading.Lock()

    def run(self, graph, feeds, outputs=None):
        with self.lock:
            self.calls[graph] += 1
        f = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
        m = self.model
        with torch.no_grad():
            if graph == "degradation_learner":
                d = m.learner(f["lr"])
                out = dict(zip(CONDITION_NAMES, m.adapter.condition(d)), degradation=d)
            elif graph == "vae_encoder":
                out = {"latent": m.encode(f["image"])}
            elif graph == "vae_decoder":
                out = {"image": m.decode(f["latent"])}
            elif graph == "adapter":
                local, tokens = m.adapter(f["z_lr"], f["timestep"], [f[n] for n in CONDITION_NAMES])
                out = {**{f"local_{i}": x for i, x in enumerate(local)}, "tokens": tokens}
            elif graph == "unet":
                out = {"eps": m.unet(f["x_t"], f["timestep"], f["tokens"], [f[f"local_{i}"] for i in range(4)])}
            else:
                raise KeyError(graph)
        names = outputs or list(out)
        return {k: out[k].numpy() for k in names}

    def denoise(self, x_t, timestep, z_lr, conditions):
        local = self.run("adapter", {"z_lr": z_lr, "timestep": timestep, **conditions})
        return self.run("unet", {"x_t": x_t, "timestep": timestep, **local})["eps"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic-engines")
    data = manifest_dict(root, tile=16, conditions=CONDITION_NAMES)
    data["scheduler"]["alphas_cumprod"] = [float(a) for a in alphas_cumprod(SchedulerConfig())]
    return Manifest.load(write(root, data))


@pytest.fixture(scope="module")
def torch_runtime(manifest, tiny_model):
    return Upscaler(manifest, TorchGraphs(manifest, tiny_model))


@pytest.mark.parametrize("steps", [1, 7, 20, 50, 999])
def test_timesteps_equal_diffusers(steps):
    ours = sampler.Schedule(alphas_cumprod(SchedulerConfig())).timesteps(steps)
    assert ours == make_scheduler(SchedulerConfig(), steps).timesteps.tolist()


def test_step_counts_the_schedule_cannot_space_are_refused():
    schedule = sampler.Schedule(alphas_cumprod(SchedulerConfig()))
    for bad in (0, 1000, 1001, 5000):  # past 1000 the spacing would be 0: every step at t=1
        with pytest.raises(ValueError, match="steps must be in 1..999"):
            schedule.timesteps(bad)


@pytest.mark.parametrize("steps,eta,index", [(50, 1.0, 1), (20, 0.0, 5), (7, 0.4, 6), (4, 1.0, 3)])
def test_ddim_step_equals_diffusers(steps, eta, index):
    ref = make_scheduler(SchedulerConfig(), steps)
    ours = sampler.Schedule(ref.alphas_cumprod.numpy())
    rng = np.random.default_rng(index)
    x, eps, noise = (rng.standard_normal((1, 4, 8, 8)).astype(np.float32) for _ in range(3))
    t = int(ref.timesteps[index])
    expected = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x), eta=eta,
                        variance_noise=torch.from_numpy(noise)).prev_sample.numpy()
    got = ours.step(eps, t, x, steps, eta, noise)
    assert got.dtype == np.float32
    # torch's CPU sqrt (MKL) is not correctly rounded: its scalars may be 1 ulp off numpy's
    np.testing.assert_allclose(got, expected, rtol=0, atol=4e-6)


def test_reference_uses_the_runtime_host_maths():
    # one implementation of tiles, padding, bicubic and step errors for both: they cannot drift
    assert ref_pipeline.tiles is sampler.tiles and ref_pipeline.gaussian_weights is sampler.gaussian_weights
    assert ref_pipeline.get_profile is profiles.get_profile  # bicubic, padding, LR latent, uint8
    assert ref_pipeline.Cancelled is Cancelled


def test_color_fixes_equal_reference():
    rng = np.random.default_rng(0)
    image = rng.random((1, 3, 64, 48), dtype=np.float32)
    reference = rng.random((1, 3, 64, 48), dtype=np.float32)
    for method in ("none", "adain", "wavelet"):
        got = imageops.color_fix(image, reference, method)
        expected = ref_color.color_fix(torch.from_numpy(image), torch.from_numpy(reference), method).numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="unknown colour fix"):
        imageops.color_fix(image, reference, "sepia")


OPTION_SETS = [  # (the plain defaults are covered end to end in test_runtime_e2e.py)
    dict(steps=3, tile=16, tile_overlap=8, init="lr", color_fix="wavelet"),
    dict(steps=5, eta=0.3, tile=16, tile_overlap=4, color_fix="adain", noise_guidance_steps=(0, -1)),
    dict(steps=2, eta=0.0, tile=8, tile_overlap=0, noise_guidance_steps=()),
]


@pytest.mark.parametrize("options", OPTION_SETS)
def test_numpy_sampler_with_torch_graphs_matches_the_reference(torch_runtime, tiny_model, photo, options):
    expected = DeeDSRPipeline(tiny_model)(photo, seed=7, **options)
    got = torch_runtime.upscale(photo, seed=7, **options)
    diff = np.abs(got.astype(int) - expected.astype(int))
    print(f"{options}: max abs diff {diff.max()}, {np.count_nonzero(diff)} pixels differ")
    assert got.shape == expected.shape and diff.max() <= 1


def test_batch_of_images_equals_one_by_one(torch_runtime, photo):
    small = np.ascontiguousarray(photo[:24, :32])  # latent smaller than a tile: one tile of its own size
    batch = torch_runtime.upscale_batch([photo, small], seeds=[1, 2], steps=2)
    for image, seed, got in zip([photo, small], [1, 2], batch):
        alone = torch_runtime.upscale(image, seed=seed, steps=2)
        assert np.abs(alone.astype(int) - got.astype(int)).max() <= 1


def test_noise_guided_steps_run_no_graph(torch_runtime, photo):
    calls = torch_runtime.backend.calls
    calls.clear()
    torch_runtime.upscale(photo, steps=4, noise_guidance_steps=(0, 2), tile=16, tile_overlap=8)
    # 24x24 latent, tile 16 / overlap 8: 4 tiles, one call per model step (batch 4)
    assert calls == Counter(degradation_learner=1, vae_encoder=1, vae_decoder=1, adapter=2, unet=2)
    calls.clear()
    torch_runtime.upscale(photo, steps=3, noise_guidance_steps=(0, 1, 2))
    assert calls["unet"] == 0 and calls["adapter"] == 0


def test_all_steps_guided_with_eta0_keeps_the_lr_trajectory(manifest):
    # every step guided and eta = 0: x_0 = sqrt(abar_0) z_lr + sqrt(1 - abar_0) eps_T, no model at all
    schedule = sampler.Schedule(manifest.alphas_cumprod)
    z = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    job = sampler.Job(z_lr=z, conditions={}, rng=np.random.Generator(np.random.PCG64(0)))
    opts = sampler.SamplerOptions(steps=5, eta=0.0, noise_guidance_steps=tuple(range(5)), tile=16)
    out = sampler.sample(None, [job], schedule, opts)[0]
    noise = np.random.Generator(np.random.PCG64(0)).standard_normal((1, 4, 8, 8), dtype=np.float32)
    a_T, a_0 = float(schedule.abar[801]), float(schedule.abar[0])
    eps_T = (noise - np.sqrt(a_T) * z) / np.sqrt(1 - a_T)
    np.testing.assert_allclose(out, np.sqrt(a_0) * z + np.sqrt(1 - a_0) * eps_T, atol=1e-4)


def test_callback_cancels(torch_runtime, photo):
    seen = []
    with pytest.raises(Cancelled, match="after step 2 of 4"):
        torch_runtime.upscale(photo, steps=4, callback=lambda info: seen.append(info.index) or info.index < 1)
    assert seen == [0, 1]


def test_bad_options_are_refused(torch_runtime, photo):
    for options, message in [(dict(init="zeros"), "unknown init"), (dict(eta=1.5), "eta must be in"),
                             (dict(color_fix="sepia"), "unknown colour fix"), (dict(tile=12), "multiple of 8"),
                             (dict(tile=16, tile_overlap=16), "tile overlap"), (dict(steps=1000), "steps must be")]:
        with pytest.raises(ValueError, match=message):
            torch_runtime.upscale(photo, **options)
    with pytest.raises(ValueError, match="uint8"):
        torch_runtime.upscale(photo.astype(np.float32))
    with pytest.raises(ValueError, match="at least 8"):
        torch_runtime.upscale(photo[:4])


def test_default_guided_steps_keep_their_share_of_the_schedule(tmp_path, tiny_model):
    # a checkpoint whose default guides steps 0..44 of 50 (the model refines from t = 81 on):
    # another --steps keeps that share instead of naming steps the run does not have
    assert sampler.guided_for_steps(range(45), 50, 20) == tuple(range(18))
    assert sampler.guided_for_steps(range(47), 50, 10) == tuple(range(9))  # the model still runs at t = 1
    assert sampler.guided_for_steps(range(47), 50, 2) == (0,)
    assert sampler.guided_for_steps(range(47), 50, 100) == tuple(range(94))
    assert sampler.guided_for_steps((0,), 50, 3) == (0,) and sampler.guided_for_steps((), 50, 3) == ()
    assert sampler.guided_for_steps(range(50), 50, 10) == tuple(range(10))  # all guided stays all guided
    assert sampler.guided_for_steps((0, -1), 50, 10) == (0, -1)
    assert sampler.guided_for_steps((10, 30), 50, 20) == (4, 12)
    assert sampler.guided_for_steps((3, 7), 50, 50) == (3, 7)
    data = manifest_dict(tmp_path, tile=16, conditions=CONDITION_NAMES)
    data["scheduler"]["alphas_cumprod"] = [float(a) for a in alphas_cumprod(SchedulerConfig())]
    data["sampler"]["noise_guidance_steps"] = list(range(45))
    m = Manifest.load(write(tmp_path, data))
    runtime = Upscaler(m, TorchGraphs(m, tiny_model))
    assert runtime.options().noise_guidance_steps == tuple(range(45))
    opts = runtime.options(steps=20)
    assert opts.noise_guidance_steps == tuple(range(18)) and opts.model_steps() == 2
    assert runtime.options(steps=20, noise_guidance_steps=(0,)).noise_guidance_steps == (0,)
    timesteps = sampler.Schedule(m.alphas_cumprod).timesteps(20)
    assert timesteps[18] <= 81 < timesteps[17]  # the model still starts near t = 81
    # the reference pipeline resolves a checkpoint default the same way
    tiny_model.config.sampler = dataclasses.replace(tiny_model.config.sampler, noise_guidance_steps=tuple(range(45)))
    try:
        assert DeeDSRPipeline(tiny_model).sampler_config(steps=20).noise_guidance_steps == tuple(range(18))
    finally:
        tiny_model.config.sampler = dataclasses.replace(tiny_model.config.sampler, noise_guidance_steps=(0,))
