"""Training: configs, data, stage I / II / VAE steps, resume, trainable sets, bad input.

Everything runs the tiny preset on tiny crops of scikit-image photos, in one CPU thread
(OpenMP threads fighting over busy cores make tiny ops 100x slower)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from skimage import data

from deedsr.train import dist as tdist
from deedsr.train.config import (
    ConfigError,
    Stage1Config,
    Stage2Config,
    VaeConfig,
    config_from_dict,
    load_stage_config,
)
from deedsr.train.data import DataError, DegradedImages, StepBatchSampler, list_images


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    """Four 96x96 crops of real photos."""
    folder = tmp_path_factory.mktemp("photos")
    for name in ("coffee", "rocket", "astronaut", "chelsea"):
        img = getattr(data, name)()
        h, w = img.shape[:2]
        Image.fromarray(img[h // 2 - 48 : h // 2 + 48, w // 2 - 48 : w // 2 + 48]).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory) -> Path:
    """128x128 centre crops of the 14 colour and gray photos of scikit-image (distinct images)."""
    from deedsr.train.demo import default_train_photos
    from deedsr.train.evaluate import skimage_photo

    folder = tmp_path_factory.mktemp("many")
    for name in default_train_photos() + ["astronaut", "chelsea"]:
        img = skimage_photo(name)
        h, w = img.shape[:2]
        Image.fromarray(img[h // 2 - 64 : h // 2 + 64, w // 2 - 64 : w // 2 + 64]).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def components(tmp_path_factory) -> dict[str, Path]:
    """A learner and a VAE checkpoint folder of the tiny preset (random weights)."""
    from deedsr.config import preset
    from deedsr.models import DeeDSR
    from deedsr.train.artifacts import save_components

    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(0)
    model = DeeDSR(preset("tiny"))
    return {
        "learner": save_components(model.config, {"learner": model.learner}, root / "learner"),
        "vae": save_components(model.config, {"vae": model.vae}, root / "vae"),
    }


def stage1_cfg(photo_dir, out, **kw) -> Stage1Config:
    d = dict(model="tiny", out_dir=str(out), batch_size=8, queue_size=24, patch_size=8, max_steps=4,
             save_every=2, log_every=1, progress=False,
             data=dict(folders=[str(photo_dir)], gt_size=64, repeat=4, num_workers=0, cache_images=True))
    d.update(kw)
    return config_from_dict(Stage1Config, d, "test")


def stage2_cfg(photo_dir, out, components, **kw) -> Stage2Config:
    d = dict(model="tiny", out_dir=str(out), vae=str(components["vae"]), learner=str(components["learner"]),
             batch_size=4, micro_batch=2, lr=1e-4, max_steps=4, save_every=2, log_every=1, progress=False,
             data=dict(folders=[str(photo_dir)], gt_size=64, repeat=2, num_workers=0, cache_images=True))
    d.update(kw)
    return config_from_dict(Stage2Config, d, "test")


def vae_cfg(photo_dir, out, **kw) -> VaeConfig:
    d = dict(model="tiny", out_dir=str(out), batch_size=4, max_steps=4, save_every=2, log_every=1, progress=False,
             scaling_samples=2, data=dict(folders=[str(photo_dir)], gt_size=32, num_workers=0, cache_images=True))
    d.update(kw)
    return config_from_dict(VaeConfig, d, "test")


def run_stage(cfg, resume=False):
    from deedsr.train.stage1 import Stage1
    from deedsr.train.stage2 import Stage2
    from deedsr.train.trainer import run
    from deedsr.train.vae import VaeStage

    cls = {Stage1Config: Stage1, Stage2Config: Stage2, VaeConfig: VaeStage}[type(cfg)]
    stage = cls(cfg, tdist.DistInfo())
    run(stage, resume=resume)
    return stage


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "logs" / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- configs


def test_shipped_configs_have_the_papers_values():
    s1 = load_stage_config("configs/stage1.toml", "stage1")
    assert (s1.batch_size, s1.lr, s1.lr_milestones, s1.epochs) == (64, 0.03, [120, 240], 630)
    assert (s1.queue_size, s1.temperature, s1.patch_size, s1.data.gt_size) == (16384, 0.07, 64, 512)
    s2 = load_stage_config("configs/stage2.toml", "stage2")
    assert (s2.batch_size, s2.lr, s2.optimizer, s2.max_steps, s2.data.gt_size) == (128, 1e-5, "adam", 65840, 512)
    assert not s2.train_backbone
    from deedsr.train.demo import load_demo

    for name, vae in (("demo-tiny", "runs/demo-tiny/vae/vae"), ("demo-smoke", "runs/demo-smoke/vae/vae"),
                      ("demo-wide", "deedsr/assets/demo"), ("demo-lownoise", "runs/demo-tiny/vae/vae"),
                      ("demo-deepvae", "runs/demo-deepvae/vae/vae")):
        plan = load_demo(f"configs/{name}.toml")
        assert plan.stage2.learner.endswith("stage1/learner") and plan.stage2.vae == vae
        assert not set(plan.demo.train_photos) & set(plan.demo.heldout_photos)
        assert not set(plan.demo.photo_files) & set(plan.demo.heldout_files)
    # the shipped recipe trains stage II on exactly the noise levels its sampler default runs the model at
    from deedsr.config import SchedulerConfig
    from deedsr.runtime.sampler import Schedule
    from deedsr.schedule import alphas_cumprod

    plan = load_demo("configs/demo-lownoise.toml")
    guided = plan.demo.noise_guidance_steps
    assert guided == list(range(47))
    model_steps = Schedule(alphas_cumprod(SchedulerConfig())).timesteps(50)[len(guided):]
    assert model_steps == [41, 21, 1] and max(model_steps) < plan.stage2.max_timestep == 100
    # demo-wide reuses the shipped demo's VAE: its stage II config takes that VAE's settings
    from deedsr.train.artifacts import resolve_model_config

    assert resolve_model_config("deedsr/assets/demo", "vae").vae["block_out_channels"] == [16, 32, 32, 32]


def _write(tmp_path, text) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[stage1]\nlr = 0.1\nbatchsize = 3\n", "stage1: unknown key 'batchsize'"),
        ("[stage1]\nlr = 'fast'\n", "stage1.lr: expected a number, got 'fast' (str)"),
        ("[stage1]\nbatch_size = 6.5\n", "stage1.batch_size: expected an integer"),
        ("[stage1]\nmlp_head = 1\n", "stage1.mlp_head: expected true or false"),
        ("[stage1.data]\nfolders = 'x'\n", "stage1.data.folders: expected a list"),
        ("[stage1.data]\ndegradation = { sigma = 2 }\n", "stage1.data.degradation: unknown key 'sigma'"),
        ("[stage1]\nlr = -1.0\n", "stage1.lr: must be > 0"),
        ("[stage2]\n", "no [stage1] table"),
        ("[stage1\n", "invalid TOML"),
        ("[trainer]\n", "unknown top-level table 'trainer'"),
    ],
)
def test_bad_configs_fail_with_one_line(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_stage_config(path, "stage1")
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert str(path) in str(e.value)


def test_schedule_and_colour_fix_options_are_checked(tmp_path):
    from deedsr.train.demo import load_demo

    with pytest.raises(ConfigError, match=r"stage2.lr_schedule: must be one of constant, cosine, got 'step'$"):
        load_stage_config(_write(tmp_path, "[stage2]\nlr_schedule = 'step'\n"), "stage2")
    with pytest.raises(ConfigError, match=r"vae.lr_schedule: must be one of constant, cosine, got 'linear'$"):
        load_stage_config(_write(tmp_path, "[vae]\nlr_schedule = 'linear'\n"), "vae")
    with pytest.raises(ConfigError, match=r"demo.color_fix: must be one of none, adain, wavelet, got 'auto'$"):
        load_demo(_write(tmp_path, "[demo]\ncolor_fix = 'auto'\n"))
    with pytest.raises(ConfigError, match=r"demo.noise_guidance_steps: give step indices 0, 1, ..."):
        load_demo(_write(tmp_path, "[demo]\nnoise_guidance_steps = [0, -3]\n"))
    plan = load_demo("configs/demo-tiny.toml")
    assert (plan.demo.color_fix, plan.vae.lr_schedule, plan.stage2.lr_schedule) == ("wavelet", "cosine", "cosine")
    assert plan.stage1.lr_milestones == []


def test_demo_refuses_a_missing_vae_checkpoint_before_any_work(tmp_path):
    from deedsr.train.demo import run_demo

    work = tmp_path / "work"
    path = _write(tmp_path, f"[demo]\nwork_dir = '{work}'\nvae_checkpoint = '{tmp_path / 'nowhere'}'\n")
    with pytest.raises(ConfigError, match=r"demo.vae_checkpoint: .*nowhere holds no trained VAE \(vae.safetensors\); "
                                          r"train it first") as e:
        run_demo(path, tmp_path / "out")
    assert "\n" not in str(e.value) and not work.exists()


def test_demo_latent_gate_and_a_stage_over_several_runs(tmp_path):
    """The demo's latent fields make the model (written to the work folder), its VAE is scored
    against bicubic before stage I / II (and stops the run below demo.vae_gate_db), and a stage
    stopped at max_minutes continues in the next run, each run logged."""
    from deedsr.train.demo import GateFailed, load_demo, run_demo

    work = tmp_path / "work"
    text = (f"[demo]\nwork_dir = '{work}'\ntrain_photos = ['coffee', 'camera']\nheldout_photos = ['chelsea']\n"
            "latent_downscale = 4\nlatent_channels = 8\n"
            "[vae]\nbatch_size = 2\nmax_steps = 3\nmax_minutes = 0.0001\nthreads = 1\nprogress = false\n"
            "scaling_samples = 2\n[vae.data]\ngt_size = 32\nnum_workers = 0\n[eval]\nmax_side = 64\n")
    for bad, message in (("latent_downscale = 4", "latent_downscale = 6"), ("latent_channels = 8", "latent_channels = 99")):
        with pytest.raises(ConfigError, match=r"demo.latent_(downscale|channels): must be"):
            load_demo(_write(tmp_path, text.replace(bad, message)))
    path = _write(tmp_path, text)
    plan = load_demo(path)
    model = json.loads((work / "model.json").read_text())
    assert plan.vae.model == plan.stage2.model == str(work / "model.json")
    assert (model["vae"]["latent_channels"], len(model["vae"]["block_out_channels"]), model["unet"]["in_channels"]) \
        == (8, 3, 8)
    for run in (1, 2):  # max_minutes stops each run after its first step
        result = run_demo(path, tmp_path / "out", until="vae")
        assert result["out"] is None and not (tmp_path / "out").exists()
        assert result["stages"]["vae"]["steps"] == run
    logged = [json.loads(line) for line in (work / "runs.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["from_step"], r["to_step"], r["planned_steps"]) for r in logged] == \
        [("vae", 0, 1, 3), ("vae", 1, 2, 3)]
    gate = json.loads((work / "vae_gate.json").read_text())
    assert gate["latent"] == {"channels": 8, "downscale": 4} and gate["photos"][0]["photo"] == "chelsea"
    assert gate["margin_db"] == pytest.approx(gate["mean"]["vae"]["psnr"] - gate["mean"]["bicubic"]["psnr"], abs=1e-3)
    with pytest.raises(GateFailed, match=r"scores .* dB on the held-out photos \(medium\), .* asks for \+40 dB"):
        run_demo(_write(tmp_path, text.replace("latent_channels = 8", "latent_channels = 8\nvae_gate_db = 40.0")),
                 tmp_path / "out")
    assert not (work / "stage1").exists()


def test_demo_photo_files_are_named_resized_and_checked(tmp_path):
    from PIL import Image

    from deedsr.train.demo import load_demo, prepare_photos

    kde = tmp_path / "Lake" / "contents" / "images" / "1920x1080.png"
    kde.parent.mkdir(parents=True)
    Image.new("RGB", (1000, 600), (10, 120, 200)).save(kde)
    plain = tmp_path / "Flower.png"
    Image.new("RGB", (200, 150), (200, 50, 10)).save(plain)
    work = tmp_path / "work"
    text = (f"[demo]\nwork_dir = '{work}'\ntrain_photos = ['coffee']\nheldout_photos = ['chelsea']\n"
            f"photo_short_side = 300\nphoto_files = ['{kde}']\nheldout_files = ['{plain}']\n")
    plan = load_demo(_write(tmp_path, text))
    prepare_photos(plan)
    assert sorted(p.name for p in (work / "data" / "train").iterdir()) == ["Lake.png", "coffee.png"]
    assert sorted(p.name for p in (work / "data" / "heldout").iterdir()) == ["Flower.png", "chelsea.png"]
    assert Image.open(work / "data" / "train" / "Lake.png").size == (500, 300)  # shorter side to 300
    assert Image.open(work / "data" / "heldout" / "Flower.png").size == (200, 150)  # never enlarged

    with pytest.raises(ConfigError, match=r"photo 'Lake' is both a training and a held-out photo$"):
        load_demo(_write(tmp_path, text.replace(f"heldout_files = ['{plain}']", f"heldout_files = ['{kde}']")))
    missing = tmp_path / "gone" / "contents" / "images" / "a.jpg"
    plan = load_demo(_write(tmp_path, text.replace(str(kde), str(missing))))
    with pytest.raises(ConfigError, match=rf"photo file {missing} not found \(the demo config names Debian"):
        prepare_photos(plan)


def test_cli_reports_one_line_errors(tmp_path, photo_dir):
    from deedsr.train.cli import train

    runner = CliRunner()
    result = runner.invoke(train, ["stage1", "--config", str(_write(tmp_path, "[stage1]\nqueue = 3\n"))])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    result = runner.invoke(train, ["stage1", "--config", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2 and "config file not found" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = f'[stage1]\nmodel = "tiny"\nout_dir = "{tmp_path / "o"}"\n[stage1.data]\nfolders = ["{empty}"]\n'
    result = runner.invoke(train, ["stage1", "--config", str(_write(tmp_path, cfg))])
    assert result.exit_code == 2 and "no images" in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "o").exists()  # nothing started


# ----------------------------------------------------------------------------- data


def test_bad_data_fails_before_training(tmp_path, photo_dir):
    from deedsr.train.config import DataConfig

    def cfg(folder, gt=64):
        return DataConfig(folders=[str(folder)], gt_size=gt)

    with pytest.raises(DataError, match="data folder not found"):
        list_images(cfg(tmp_path / "nope"), 64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        list_images(cfg(tmp_path / "empty"), 64)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"broken\.png: unreadable image"):
        list_images(cfg(bad), 64)
    with pytest.raises(DataError, match=r"96x96 is smaller than the 128x128 training crop \(4 of 4 images are\)"):
        list_images(cfg(photo_dir, 128), 128)
    with pytest.raises(DataError, match="fewer than one batch"):
        StepBatchSampler(4, 8, 8, 1, 0, 0)
    # the whole stage stops on it before building anything
    with pytest.raises(DataError, match="smaller than"):
        run_stage(stage1_cfg(photo_dir, tmp_path / "run", data=dict(folders=[str(photo_dir)], gt_size=128)))
    assert not (tmp_path / "run").exists()


def test_samples_are_deterministic_per_key(photo_dir):
    from deedsr.train.config import DataConfig

    files = list_images(DataConfig(folders=[str(photo_dir)], gt_size=64), 64)
    ds = DegradedImages(files, DataConfig(folders=[str(photo_dir)], gt_size=64), seed=3, mode="pair")
    a, b = ds[(0, 1)], ds[(0, 1)]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["hr"].shape == (3, 64, 64) and a["lr"].shape == (3, 16, 16) and a["lr_up"].shape == (3, 64, 64)
    assert not np.array_equal(a["lr"], ds[(1, 1)]["lr"])  # another epoch, another crop / degradation
    moco = DegradedImages(files, DataConfig(folders=[str(photo_dir)], gt_size=64), 3, "moco", patch_size=8)
    item = moco[(0, 2)]
    assert item["q"].shape == item["k"].shape == (3, 8, 8) and not np.array_equal(item["q"], item["k"])


def test_lr_schedules():
    from deedsr.train.trainer import scheduled_lr

    assert scheduled_lr(1.0, 0, 100) == scheduled_lr(1.0, 99, 100) == 1.0
    assert scheduled_lr(1.0, 0, 100, "cosine") == 1.0
    assert scheduled_lr(1.0, 50, 100, "cosine") == pytest.approx(0.5)
    assert scheduled_lr(1.0, 100, 100, "cosine") == pytest.approx(0.0)
    assert scheduled_lr(1.0, 4, 100, "cosine", warmup=10) == pytest.approx(0.5)  # warm-up first
    assert scheduled_lr(1.0, 10, 110, "cosine", warmup=10) == pytest.approx(1.0)


def test_degradation_retrieval_probe():
    """The probe scores a constant encoder at exactly chance and simple noise / sharpness
    statistics well above it (so the same seed really gives every photo the same degradation)."""
    from scipy import ndimage

    from deedsr.train.evaluate import degradation_retrieval, skimage_photo

    photos = {n: skimage_photo(n) for n in ("astronaut", "chelsea")}
    kw = dict(degradations=6, crops=3, crop_size=128)
    constant = degradation_retrieval(lambda x: np.ones((len(x), 4)), photos, **kw)
    assert constant["accuracy"] == pytest.approx(1 / 6) and constant["samples"] == 36

    def statistics(x):
        g = x.mean(axis=1)
        high = g - ndimage.gaussian_filter(g, (0, 1, 1))
        grad = np.hypot(*np.gradient(g, axis=(1, 2)))
        return np.stack([high.std(axis=(1, 2)), np.abs(high).mean(axis=(1, 2)), grad.mean(axis=(1, 2)),
                         x.std(axis=(1, 2, 3))], axis=1)

    # A handful of degradations can hold near-twins, so average over a few draws of them.
    scores = [degradation_retrieval(statistics, photos, seed=s, **kw)["accuracy"] for s in range(5)]
    assert np.mean(scores) > 2 / 6, scores
    with pytest.raises(ValueError, match="at least two photos"):
        degradation_retrieval(statistics, {"a": photos["astronaut"]})


def test_global_batches_do_not_depend_on_ranks_or_accumulation():
    one = StepBatchSampler(40, 8, 8, 1, 0, seed=1)
    split = [StepBatchSampler(40, 8, 2, 2, r, seed=1) for r in range(2)]  # 2 ranks x 2 accumulation steps
    for step in (0, 4, 7):  # 7 is in the second epoch
        (whole,) = one.step_keys(step)
        parts = [k for s in split for mb in s.step_keys(step) for k in mb]
        assert sorted(whole) == sorted(parts) and len(set(whole)) == 8
    it = iter(StepBatchSampler(40, 8, 4, 1, 0, seed=1, start_step=6))
    assert next(it) + next(it) == one.step_keys(6)[0]


# ----------------------------------------------------------------------------- stage I


def test_queue_rolls_over():
    from deedsr.config import preset
    from deedsr.models import DegradationLearner
    from deedsr.train.moco import MoCo

    moco = MoCo(DegradationLearner(preset("tiny").learner), queue_size=10, temperature=0.07, key_momentum=0.9)
    batches = [torch.full((4, moco.queue.shape[0]), float(i + 1)) for i in range(3)]
    for b in batches:
        moco.enqueue(b)
    assert int(moco.queue_ptr) == 2
    cols = moco.queue[0].tolist()
    assert cols == [3, 3, 1, 1, 2, 2, 2, 2, 3, 3]  # the 3rd batch wrapped around over the 1st
    moco.enqueue(torch.full((8, moco.queue.shape[0]), 4.0))
    assert int(moco.queue_ptr) == 0 and moco.queue[0].tolist() == [3, 3] + [4.0] * 8


def test_stage1_loss_decreases(tmp_path, many_photos):
    cfg = stage1_cfg(many_photos, tmp_path / "s1", max_steps=36, batch_size=14, bn_groups=1, queue_size=56, lr=0.1,
                     key_momentum=0.99, patch_size=16, save_every=100, log_every=1,
                     data=dict(folders=[str(many_photos)], gt_size=128, num_workers=0, cache_images=True))
    run_stage(cfg)
    losses = [m["loss"] for m in metrics(cfg.out_dir)]
    # The queue starts as random vectors (easy negatives) and holds real keys from step 4 on;
    # from there the loss must come down.
    assert np.mean(losses[-8:]) < np.mean(losses[4:12]) - 0.3, losses
    from deedsr.models import load_checkpoint

    learner = load_checkpoint(Path(cfg.out_dir) / "learner", components=("learner",)).learner
    assert learner(torch.rand(1, 3, 32, 32)).shape == (1, 64)


# ----------------------------------------------------------------------------- stage II


def test_stage2_trains_exactly_adapter_modulation_attn2(components, photo_dir, tmp_path):
    from deedsr.config import preset
    from deedsr.models import DeeDSR
    from deedsr.train.stage2 import Stage2, set_trainable

    model = DeeDSR(preset("tiny"))
    names = set(set_trainable(model))
    all_names = [n for n, _ in model.named_parameters()]
    expected = {n for n in all_names if n.startswith("adapter.") or n.startswith("unet.modulation.")
                or (n.startswith("unet.unet.") and ".attn2." in n)}
    assert names == expected
    assert any(n.endswith("attn2.to_k.weight") for n in names) and any(n.endswith("attn2.to_q.weight") for n in names)
    assert not any(n.startswith(("learner.", "vae.")) or ".attn1." in n or ".resnets." in n
                   and not n.startswith(("adapter.", "unet.modulation.")) for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    # the stage's optimizer holds exactly those parameters
    stage = Stage2(stage2_cfg(photo_dir, tmp_path / "s2", components), tdist.DistInfo())
    stage.build()
    opt_ids = {id(p) for g in stage.optimizer.param_groups for p in g["params"]}
    assert opt_ids == {id(p) for n, p in stage.model.named_parameters() if n in expected}
    assert not any(p.requires_grad for p in stage.model.learner.parameters())
    assert not stage.model.learner.training and not stage.model.vae.training
    assert len(set(set_trainable(model, train_backbone=True))) > len(expected)


def test_stage2_starts_from_an_sd_folder_and_keeps_the_frozen_part_frozen(components, photo_dir, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.data import default_collate

    from deedsr.config import preset
    from deedsr.train.stage2 import Stage2

    cfg = preset("tiny")
    torch.manual_seed(5)
    sd_unet = UNet2DConditionModel(**{**cfg.unet, "cross_attention_dim": 32})  # SD's text width differs
    sd_vae = AutoencoderKL(**cfg.vae)
    sd_unet.save_pretrained(tmp_path / "sd" / "unet")
    sd_vae.save_pretrained(tmp_path / "sd" / "vae")
    stage = Stage2(stage2_cfg(photo_dir, tmp_path / "s2", components, vae="", sd_base=str(tmp_path / "sd"),
                              batch_size=2, micro_batch=2), tdist.DistInfo())
    stage.build()
    model = stage.model
    src = sd_unet.state_dict()
    ours = model.unet.unet.state_dict()
    for key, value in src.items():
        if ".attn2.to_k." in key or ".attn2.to_v." in key:
            assert ours[key].shape != value.shape
        else:
            assert torch.equal(ours[key], value), key
    assert all(torch.equal(v, sd_vae.state_dict()[k]) for k, v in model.vae.state_dict().items())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = stage.dataset(list_images(stage.cfg.data, stage.cfg.data.gt_size))
    stage.train_step(0, [default_collate([ds[(0, i)] for i in range(2)])])
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    trainable = set(stage.names)
    assert changed <= trainable and any(".attn2." in k for k in changed) and any("modulation" in k for k in changed)
    assert any(k.startswith("adapter.") for k in changed)


def test_stage2_trains_under_its_profile_and_writes_it_into_the_checkpoint(components, photo_dir, tmp_path):
    from deedsr.runtime.profiles import torch_bicubic_upscale

    from deedsr.models import load_checkpoint
    from deedsr.train.stage2 import Stage2

    with pytest.raises(ConfigError, match=r"^test.profile: must be one of paper, reference-code \(or empty: the "
                                          r"model's\), got 'ldm'$"):
        stage2_cfg(photo_dir, tmp_path / "bad", components, profile="ldm")
    cfg = stage2_cfg(photo_dir, tmp_path / "s2", components, profile="reference-code")
    stage = Stage2(cfg, tdist.DistInfo())
    stage.build()
    ds = stage.dataset(list_images(cfg.data, cfg.data.gt_size))
    sample = ds[(0, 1)]
    lr = sample["lr"].transpose(1, 2, 0)
    np.testing.assert_array_equal(sample["lr_up"], torch_bicubic_upscale(lr, 4).transpose(2, 0, 1))
    lr_up = torch.from_numpy(sample["lr_up"])[None]
    with torch.no_grad():
        got = stage.lr_latent(lr_up, torch.Generator().manual_seed(7))
        posterior = stage.model.vae.encode(lr_up).latent_dist  # from [0, 1], sampled
        want = posterior.sample(generator=torch.Generator().manual_seed(7)) * stage.model.scaling_factor
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, posterior.mean * stage.model.scaling_factor)
    written = stage.finalize(tmp_path / "s2")
    assert load_checkpoint(written).config.sampler.profile == "reference-code"
    # fine-tuning from it keeps its profile unless the config names another
    init = {"vae": "", "learner": "", "init": str(written)}
    assert Stage2(stage2_cfg(photo_dir, tmp_path / "a", components, **init), tdist.DistInfo()).profile.name == \
        "reference-code"
    paper = Stage2(stage2_cfg(photo_dir, tmp_path / "b", components, profile="paper", **init), tdist.DistInfo())
    assert paper.profile.name == "paper" and paper.model_config.sampler.profile == "paper"


def test_stage2_max_timestep_trains_only_the_low_noise_levels(components, photo_dir, tmp_path):
    from deedsr.train.stage2 import Stage2

    with pytest.raises(ConfigError, match=r"^test.max_timestep: must be >= 0, got -5$"):
        stage2_cfg(photo_dir, tmp_path / "bad", components, max_timestep=-5)
    seen = {}
    for limit in (0, 100):
        stage = Stage2(stage2_cfg(photo_dir, tmp_path / f"s{limit}", components, max_timestep=limit), tdist.DistInfo())
        stage.build()
        ds = stage.dataset(list_images(stage.cfg.data, stage.cfg.data.gt_size))
        batch = {k: torch.from_numpy(np.stack([ds[(0, i)][k] for i in range(8)])) for k in ("hr", "lr", "lr_up")}
        inner, drawn = stage.denoiser, []
        stage.denoiser = lambda x, t, z, d, inner=inner, drawn=drawn: (drawn.append(t), inner(x, t, z, d))[1]
        for k in range(8):
            assert torch.isfinite(stage.loss(batch, torch.Generator().manual_seed(k)))
        seen[limit] = torch.cat(drawn)
    assert seen[100].max() < 100 and seen[0].max() >= 100  # 64 draws from 0..999: one is >= 100


@pytest.mark.parametrize("fraction,gamma", [(0.0, 0.0), (1.0, 0.0), (1.0, 5.0), (0.5, 5.0)])
def test_stage2_lr_anchored_x_t_keeps_the_hr_target(components, photo_dir, tmp_path, fraction, gamma):
    """x_t is made around z0 (Eq. 9) or, for lr_anchor_fraction of the batch, around z_lr as the
    noise-guided sampler leaves it; either way the epsilon target is the one whose x0 is the HR
    latent: a denoiser that knows z0 scores 0, one that returns the drawn noise does not."""
    from deedsr.train.stage2 import Stage2

    for bad in (dict(lr_anchor_fraction=1.5), dict(min_snr_gamma=-1.0)):
        with pytest.raises(ConfigError, match=r"^test\.(lr_anchor_fraction|min_snr_gamma): must be"):
            stage2_cfg(photo_dir, tmp_path / "bad", components, **bad)
    cfg = stage2_cfg(photo_dir, tmp_path / "s", components, max_timestep=100, sample_posterior=False,
                     lr_anchor_fraction=fraction, min_snr_gamma=gamma)
    stage = Stage2(cfg, tdist.DistInfo())
    stage.build()
    ds = stage.dataset(list_images(stage.cfg.data, stage.cfg.data.gt_size))
    batch = {k: torch.from_numpy(np.stack([ds[(0, i)][k] for i in range(8)])) for k in ("hr", "lr", "lr_up")}
    with torch.no_grad():
        z0 = stage.model.vae.encode(batch["hr"] * 2 - 1).latent_dist.mean * stage.model.scaling_factor
    # the loss's draws, replayed: t, the noise, then which samples are anchored at z_lr
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 100, (8,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    anchored = (torch.rand(8, generator=g) < fraction) if fraction else torch.zeros(8, dtype=torch.bool)
    a = stage.abar[t].view(-1, 1, 1, 1)
    seen = {}

    def denoiser(answer):
        def denoise(x_t, t_, z_lr, d):
            anchor = torch.where(anchored.view(-1, 1, 1, 1), z_lr, z0)
            seen["x_t"] = (x_t, a.sqrt() * anchor + (1 - a).sqrt() * noise)
            return noise if answer == "noise" else (x_t - a.sqrt() * z0) / (1 - a).sqrt()
        return denoise

    stage.denoiser = denoiser("hr")
    assert float(stage.loss(batch, torch.Generator().manual_seed(1))) < 1e-6
    torch.testing.assert_close(*seen["x_t"])
    stage.denoiser = denoiser("noise")
    loss = float(stage.loss(batch, torch.Generator().manual_seed(1)))
    assert (loss > 1e-4) if anchored.any() else (loss < 1e-6)


def test_gradient_checkpointing_changes_nothing(tiny_model):
    from deedsr.train.stage2 import Denoiser

    torch.manual_seed(0)
    x, z_lr, d = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 64)
    t = torch.tensor([10.0, 900.0])
    den = Denoiser(tiny_model.adapter, tiny_model.unet)
    results = []
    for flag in (False, True):
        tiny_model.adapter.gradient_checkpointing = tiny_model.unet.gradient_checkpointing = flag
        den.zero_grad()
        loss = den(x, t, z_lr, d).square().mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in den.parameters() if p.grad is not None]))
    tiny_model.adapter.gradient_checkpointing = tiny_model.unet.gradient_checkpointing = False
    den.zero_grad()
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1) and len(g0) == len(g1) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))


def test_stage2_loss_decreases(components, photo_dir, tmp_path):
    from torch.utils.data import default_collate

    from deedsr.train.stage2 import Stage2

    cfg = stage2_cfg(photo_dir, tmp_path / "s2", components, lr=2e-3, batch_size=4, micro_batch=4)
    stage = Stage2(cfg, tdist.DistInfo())
    stage.build()
    ds = stage.dataset(list_images(cfg.data, cfg.data.gt_size))
    batch = default_collate([ds[(0, i)] for i in range(4)])

    def fixed_loss():
        with torch.no_grad():
            return float(np.mean([float(stage.loss(batch, torch.Generator().manual_seed(s))) for s in range(4)]))

    before = fixed_loss()
    for step in range(25):
        stage.train_step(step, [batch])
    after = fixed_loss()
    # (with the backbone frozen at random weights the tiny model cannot go far below ~0.9 x)
    assert after < 0.9 * before, (before, after)


# ----------------------------------------------------------------------------- VAE


def test_vae_stage_learns_and_writes_a_checkpoint(photo_dir, tmp_path):
    from diffusers import AutoencoderKL

    from deedsr.checkpoints import read_config
    from deedsr.config import preset
    from deedsr.models import load_checkpoint

    cfg = vae_cfg(photo_dir, tmp_path / "vae", max_steps=40, lr=1e-3, save_every=100)
    run_stage(cfg)
    folder = Path(cfg.out_dir) / "vae"
    factor = read_config(folder).vae["scaling_factor"]
    assert 0 < factor and factor != 0.18215
    trained = load_checkpoint(folder, components=("vae",)).vae
    torch.manual_seed(cfg.seed)
    initial = AutoencoderKL(**preset("tiny").vae).eval()  # what the stage started from
    x = torch.from_numpy(np.stack([np.asarray(Image.open(f), np.float32).transpose(2, 0, 1)[:, :64, :64]
                                   for f in sorted(photo_dir.iterdir())]) / 255.0) * 2 - 1

    def l1(vae):
        with torch.no_grad():
            return float((vae.decode(vae.encode(x).latent_dist.mean).sample - x).abs().mean())

    assert l1(trained) < 0.8 * l1(initial), (l1(initial), l1(trained))


# ----------------------------------------------------------------------------- resume


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{f.stem}.{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("which", ["stage1", "stage2", "vae"])
def test_resume_is_exact(which, photo_dir, components, tmp_path):
    make = {
        "stage1": lambda out, **kw: stage1_cfg(photo_dir, out, **kw),
        "stage2": lambda out, **kw: stage2_cfg(photo_dir, out, components, ema_decay=0.5, **kw),
        "vae": lambda out, **kw: vae_cfg(photo_dir, out, **kw),
    }[which]
    deliverable = {"stage1": "learner", "stage2": "model", "vae": "vae"}[which]
    run_stage(make(tmp_path / "straight", max_steps=4))
    run_stage(make(tmp_path / "split", max_steps=2))  # stops at 2 (as a crash after the checkpoint would)
    run_stage(make(tmp_path / "split", max_steps=4), resume=True)
    a = _weights(tmp_path / "straight" / deliverable)
    b = _weights(tmp_path / "split" / deliverable)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    steps = [m["step"] for m in metrics(tmp_path / "split")]
    assert steps == [1, 2, 3, 4]


def test_resume_refuses_another_config_and_fresh_runs_refuse_old_checkpoints(photo_dir, tmp_path):
    out = tmp_path / "s1"
    run_stage(stage1_cfg(photo_dir, out, max_steps=2))
    with pytest.raises(ConfigError, match=r"written with another config: 'lr' differs"):
        run_stage(stage1_cfg(photo_dir, out, max_steps=4, lr=0.5), resume=True)
    with pytest.raises(ConfigError, match="pass --resume"):
        run_stage(stage1_cfg(photo_dir, out, max_steps=4))
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        run_stage(stage1_cfg(photo_dir, tmp_path / "fresh"), resume=True)
    other = tmp_path / "other"
    run_stage(vae_cfg(photo_dir, other, max_steps=2))
    with pytest.raises(ConfigError, match="a checkpoint of 'vae', not of stage1"):
        run_stage(stage1_cfg(photo_dir, out, max_steps=4), resume=str(other / "checkpoints"))


def test_a_crash_while_saving_keeps_the_last_good_checkpoint(photo_dir, tmp_path, monkeypatch):
    from deedsr.train import state

    out = tmp_path / "s1"
    run_stage(stage1_cfg(photo_dir, out, max_steps=2))
    good = state.latest_checkpoint(out / "checkpoints")
    step, _ = state.load_state(good)

    real_save = state.save_file

    def crash(tensors, path, *a, **kw):
        real_save(dict(list(tensors.items())[:3]), path, *a, **kw)  # a partial file, then the crash
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(state, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        run_stage(stage1_cfg(photo_dir, out, max_steps=4, save_every=1), resume=True)
    assert state.latest_checkpoint(out / "checkpoints") == good
    assert state.load_state(out / "checkpoints")[0] == step == 2
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no debris
    monkeypatch.setattr(state, "save_file", real_save)
    run_stage(stage1_cfg(photo_dir, out, max_steps=4), resume=True)
    assert state.load_state(out / "checkpoints")[0] == 4


def test_evaluation_reports_every_method_and_the_learner_probe(tiny_model, tmp_path, monkeypatch):
    import dataclasses

    from deedsr.train.config import EvalConfig
    from deedsr.train.evaluate import evaluate, format_table, skimage_photo

    monkeypatch.setattr(tiny_model.config, "sampler", dataclasses.replace(tiny_model.config.sampler, color_fix="wavelet"))
    photos = {n: skimage_photo(n)[:96, :124] for n in ("astronaut", "chelsea")}
    report = evaluate(tiny_model, photos, EvalConfig(steps=2), out_dir=tmp_path)
    assert report["color_fix"] == "wavelet" and list(report["levels"]) == ["medium", "bicubic"]
    medium, plain = report["levels"]["medium"], report["levels"]["bicubic"]
    assert set(medium["mean"]) == {"bicubic", "model", "model_eta0", "model_no_noise_guidance", "model_no_color_fix",
                                   "no_model", "vae"}  # the default guides step 0 only: no paper-sampler row
    assert set(plain["mean"]) == {"bicubic", "model", "model_eta0"}
    assert medium["photos"][0]["hr_size"] == [124, 96] and medium["photos"][0]["lr_size"] == [31, 24]
    assert medium["mean"]["model"] != medium["mean"]["model_no_color_fix"]
    assert medium["mean"]["model"] != medium["mean"]["model_eta0"]
    # plain bicubic downscaling loses less than the medium degradation
    assert plain["mean"]["bicubic"]["psnr"] > medium["mean"]["bicubic"]["psnr"]
    # an untrained VAE reconstructs badly but it is a real reconstruction, of the whole 124x96 photo
    assert 0 < medium["mean"]["vae"]["psnr"] < 25
    assert 0 <= report["learner_degradation_retrieval"]["accuracy"] <= 1
    table = format_table(report)
    assert "| demo model, colour fix off |" in table and "cross-photo degradation retrieval" in table
    assert "Plain bicubic x4 downscaling" in table and "| demo model, eta 0 (deterministic DDIM) |" in table
    assert (tmp_path / "chelsea_medium_model_no_color_fix.png").is_file()
    assert (tmp_path / "chelsea_bicubic_lr.png").is_file()
    # a checkpoint whose default guides more steps is also scored with the paper's guidance
    monkeypatch.setattr(tiny_model.config, "sampler",
                        dataclasses.replace(tiny_model.config.sampler, noise_guidance_steps=tuple(range(50))))
    report = evaluate(tiny_model, {"astronaut": photos["astronaut"]}, EvalConfig(steps=2, levels=["medium"]))
    row = report["levels"]["medium"]["photos"][0]
    assert row["model_paper_sampler"] != row["model"]
    assert row["no_model"] == row["model_eta0"]  # 2 steps, both guided: the model never runs
