"""Training configuration: one dataclass per stage, read from TOML files.

Every key is checked before anything is built: an unknown key, a value of the wrong type or
an impossible value raises ConfigError with one line that names the file and the key, e.g.
``configs/stage1.toml: stage1.lr: expected a number, got 'fast' (str)``.

A config file holds one stage's table (``[stage1]``, ``[stage2]`` or ``[vae]``), with its
``[<stage>.data]`` sub-table; the demo file holds all three plus ``[demo]`` and ``[eval]``.
TOML is read with the standard library (tomllib, Python >= 3.11) or the `tomli` backport.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "DataConfig",
    "DemoConfig",
    "EvalConfig",
    "Stage1Config",
    "Stage2Config",
    "VaeConfig",
    "STAGES",
    "load_config",
    "load_stage_config",
    "config_from_dict",
]


class ConfigError(ValueError):
    """A configuration that cannot be used; str() is one line naming the file and key."""


MIXED_PRECISIONS = ("no", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class DataConfig:
    """Folders of HR images -> random crops, flips, on-the-fly Real-ESRGAN degradation."""

    folders: list[str] = field(default_factory=list)
    extensions: list[str] = field(default_factory=lambda: [".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"])
    gt_size: int = 512  # HR crop side; the LR side is gt_size / scale
    hflip: bool = True
    rot90: bool = False
    repeat: int = 1  # each image appears this many times per epoch (small folders)
    num_workers: int = 4
    cache_images: bool = False  # keep decoded images in (worker) memory
    # Overrides of deedsr.degradations.DegradationConfig fields (the reference values by default).
    degradation: dict[str, Any] = field(default_factory=dict)


@dataclass
class _RunConfig:
    """Keys every stage has."""

    model: str = "sd21-base"  # preset name, or a DeeDSR checkpoint folder / its config.json
    out_dir: str = ""
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    device: str = "auto"  # auto | cpu | cuda (under torchrun: the local rank's GPU)
    threads: int = 0  # torch CPU threads per process; 0 = torch's default
    mixed_precision: str = "no"  # no | bf16 | fp16 (autocast; fp16 adds a gradient scaler)
    max_steps: int = 0  # optimizer steps; 0 = the stage's natural length
    max_minutes: float = 0.0  # wall-time budget; 0 = none. Stops cleanly with a checkpoint
    log_every: int = 10
    save_every: int = 1000  # training-state checkpoint every N steps (and at the end)
    keep_last: int = 2  # training-state checkpoints kept
    progress: bool = True  # progress bar on rank 0
    tensorboard: bool = False  # also log to TensorBoard (needs the tensorboard package)
    replica_check: bool = True  # under DDP: verify at every checkpoint that all ranks agree


@dataclass
class Stage1Config(_RunConfig):
    """MoCo contrastive training of the degradation learner (paper §3.2, §4.1)."""

    batch_size: int = 64  # global
    epochs: int = 630
    lr: float = 0.03
    lr_milestones: list[int] = field(default_factory=lambda: [120, 240])  # epochs
    lr_gamma: float = 0.1
    momentum: float = 0.9  # SGD
    weight_decay: float = 1e-4
    queue_size: int = 16384
    temperature: float = 0.07
    key_momentum: float = 0.999
    patch_size: int = 64  # LR patch side; query and key are two cells of the LR image's grid
    head_dim: int = 0  # projection output width; 0 = the learner's width
    mlp_head: bool = True  # MoCo v2 MLP projection head (training only)
    bn_groups: int = 2  # single process: shuffle-BN emulation over this many sub-batches


@dataclass
class Stage2Config(_RunConfig):
    """Diffusion training of adapter, modulation and attn2 (paper §3.3 Eq. 9, §4.1)."""

    sd_base: str = ""  # local SD 2.1-base diffusers folder (unet/ and vae/)
    learner: str = ""  # stage-I output (a checkpoint folder holding learner.safetensors)
    vae: str = ""  # a checkpoint folder holding vae.safetensors (models without SD weights)
    init: str = ""  # a full DeeDSR checkpoint folder to start from instead
    batch_size: int = 128  # global
    micro_batch: int = 0  # per rank and forward pass; 0 = batch_size / world (no accumulation)
    lr: float = 1e-5
    optimizer: str = "adam"  # adam | adamw
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine (to 0 at the last step, after the warm-up)
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # 0 = no EMA; else the exported weights are the EMA
    sample_posterior: bool = True  # z0 = a VAE posterior sample (as LDM); else its mean
    # Train on timesteps t ~ U[0, max_timestep) only; 0 = all of the schedule's (the paper). A
    # small model whose sampler is noise-guided down to a late step only ever denoises from there.
    max_timestep: int = 0
    # Share of each batch whose x_t is made around z_lr, as a noise-guided sampler makes it
    # (x_t = sqrt(abar) z_lr + sqrt(1 - abar) noise), the target still the HR latent: its
    # epsilon target is (x_t - sqrt(abar) z0) / sqrt(1 - abar). 0 = Eq. 9 alone (the paper).
    lr_anchor_fraction: float = 0.0
    # Min-SNR weighting of the epsilon loss, min(SNR, gamma) / SNR (Hang et al. 2023): the same as
    # an x0 loss weighted min(SNR, gamma); 0 = unweighted (the paper).
    min_snr_gamma: float = 0.0
    train_backbone: bool = False  # also train the UNet backbone (models with no SD prior)
    val_every: int = 0  # validation samples every N steps; 0 = only at the end if val_images
    val_images: list[str] = field(default_factory=list)  # HR images, degraded at val_level
    val_level: str = "medium"
    val_steps: int = 50
    val_size: int = 256  # HR centre crop side used for validation samples
    # Sampling profile trained under and written into the checkpoint (paper | reference-code;
    # deedsr.runtime.profiles): bicubic kind and the LR latent's input range and posterior draw.
    # "" = the model's own (a preset: paper; an imported public checkpoint: reference-code).
    profile: str = ""


@dataclass
class VaeConfig(_RunConfig):
    """Autoencoder training for models without SD weights: reconstruction + small KL."""

    model: str = "tiny"
    batch_size: int = 8
    micro_batch: int = 0
    lr: float = 1e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    lr_schedule: str = "constant"  # constant | cosine (to 0 at the last step)
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    kl_weight: float = 1e-6  # as SD's autoencoder: relative to the per-image summed reconstruction
    degraded_fraction: float = 0.0  # share of inputs that are bicubic-upsampled degraded LR images
    scaling_factor: float = 0.0  # 0 = measure 1/std of the latents after training (SD's recipe)
    scaling_samples: int = 32


@dataclass
class EvalConfig:
    """Held-out evaluation: Table 6 degradation, PSNR/SSIM on Y."""

    # Table 6 levels (light / medium / heavy) and "bicubic" (plain bicubic downscaling); the first
    # also gets the ablations and the VAE reconstruction.
    levels: list[str] = field(default_factory=lambda: ["medium", "bicubic"])
    seed: int = 0
    steps: int = 50
    crop_border: int = 4
    max_side: int = 0  # HR centre crop to at most this side; 0 = the whole photo


@dataclass
class DemoConfig:
    """`deedsr train demo`: vae -> stage1 -> stage2 on scikit-image photos, then evaluation."""

    work_dir: str = "runs/demo-tiny"
    model: str = "tiny"
    seed: int = 0
    train_photos: list[str] = field(default_factory=list)  # skimage.data names
    heldout_photos: list[str] = field(default_factory=lambda: ["astronaut", "chelsea"])
    # Photo files beyond scikit-image's (e.g. Debian's wallpaper packages), named by their stem;
    # each is resized (Lanczos) so that its shorter side is at most photo_short_side.
    photo_files: list[str] = field(default_factory=list)
    heldout_files: list[str] = field(default_factory=list)
    photo_short_side: int = 768
    # A trained VAE to reuse (a checkpoint folder holding vae.safetensors) instead of the [vae]
    # stage; its config (widths, scaling factor) replaces the model's VAE config.
    vae_checkpoint: str = ""
    weights_dtype: str = "float32"  # float32 | float16 (halves the committed files)
    color_fix: str = "none"  # the sampler default written into the checkpoint: none | adain | wavelet
    # Sampler default written into the checkpoint: the steps (of sampler.steps) whose epsilon comes
    # from z_lr (noise guidance, Eq. 10-11) instead of the model; empty = the model's own default.
    noise_guidance_steps: list[int] = field(default_factory=list)
    # The model's latent (0 = the model's own): latent channels and the image-to-latent factor
    # (a power of two), applied to `model` by deedsr.config.with_latent.
    latent_channels: int = 0
    latent_downscale: int = 0
    # Gate before stage I / II: the VAE's colour-fixed reconstruction of the held-out HR photos must
    # beat bicubic by this many dB (mean PSNR on Y, first eval level); 0 = report it, do not stop.
    vae_gate_db: float = 0.0


def photo_name(file: str | Path) -> str:
    """A photo file's name in the demo: its stem, or for KDE's wallpaper layout
    (<name>/contents/images/<size>.jpg) the wallpaper's folder name."""
    path = Path(file)
    if path.parent.name == "images" and path.parent.parent.name == "contents":
        return path.parent.parent.parent.name
    return path.stem


