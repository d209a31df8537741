"""Check a DeeDSR config (a checkpoint's config.json "config") before anything is built from it.

`check_config_dict(data)` raises ValueError with one line naming the field: a wrong type, a sign,
a zero, a count the layers cannot divide (heads, norm groups), an unknown key of the UNet or VAE
(they go to diffusers as keyword arguments), or a size nothing could allocate. Sizes are capped:
any channel count at MAX_CHANNELS, and the whole model at MAX_PARAMETERS by a rough estimate
(4 % under the real count for sd21-base, 1.15e9, 23 % under for tiny), so a typo such as
`base_channels: 3200000` is one line instead of "can't allocate 16 TB".
"""
from __future__ import annotations

import math
from typing import Any, Mapping

MAX_CHANNELS = 8192
MAX_LEVELS = 8
MAX_LAYERS = 64
MAX_TIMESTEPS = 100_000
MAX_PARAMETERS = 20_000_000_000  # 80 GB of fp32 weights; sd21-base is 1.1e9

UNET_KEYS = {"sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
             "layers_per_block", "attention_head_dim", "cross_attention_dim", "use_linear_projection",
             "norm_num_groups", "flip_sin_to_cos", "freq_shift"}
VAE_KEYS = {"in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
            "layers_per_block", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor"}


class _Bad(ValueError):
    pass


def _fail(field: str, problem: str):
    raise _Bad(f"config {field} {problem}")


def _int(value: Any, field: str, lo: int = 1, hi: int = MAX_CHANNELS) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field, f"must be an integer in {lo}..{hi}, got {value!r:.40}")
    if not lo <= value <= hi:
        _fail(field, f"must be an integer in {lo}..{hi}, got {value}")
    return value


def _ints(value: Any, field: str, lo: int = 1, hi: int = MAX_CHANNELS, max_len: int = MAX_LEVELS,
          min_len: int = 1) -> list[int]:
    if not isinstance(value, (list, tuple)):
        _fail(field, f"must be a list of integers, got {value!r:.40}")
    if not min_len <= len(value) <= max_len:
        _fail(field, f"must have {min_len}..{max_len} entries, got {len(value)}")
    return [_int(v, f"{field}[{i}]", lo, hi) for i, v in enumerate(value)]


