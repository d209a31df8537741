"""Check every field of a manifest.json before the runtime uses any of it.

`check_manifest(root, data)` raises EngineError with one line that names the field at fault
(`.../manifest.json: image.pixel_multiple must be an integer in 1..4096, got 0; re-export`).
It covers types, signs and ranges, the noise schedule, the dimension ranges, the graph table of
runtime/contract.py (stages and the fixed tensor names, and how the graphs' tensors link), and
that every file the manifest names stays inside the engine directory once symlinks are resolved.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

from .contract import (
    ADAPTER,
    DENOISER,
    LEARNER,
    MANIFEST,
    PRECISIONS,
    REQUIRED_GRAPHS,
    ROLES,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
)
from .errors import BackendError, EngineError
from .imageops import COLOR_FIXES
from .sampler import INITS

DTYPE_NAMES = ("float32", "float16", "int64", "int32")
DIM_NAMES = ("batch", "lr_height", "lr_width", "image_height", "image_width", "latent_height", "latent_width",
             "tile_height", "tile_width")
MAX_SIDE = 1 << 20  # no dimension of any graph is anywhere near a million
MAX_TIMESTEPS = 100_000
MAX_CHANNELS = 1 << 16
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DIGITS = re.compile(r"[1-9][0-9]*")

# Tensors whose channel axis (axis 1) the host relies on: RGB images in and out.
RGB_TENSORS = ((LEARNER, "inputs", "lr"), (VAE_ENCODER, "inputs", "image"), (VAE_DECODER, "outputs", "image"))
# Tensors with the latent's channel count on axis 1.
LATENT_TENSORS = ((VAE_ENCODER, "outputs", "latent"), (VAE_DECODER, "inputs", "latent"), (UNET, "inputs", "x_t"),
                  (UNET, "outputs", "eps"), (ADAPTER, "inputs", "z_lr"), (DENOISER, "inputs", "x_t"),
                  (DENOISER, "inputs", "z_lr"), (DENOISER, "outputs", "eps"))


class _Bad(Exception):
    """A field that fails a check: (field path, what is wrong)."""


def _fail(field: str, problem: str):
    raise _Bad(f"{field} {problem}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _mapping(value: Any, field: str) -> Mapping:
    if not isinstance(value, Mapping):
        _fail(field, f"must be a JSON object, got {_shown(value)}")
    return value


def _get(section: Mapping, key: str, field: str) -> Any:
    if key not in section:
        _fail(field, "is missing")
    return section[key]


def _int(value: Any, field: str, lo: int = 1, hi: int = MAX_SIDE) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field, f"must be an integer in {lo}..{hi}, got {_shown(value)}")
    if not lo <= value <= hi:
        _fail(field, f"must be an integer in {lo}..{hi}, got {value}")
    return value


def _number(value: Any, field: str, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(field, f"must be a finite number, got {_shown(value)}")
    if value < lo or value > hi or (lo_open and value == lo):
        _fail(field, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}")
    return float(value)


def _str(value: Any, field: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str) or not value:
        _fail(field, f"must be a non-empty string, got {_shown(value)}")
    if choices is not None and value not in choices:
        _fail(field, f"must be one of {', '.join(choices)}, got {_shown(value)}")
    return value


def _list(value: Any, field: str) -> list:
    if not isinstance(value, list):
        _fail(field, f"must be a JSON array, got {_shown(value)}")
    return value


# --------------------------------------------------------------------------- paths
def inside(root: Path, relative: Any, field: str) -> Path:
    """`root / relative` when it stays inside `root` after resolving symlinks (else _Bad)."""
    rel = _str(relative, field)
    if "\x00" in rel:
        _fail(field, "contains a NUL character")
    if Path(rel).is_absolute():
        _fail(field, f"is an absolute path ({_shown(rel)}); files must be inside the engine directory")
    try:
        base = root.resolve()
        target = (root / rel).resolve()
    except RuntimeError:  # Python < 3.13 raises this for a symlink loop
        _fail(field, f"({_shown(rel)}) is a symlink loop")
    except OSError as e:
        _fail(field, f"({_shown(rel)}) cannot be resolved ({e.strerror or e})")
    if not target.is_relative_to(base):
        _fail(field, f"({_shown(rel)}) points outside the engine directory (to {target})")
    return target


# --------------------------------------------------------------------------- sections
def _image(data: Mapping) -> dict[str, int]:
    image = _mapping(_get(data, "image", "image"), "image")
    values = {k: _int(_get(image, k, f"image.{k}"), f"image.{k}", 1, 4096)
              for k in ("upscale", "latent_downscale", "latent_multiple", "latent_channels", "pixel_multiple")}
    scaled = values["pixel_multiple"] * values["upscale"]
    if scaled % values["latent_downscale"] or (scaled // values["latent_downscale"]) % values["latent_multiple"]:
        _fail("image.pixel_multiple", f"({values['pixel_multiple']}) x upscale must give whole latent multiples "
              f"(latent_downscale {values['latent_downscale']}, latent_multiple {values['latent_multiple']})")
    return values


def _scheduler(data: Mapping) -> int:
    sched = _mapping(_get(data, "scheduler", "scheduler"), "scheduler")
    steps = _int(_get(sched, "num_train_timesteps", "scheduler.num_train_timesteps"),
                 "scheduler.num_train_timesteps", 1, MAX_TIMESTEPS)
    if "steps_offset" in sched:
        _int(sched["steps_offset"], "scheduler.steps_offset", 0, steps - 1)
    if "prediction_type" in sched:
        _str(sched["prediction_type"], "scheduler.prediction_type")
    for key in ("beta_start", "beta_end"):
        if key in sched:
            _number(sched[key], f"scheduler.{key}", 0.0, 1.0, lo_open=True)
    if "beta_schedule" in sched:
        _str(sched["beta_schedule"], "scheduler.beta_schedule")
    # What this runtime's DDIM implements (runtime/sampler.py); another value would sample differently.
    if "timestep_spacing" in sched:
        _str(sched["timestep_spacing"], "scheduler.timestep_spacing", ("leading",))
    if "set_alpha_to_one" in sched and sched["set_alpha_to_one"] is not False:
        _fail("scheduler.set_alpha_to_one", f"must be false (the final step uses alphas_cumprod[0]), got "
              f"{_shown(sched['set_alpha_to_one'])}")
    field = "scheduler.alphas_cumprod"
    alphas = _list(_get(sched, "alphas_cumprod", field), field)
    if len(alphas) != steps:
        _fail(field, f"has {len(alphas)} entries, scheduler.num_train_timesteps is {steps}")
    previous = 1.0
    for i, a in enumerate(alphas):
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            _fail(f"{field}[{i}]", f"must be a finite number, got {_shown(a)}")
        if not 0.0 < a < 1.0 or a < 1.2e-38:  # float32 keeps it above zero
            _fail(f"{field}[{i}]", f"must be in (0, 1), got {a}")
        if a >= previous:
            _fail(f"{field}[{i}]", f"({a}) must be less than the entry before it ({previous}): "
                  "cumulative alphas decrease")
        previous = a
    return steps


def _dims(data: Mapping) -> dict[str, tuple[int, int, int]]:
    dims = _mapping(_get(data, "dims", "dims"), "dims")
    out = {}
    for name in DIM_NAMES:
        _get(dims, name, f"dims.{name}")
    for name, rng in dims.items():
        field = f"dims.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            _fail(field, "is not a dimension name")
        rng = _mapping(rng, field)
        lo, opt, hi = (_int(_get(rng, k, f"{field}.{k}"), f"{field}.{k}") for k in ("min", "opt", "max"))
        if not lo <= opt <= hi:
            _fail(field, f"must have 1 <= min <= opt <= max, got {lo}, {opt}, {hi}")
        out[name] = (lo, opt, hi)
    return out


def _sampler(data: Mapping, image: dict[str, int], dims: dict, train_steps: int, steps_offset: int) -> None:
    sampler = _mapping(_get(data, "sampler", "sampler"), "sampler")
    steps = _int(_get(sampler, "steps", "sampler.steps"), "sampler.steps", 1, train_steps)
    if (steps - 1) * (train_steps // steps) + steps_offset >= train_steps:
        _fail("sampler.steps", f"({steps}) cannot be spaced over {train_steps} training timesteps")
    _number(_get(sampler, "eta", "sampler.eta"), "sampler.eta", 0.0, 1.0)
    guided = _list(_get(sampler, "noise_guidance_steps", "sampler.noise_guidance_steps"),
                   "sampler.noise_guidance_steps")
    for i, g in enumerate(guided):
        _int(g, f"sampler.noise_guidance_steps[{i}]", -steps, steps - 1)
    _str(_get(sampler, "init", "sampler.init"), "sampler.init", INITS)
    _str(_get(sampler, "color_fix", "sampler.color_fix"), "sampler.color_fix", COLOR_FIXES)
    tile = _int(_get(sampler, "tile", "sampler.tile"), "sampler.tile")
    if tile % image["latent_multiple"]:
        _fail("sampler.tile", f"({tile}) must be a multiple of image.latent_multiple ({image['latent_multiple']})")
    top = min(dims["tile_height"][2], dims["tile_width"][2])
    if tile > top:
        _fail("sampler.tile", f"({tile}) is larger than the tiles the graphs take (dims tile max {top})")
    _int(_get(sampler, "tile_overlap", "sampler.tile_overlap"), "sampler.tile_overlap", 0, tile - 1)
    if "tile_weight_variance" in sampler:
        _number(sampler["tile_weight_variance"], "sampler.tile_weight_variance", 0.0, 100.0, lo_open=True)


def _shape(shape: Any, field: str, dims: Mapping) -> list:
    shape = _list(shape, field)
    if not shape:
        _fail(field, "must list at least one axis")
    for i, entry in enumerate(shape):
        where = f"{field}[{i}]"
        if isinstance(entry, bool) or not isinstance(entry, (int, str)):
            _fail(where, f"must be an integer or a dimension expression, got {_shown(entry)}")
        if isinstance(entry, int):
            _int(entry, where, 1, MAX_SIDE)
            continue
        for token in re.split(r"[*/]", entry):
            token = token.strip()
            if not (_DIGITS.fullmatch(token) or token in dims):
                _fail(where, f"({_shown(entry)}) uses {_shown(token)}, which is neither a number nor a dimension "
                      "in dims")
    return shape


def _tensors(graph: Mapping, key: str, field: str, dims: Mapping) -> dict[str, list]:
    tensors = {}
    for i, t in enumerate(_list(_get(graph, key, f"{field}.{key}"), f"{field}.{key}")):
        where = f"{field}.{key}[{i}]"
        t = _mapping(t, where)
        name = _str(_get(t, "name", f"{where}.name"), f"{where}.name")
        if name in tensors:
            _fail(f"{where}.name", f"repeats {name!r}")
        tensors[name] = _shape(_get(t, "shape", f"{where}.shape"), f"{where}.shape", dims)
    return tensors


def _precision_entry(root: Path, entry: Any, field: str) -> None:
    entry = _mapping(entry, field)
    inside(root, _get(entry, "file", f"{field}.file"), f"{field}.file")
    if entry.get("external_data") is not None:
        inside(root, entry["external_data"], f"{field}.external_data")
    _int(_get(entry, "bytes", f"{field}.bytes"), f"{field}.bytes", 1, 1 << 50)
    digest = _get(entry, "sha256", f"{field}.sha256")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        _fail(f"{field}.sha256", f"must be 64 lower-case hex digits, got {_shown(digest)}")
    dtypes = _mapping(entry.get("dtypes", {}), f"{field}.dtypes")
    for tensor, dtype in dtypes.items():
        _str(dtype, f"{field}.dtypes.{tensor}", DTYPE_NAMES)


def _graphs(root: Path, data: Mapping, dims: Mapping, image: dict[str, int]) -> None:
    graphs = _mapping(_get(data, "graphs", "graphs"), "graphs")
    for name in REQUIRED_GRAPHS:
        _get(graphs, name, f"graphs.{name}")
    io: dict[str, tuple[dict, dict]] = {}
    for name, graph in graphs.items():
        field = f"graphs.{name}"
        role = ROLES.get(name)
        if role is None:
            _fail(field, f"is not a graph of this schema ({', '.join(ROLES)})")
        graph = _mapping(graph, field)
        stage = _str(_get(graph, "stage", f"{field}.stage"), f"{field}.stage")
        if stage != role.stage:
            _fail(f"{field}.stage", f"must be {role.stage!r}, got {stage!r}")
        inputs = _tensors(graph, "inputs", field, dims)
        outputs = _tensors(graph, "outputs", field, dims)
        for key, have, want in (("inputs", inputs, role.inputs), ("outputs", outputs, role.outputs)):
            missing = [t for t in want if t not in have]
            if missing:
                _fail(f"{field}.{key}", f"lack {', '.join(missing)} (the contract's names)")
        precisions = _mapping(_get(graph, "precisions", f"{field}.precisions"), f"{field}.precisions")
        for precision, entry in precisions.items():
            if precision not in PRECISIONS:
                _fail(f"{field}.precisions", f"has {_shown(precision)}; precisions are {', '.join(PRECISIONS)}")
            _precision_entry(root, entry, f"{field}.precisions.{precision}")
        io[name] = (inputs, outputs)
    _links(data, io, image)


def _links(data: Mapping, io: dict[str, tuple[dict, dict]], image: dict[str, int]) -> None:
    """The tensor names that pass from graph to graph, and the channels the host relies on."""
    conditions = _list(_get(data, "conditions", "conditions"), "conditions")
    for i, c in enumerate(conditions):
        _str(c, f"conditions[{i}]")
    if len(set(conditions)) != len(conditions):
        _fail("conditions", "repeat a name")
    cond = set(conditions)

    def need(graph: str, key: str, names: set[str], exact: bool = True) -> None:
        if graph not in io:
            return
        have = set(io[graph][0 if key == "inputs" else 1])
        if (have != names) if exact else not names <= have:
            extra, lack = sorted(have - names), sorted(names - have)
            what = "; ".join(x for x in (f"unexpected {', '.join(extra)}" if extra and exact else "",
                                         f"lack {', '.join(lack)}" if lack else "") if x)
            _fail(f"graphs.{graph}.{key}", f"do not match the contract and conditions ({what})")

    need(LEARNER, "outputs", {*ROLES[LEARNER].outputs, *cond})
    need(VAE_ENCODER, "inputs", set(ROLES[VAE_ENCODER].inputs))
    need(VAE_DECODER, "inputs", set(ROLES[VAE_DECODER].inputs))
    need(VAE_DECODER, "outputs", set(ROLES[VAE_DECODER].outputs))
    need(ADAPTER, "inputs", {*ROLES[ADAPTER].inputs, *cond})
    if ADAPTER in io:
        need(UNET, "inputs", {*ROLES[UNET].inputs, *io[ADAPTER][1]})
    need(UNET, "outputs", set(ROLES[UNET].outputs))
    need(DENOISER, "inputs", {*ROLES[DENOISER].inputs, *cond})
    need(DENOISER, "outputs", set(ROLES[DENOISER].outputs))
    _latent_scale(io, image)
    for graph, key, tensor, channels in ([(*t, 3) for t in RGB_TENSORS]
                                         + [(*t, image["latent_channels"]) for t in LATENT_TENSORS]):
        if graph not in io:
            continue
        shape = io[graph][0 if key == "inputs" else 1][tensor]
        index = 0 if key == "inputs" else 1
        field = f"graphs.{graph}.{key}[{list(io[graph][index]).index(tensor)}].shape"
        if len(shape) != 4 or shape[1] != channels:
            _fail(field, f"of {tensor!r} must be [batch, {channels}, height, width], got {_shown(shape)}")


def _latent_scale(io: dict[str, tuple[dict, dict]], image: dict[str, int]) -> None:
    """The VAE graphs' spatial axes must scale by image.latent_downscale, as the host assumes."""
    from .manifest import eval_dim

    d = image["latent_downscale"]
    side = image["pixel_multiple"] * image["upscale"] * 7  # any valid image side
    for graph, key, tensor, names, value, want in (
            (VAE_ENCODER, "outputs", "latent", ("image_height", "image_width"), side, side // d),
            (VAE_DECODER, "outputs", "image", ("latent_height", "latent_width"), side // d, side)):
        if graph not in io or tensor not in io[graph][1]:
            continue
        shape = io[graph][1][tensor]
        env = {n: value for n in names}
        for axis, name in ((2, names[0]), (3, names[1])):
            try:
                got = eval_dim(shape[axis], env) if len(shape) == 4 else None
            except (KeyError, ValueError):
                got = None
            if got != want:
                _fail(f"graphs.{graph}.{key}[{list(io[graph][1]).index(tensor)}].shape",
                      f"axis {axis} ({_shown(shape[axis] if len(shape) > axis else None)}) does not scale by "
                      f"image.latent_downscale ({d})")


def _optional(root: Path, data: Mapping) -> None:
    """Sections the runtime reads only in part: their types, and the plan files' paths."""
    if "opset" in data:
        _int(data["opset"], "opset", 1, 1000)
    if "created_by" in data:
        for k, v in _mapping(data["created_by"], "created_by").items():
            _str(v, f"created_by.{k}")
    vae = _mapping(_get(data, "vae", "vae"), "vae")
    _number(_get(vae, "scaling_factor", "vae.scaling_factor"), "vae.scaling_factor", 0.0, 1e6, lo_open=True)
    if "model" in data:
        model = _mapping(data["model"], "model")
        if "preset" in model:
            _str(model["preset"], "model.preset")
        config = _mapping(model.get("config", {}), "model.config")
        vae_cfg = config.get("vae", {})
        if vae_cfg:  # the memory estimate reads the VAE's widths
            vae_cfg = _mapping(vae_cfg, "model.config.vae")
            if "block_out_channels" in vae_cfg:
                widths = _list(vae_cfg["block_out_channels"], "model.config.vae.block_out_channels")
                if not widths:
                    _fail("model.config.vae.block_out_channels", "must not be empty")
                for i, w in enumerate(widths):
                    _int(w, f"model.config.vae.block_out_channels[{i}]", 1, MAX_CHANNELS)
    if "trt" in data:
        trt = _mapping(data["trt"], "trt")
        if "timing_cache" in trt and trt["timing_cache"] is not None:
            inside(root, trt["timing_cache"], "trt.timing_cache")
        for graph, record in _mapping(trt.get("plans", {}), "trt.plans").items():
            record = _mapping(record, f"trt.plans.{graph}")
            if "file" in record:
                inside(root, record["file"], f"trt.plans.{graph}.file")


def check_manifest(root: Path, data: Mapping) -> None:
    """Raise EngineError naming the first field of manifest.json that the runtime cannot use."""
    try:
        image = _image(data)
        train_steps = _scheduler(data)
        dims = _dims(data)
        _sampler(data, image, dims, train_steps, int(data["scheduler"].get("steps_offset", 1)))
        _graphs(root, data, dims, image)
        _optional(root, data)
    except _Bad as e:
        raise EngineError(f"{root / MANIFEST}: {e}; re-export") from None



# ------------------------------------------------------------------- call options
def check_noise_guidance(steps: int, indices) -> None:
    """Noise-guided step indices must name steps of this run (negative: counted from the end)."""
    bad = [i for i in indices if not -steps <= i < steps]
    if bad:
        raise ValueError(f"noise guidance step {bad[0]} is outside 0..{steps - 1} (or -{steps}..-1 from the end) "
                         f"for {steps} steps")


def default_overlap(tile: int, model_overlap: int) -> int:
    """The overlap for a tile given without one: the model's, at most half the tile."""
    return max(0, min(int(model_overlap), int(tile) // 2))


# ------------------------------------------------------------------- graph results
def check_latent(latent, what: str = "the sampled latent") -> None:
    """A latent with NaN or inf would decode to a black or garbage image that looks like success."""
    import numpy as np

    if not np.isfinite(latent).all():
        raise BackendError(f"{what} has NaN or inf values (corrupt graphs or schedule); re-export the engine "
                           "directory")


def check_decoded(decoded, latent_shape, downscale: int) -> None:
    """The VAE decoder's image must be RGB at the latent's size x latent_downscale."""
    n, _, h, w = latent_shape
    want = (n, 3, h * downscale, w * downscale)
    if tuple(decoded.shape) != want:
        raise BackendError(f"{VAE_DECODER} returned shape {tuple(decoded.shape)}, expected {want}; re-export the "
                           "engine directory")
    check_latent(decoded, f"the {VAE_DECODER} output")