STAGES = {"stage1": Stage1Config, "stage2": Stage2Config, "vae": VaeConfig}


# ----------------------------------------------------------------------------- parsing


def _type_name(value: Any) -> str:
    return type(value).__name__


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return config_from_dict(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r} ({_type_name(value)})")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r} ({_type_name(value)})")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r} ({_type_name(value)})")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r} ({_type_name(value)})")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r} ({_type_name(value)})")
        (item,) = typing.get_args(hint)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r} ({_type_name(value)})")
        return dict(value)
    raise TypeError(f"unsupported config type {hint} at {where}")  # programming error


def config_from_dict(cls, data: Any, where: str):
    """Build dataclass `cls` from a mapping, checking keys and types; `where` prefixes errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {data!r} ({_type_name(data)})")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{unknown[0]}'" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f"; valid keys: {', '.join(names)}"
        )
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    cfg = cls(**kwargs)
    _validate(cfg, where)
    return cfg


def _positive(cfg, where: str, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{where}.{name}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _validate(cfg, where: str) -> None:
    if isinstance(cfg, DataConfig):
        _positive(cfg, where, "gt_size", "repeat")
        _positive(cfg, where, "num_workers", allow_zero=True)
        from ..degradations import DegradationConfig

        known = {f.name for f in dataclasses.fields(DegradationConfig)}
        for key in cfg.degradation:
            if key not in known:
                raise ConfigError(f"{where}.degradation: unknown key '{key}' (a deedsr.degradations.DegradationConfig field)")
        try:
            degradation_config(cfg)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}.degradation: {e}") from None
        return
    if isinstance(cfg, EvalConfig):
        from ..degradations import LEVELS

        valid = [*LEVELS, "bicubic"]
        if not cfg.levels or len(set(cfg.levels)) != len(cfg.levels):
            raise ConfigError(f"{where}.levels: give one or more distinct levels ({', '.join(valid)})")
        for level in cfg.levels:
            if level not in valid:
                raise ConfigError(f"{where}.levels: '{level}' is not one of {', '.join(valid)}")
        _positive(cfg, where, "steps")
        _positive(cfg, where, "crop_border", "max_side", allow_zero=True)
        return
    if isinstance(cfg, DemoConfig):
        if cfg.weights_dtype not in ("float32", "float16"):
            raise ConfigError(f"{where}.weights_dtype: must be float32 or float16, got '{cfg.weights_dtype}'")
        from ..color import COLOR_FIXES

        if cfg.color_fix not in COLOR_FIXES:
            raise ConfigError(f"{where}.color_fix: must be one of {', '.join(COLOR_FIXES)}, got '{cfg.color_fix}'")
        if len(cfg.heldout_photos) != len(set(cfg.heldout_photos)):
            raise ConfigError(f"{where}.heldout_photos: duplicates")
        _positive(cfg, where, "photo_short_side")
        _positive(cfg, where, "latent_channels", "vae_gate_db", allow_zero=True)
        if cfg.latent_channels > 64:
            raise ConfigError(f"{where}.latent_channels: must be in 1..64 (0 = the model's), got {cfg.latent_channels}")
        d = cfg.latent_downscale
        if d and (d < 0 or d & (d - 1) or d > 64):
            raise ConfigError(f"{where}.latent_downscale: must be a power of two in 1..64 (0 = the model's), got {d}")
        if any(not isinstance(i, int) or i < 0 for i in cfg.noise_guidance_steps):
            raise ConfigError(f"{where}.noise_guidance_steps: give step indices 0, 1, ... (of sampler.steps)")
        names = [*cfg.train_photos, *map(photo_name, cfg.photo_files)]
        heldout = [*cfg.heldout_photos, *map(photo_name, cfg.heldout_files)]
        for label, group in (("training", names), ("held-out", heldout)):
            twice = sorted({n for n in group if group.count(n) > 1})
            if twice:
                raise ConfigError(f"{where}: two {label} photos are named '{twice[0]}'")
        overlap = set(names) & set(heldout)
        if overlap:
            raise ConfigError(f"{where}: photo '{sorted(overlap)[0]}' is both a training and a held-out photo")
        return
    if not isinstance(cfg, _RunConfig):
        return
    if cfg.device not in DEVICES:
        raise ConfigError(f"{where}.device: must be one of {', '.join(DEVICES)}, got '{cfg.device}'")
    if cfg.mixed_precision not in MIXED_PRECISIONS:
        raise ConfigError(
            f"{where}.mixed_precision: must be one of {', '.join(MIXED_PRECISIONS)}, got '{cfg.mixed_precision}'"
        )
    _positive(cfg, where, "log_every", "save_every", "keep_last", "batch_size")
    _positive(cfg, where, "max_steps", "max_minutes", "threads", allow_zero=True)
    if isinstance(cfg, Stage1Config):
        _positive(cfg, where, "epochs", "lr", "queue_size", "temperature", "patch_size", "bn_groups")
        _positive(cfg, where, "head_dim", "weight_decay", "momentum", allow_zero=True)
        if not 0.0 <= cfg.key_momentum < 1.0:
            raise ConfigError(f"{where}.key_momentum: must be in [0, 1), got {cfg.key_momentum}")
        if sorted(cfg.lr_milestones) != cfg.lr_milestones:
            raise ConfigError(f"{where}.lr_milestones: must be increasing, got {cfg.lr_milestones}")
    if isinstance(cfg, (Stage2Config, VaeConfig)):
        _positive(cfg, where, "lr")
        _positive(cfg, where, "micro_batch", allow_zero=True)
        if len(cfg.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.adam_betas):
            raise ConfigError(f"{where}.adam_betas: expected two numbers in [0, 1), got {cfg.adam_betas}")
        if cfg.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"{where}.lr_schedule: must be one of {', '.join(LR_SCHEDULES)}, got '{cfg.lr_schedule}'")
    if isinstance(cfg, Stage2Config):
        if cfg.optimizer not in ("adam", "adamw"):
            raise ConfigError(f"{where}.optimizer: must be adam or adamw, got '{cfg.optimizer}'")
        if not 0.0 <= cfg.ema_decay < 1.0:
            raise ConfigError(f"{where}.ema_decay: must be in [0, 1), got {cfg.ema_decay}")
        _positive(cfg, where, "val_steps", "val_size")
        _positive(cfg, where, "val_every", "warmup_steps", "grad_clip", "weight_decay", "max_timestep", "min_snr_gamma",
                  allow_zero=True)
        if not 0.0 <= cfg.lr_anchor_fraction <= 1.0:
            raise ConfigError(f"{where}.lr_anchor_fraction: must be in [0, 1], got {cfg.lr_anchor_fraction}")
        from ..degradations import LEVELS

        if cfg.val_level not in LEVELS:
            raise ConfigError(f"{where}.val_level: '{cfg.val_level}' is not one of {', '.join(LEVELS)}")
        from ..runtime.profiles import PROFILES

        if cfg.profile and cfg.profile not in PROFILES:
            raise ConfigError(f"{where}.profile: must be one of {', '.join(PROFILES)} (or empty: the model's), "
                              f"got '{cfg.profile}'")
    if isinstance(cfg, VaeConfig):
        _positive(cfg, where, "l1_weight", "l2_weight", "kl_weight", "scaling_factor", allow_zero=True)
        _positive(cfg, where, "scaling_samples")
        if not 0.0 <= cfg.degraded_fraction <= 1.0:
            raise ConfigError(f"{where}.degraded_fraction: must be in [0, 1], got {cfg.degraded_fraction}")


def degradation_config(data: DataConfig):
    """The Real-ESRGAN configuration with the data section's overrides applied."""
    from ..degradations import DegradationConfig

    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in data.degradation.items()}
    return dataclasses.replace(DegradationConfig(), **overrides)