def _number(value: Any, field: str, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(field, f"must be a finite number, got {value!r:.40}")
    if value < lo or value > hi or (lo_open and value == lo):
        _fail(field, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}")
    return float(value)


def _strs(value: Any, field: str, length: int) -> None:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        _fail(field, f"must be a list of block names, got {value!r:.40}")
    if len(value) != length:
        _fail(field, f"has {len(value)} entries, block_out_channels has {length}")


def _section(data: Mapping, key: str) -> Mapping | None:
    if key not in data:
        return None
    if not isinstance(data[key], Mapping):
        _fail(key, f"must be a mapping, got {type(data[key]).__name__}")
    return data[key]


def _divides(groups: int, channels: int, field: str, what: str) -> None:
    if channels % groups:
        _fail(field, f"({groups}) must divide the {what} ({channels})")


def _learner(s: Mapping) -> int:
    stem = _int(s.get("stem_channels", 64), "learner.stem_channels")
    widths = _ints(s.get("widths", (128, 256, 512, 1024)), "learner.widths")
    blocks = _ints(s.get("blocks", (3, 4, 6, 3)), "learner.blocks", hi=MAX_LAYERS)
    if len(blocks) != len(widths):
        _fail("learner.blocks", f"has {len(blocks)} entries, learner.widths has {len(widths)}")
    return 147 * stem + sum(18 * b * w * w for b, w in zip(blocks, widths))


def _adapter(s: Mapping) -> int:
    base = _int(s.get("base_channels", 256), "adapter.base_channels")
    mult = _ints(s.get("channel_mult", (1, 1, 2, 2)), "adapter.channel_mult", hi=64)
    _int(s.get("in_channels", 4), "adapter.in_channels", hi=64)
    heads = _int(s.get("num_heads", 4), "adapter.num_heads", hi=256)
    groups = _int(s.get("norm_groups", 32), "adapter.norm_groups", hi=1024)
    local = _int(s.get("local_channels", 256), "adapter.local_channels")
    _int(s.get("degradation_dim", 1024), "adapter.degradation_dim")
    reduction = _int(s.get("da_reduction", 32), "adapter.da_reduction", hi=MAX_CHANNELS)
    _ints(s.get("attention_levels", (0, 1, 2)), "adapter.attention_levels", lo=0, hi=len(mult) - 1, min_len=0)
    _number(s.get("dropout", 0.0), "adapter.dropout", 0.0, 1.0)
    channels = [m * base for m in mult]
    for c in channels:
        if c > MAX_CHANNELS:
            _fail("adapter.base_channels", f"x channel_mult gives {c} channels, more than {MAX_CHANNELS}")
        _divides(groups, c, "adapter.norm_groups", "level channels")
        _divides(heads, c, "adapter.num_heads", "level channels")
        if c // reduction < 1:
            _fail("adapter.da_reduction", f"({reduction}) leaves no channels of {c}")
    _divides(groups, local, "adapter.norm_groups", "local channels")
    return sum(60 * c * c for c in channels) + 16 * base * base


def _blocks(s: Mapping, name: str, keys: set[str]) -> tuple[list[int], int]:
    unknown = sorted(set(s) - keys)
    if unknown:
        _fail(f"{name}.{unknown[0]}", "is not a key this model takes")
    widths = _ints(s.get("block_out_channels"), f"{name}.block_out_channels")
    layers = _int(s.get("layers_per_block"), f"{name}.layers_per_block", hi=MAX_LAYERS)
    groups = _int(s.get("norm_num_groups"), f"{name}.norm_num_groups", hi=1024)
    for c in widths:
        _divides(groups, c, f"{name}.norm_num_groups", "block channels")
    for key in ("in_channels", "out_channels", "sample_size"):
        if key in s:
            _int(s[key], f"{name}.{key}", hi=4096)
    for key in ("down_block_types", "up_block_types"):
        if key in s:
            _strs(s[key], f"{name}.{key}", len(widths))
    return widths, layers


def _unet(s: Mapping) -> int:
    widths, layers = _blocks(s, "unet", UNET_KEYS)
    _int(s.get("cross_attention_dim"), "unet.cross_attention_dim")
    heads = s.get("attention_head_dim")
    heads = [heads] * len(widths) if isinstance(heads, int) and not isinstance(heads, bool) else heads
    heads = _ints(heads, "unet.attention_head_dim", hi=MAX_CHANNELS)
    if len(heads) != len(widths):
        _fail("unet.attention_head_dim", f"has {len(heads)} entries, block_out_channels has {len(widths)}")
    for h, c in zip(heads, widths):
        _divides(h, c, "unet.attention_head_dim", "block channels")
    if "freq_shift" in s:
        _int(s["freq_shift"], "unet.freq_shift", lo=0, hi=16)
    for key in ("use_linear_projection", "flip_sin_to_cos"):
        if key in s and not isinstance(s[key], bool):
            _fail(f"unet.{key}", f"must be true or false, got {s[key]!r:.40}")
    return 80 * (layers + 1) * sum(c * c for c in widths)


def _vae(s: Mapping) -> int:
    widths, layers = _blocks(s, "vae", VAE_KEYS)
    _int(s.get("latent_channels"), "vae.latent_channels", hi=64)
    _number(s.get("scaling_factor"), "vae.scaling_factor", 0.0, 1000.0, lo_open=True)
    return 36 * (layers + 1) * sum(c * c for c in widths)


def _scheduler(s: Mapping) -> int:
    steps = _int(s.get("num_train_timesteps", 1000), "scheduler.num_train_timesteps", hi=MAX_TIMESTEPS)
    start = _number(s.get("beta_start", 0.00085), "scheduler.beta_start", 0.0, 1.0, lo_open=True)
    end = _number(s.get("beta_end", 0.012), "scheduler.beta_end", 0.0, 1.0, lo_open=True)
    if end < start:
        _fail("scheduler.beta_end", f"({end}) must not be less than beta_start ({start})")
    if not isinstance(s.get("beta_schedule", "scaled_linear"), str):
        _fail("scheduler.beta_schedule", "must be a string")
    return steps


def _sampler(s: Mapping, train_steps: int) -> None:
    steps = _int(s.get("steps", 50), "sampler.steps", hi=train_steps)
    _number(s.get("eta", 1.0), "sampler.eta", 0.0, 1.0)
    guided = s.get("noise_guidance_steps", (0,))
    _ints(guided, "sampler.noise_guidance_steps", lo=-steps, hi=steps - 1, max_len=steps, min_len=0)
    tile = _int(s.get("tile", 64), "sampler.tile", hi=4096)
    _int(s.get("tile_overlap", 32), "sampler.tile_overlap", lo=0, hi=tile - 1)
    for key, choices in (("init", ("noise", "lr")), ("color_fix", ("none", "adain", "wavelet"))):
        if key in s and s[key] not in choices:
            _fail(f"sampler.{key}", f"must be one of {', '.join(choices)}, got {s[key]!r:.40}")


def check_config_dict(data: Mapping) -> None:
    """Raise ValueError naming the first field of a DeeDSRConfig dict that cannot be built."""
    if not isinstance(data, Mapping):
        raise ValueError(f"config must be a mapping, got {type(data).__name__}")
    total = 0
    for key, check in (("learner", _learner), ("adapter", _adapter), ("unet", _unet), ("vae", _vae)):
        section = _section(data, key)
        if section is not None:
            total += check(section)
    train_steps = 1000
    section = _section(data, "scheduler")
    if section is not None:
        train_steps = _scheduler(section)
    section = _section(data, "sampler")
    if section is not None:
        _sampler(section, train_steps)
    if "modulation_hidden" in data:
        _int(data["modulation_hidden"], "modulation_hidden")
    if "upscale" in data:
        _int(data["upscale"], "upscale", hi=16)
    if "preset" in data and not isinstance(data["preset"], str):
        _fail("preset", "must be a string")
    if total > MAX_PARAMETERS:
        raise ValueError(f"config describes about {total:.2e} parameters, more than the {MAX_PARAMETERS:.0e} this "
                         "tool builds (sd21-base is 1.1e9); a channel count is probably wrong")