# ----------------------------------------------------------------------------- files


def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python < 3.11
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(f"{path}: reading TOML on Python < 3.11 needs the 'tomli' package") from None
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None


def load_config(path: str | Path) -> dict[str, Any]:
    """The raw tables of a TOML config file (only the expected top-level tables are allowed)."""
    path = Path(path)
    data = _read_toml(path)
    allowed = set(STAGES) | {"demo", "eval"}
    for key, value in data.items():
        if key not in allowed:
            raise ConfigError(f"{path}: unknown top-level table '{key}'; expected some of {', '.join(sorted(allowed))}")
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: '{key}' must be a table ([{key}])")
    return data


def load_stage_config(path: str | Path, stage: str):
    """The `stage` table of a config file as its dataclass (relative paths stay as written)."""
    path = Path(path)
    data = load_config(path)
    if stage not in data:
        found = ", ".join(f"[{k}]" for k in data) or "nothing"
        raise ConfigError(f"{path}: no [{stage}] table (found {found})")
    return config_from_dict(STAGES[stage], data[stage], f"{path}: {stage}")


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def fingerprint(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# Keys that may differ between the run that wrote a checkpoint and the run resuming it:
# they change how long, how verbosely or where a run goes, not what it computes.
RESUMABLE_CHANGES = frozenset(
    {
        "max_steps",
        "max_minutes",
        "log_every",
        "save_every",
        "keep_last",
        "progress",
        "tensorboard",
        "replica_check",
        "val_every",
        "val_images",
        "val_steps",
        "val_size",
        "val_level",
        "data.num_workers",
        "data.cache_images",
        "out_dir",
        "device",
        "threads",
        "epochs",
    }
)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "degradation":
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ and that a resume may not change."""
    a, b = flatten(saved), flatten(current)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in RESUMABLE_CHANGES and a.get(k, "<absent>") != b.get(k, "<absent>")]
