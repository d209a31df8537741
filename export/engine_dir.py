"""Write an engine directory: every graph as checked ONNX (fp32 and/or fp16) plus manifest.json."""
from __future__ import annotations

import gc
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from deedsr.runtime.contract import MANIFEST, PRECISIONS, ROLES, SCHEMA, SCHEMA_VERSION
from deedsr.runtime.profiles import PROFILES, get_profile
from deedsr.runtime.stale import remove_stale_exports

from deedsr import __version__
from deedsr.models import DeeDSR
from deedsr.schedule import alphas_cumprod

from . import onnx_io, trt_ops
from .graphs import condition_names, graph_specs
from .vae_tiling import VaeTiling

MIN_OPSET, MAX_OPSET = 14, 17


class ExportError(ValueError):
    """An export that cannot be done as asked; one line that says why."""


def _round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


def compute_dims(model: DeeDSR, tile: int, min_size: int, max_size: int, max_batch: int,
                 vae_window: int | None = None) -> dict:
    """min/opt/max of every named dimension, from LR side limits and the latent tile."""
    cfg = model.config
    scale, down, mult = cfg.upscale, cfg.latent_downscale, cfg.latent_multiple
    pixel = mult * down // scale
    if tile % mult:
        raise ExportError(f"--tile must be a multiple of {mult}, got {tile}")
    if not 8 <= min_size <= max_size:
        raise ExportError(f"need 8 <= --min-size <= --max-size, got {min_size} and {max_size}")
    if max_batch < 1:
        raise ExportError("--max-batch must be at least 1")
    opt_lr = min(max(tile * down // scale, min_size), max_size)
    lr = {"min": min_size, "opt": opt_lr, "max": max_size}
    image = {k: _round_up(v, pixel) * scale for k, v in lr.items()}
    # every profile can take every LR size in range (reference-code may pad one multiple more)
    image["max"] = max(get_profile(p).largest_padded_side(max_size, pixel) for p in PROFILES) * scale
    latent = {k: v // down for k, v in image.items()}
    tiles = {"min": min(latent["min"], tile), "opt": min(latent["opt"], tile), "max": tile}
    dims = {"batch": {"min": 1, "opt": 1, "max": max_batch}}
    for name, rng in (("lr", lr), ("image", image), ("latent", latent), ("tile", tiles)):
        dims[f"{name}_height"] = dict(rng)
        dims[f"{name}_width"] = dict(rng)
    if vae_window is not None:  # tiled VAE windows, latent units (runtime/vae_tiling.py)
        window = {"min": min(latent["min"], vae_window), "opt": min(latent["opt"], vae_window), "max": vae_window}
        dims["vae_tile_height"] = dict(window)
        dims["vae_tile_width"] = dict(window)
        # With the tiled VAE the untiled VAE graphs serve only images within one window: their
        # ranges stop there, so that no TensorRT profile asks for a whole-photo attention.
        for name, cap in (("latent", vae_window), ("image", vae_window * down)):
            for side in ("height", "width"):
                rng = dims[f"{name}_{side}"]
                rng["max"] = max(min(rng["max"], cap), rng["min"])
                rng["opt"] = min(rng["opt"], rng["max"])
    return dims


def export_engine_dir(
    model: DeeDSR | Callable[[], DeeDSR],
    out: str | Path,
    *,
    precisions: tuple[str, ...] = PRECISIONS,
    opset: int = 17,
    tile: int | None = None,
    min_size: int = 16,
    max_size: int = 512,
    max_batch: int = 4,
    fuse_denoiser: bool = False,
    vae_tiling: VaeTiling | None = None,
    measure_memory: bool = False,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """`progress(name)` is called as each graph is done. `model` may be a function that loads
    it: the export then holds the only reference and frees the weights (4.5 GB at sd21-base)
    before it measures memory.

    Build in a temporary sibling folder and rename it to `out`: never a half-built directory."""
    out = Path(out)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} is not supported: use {MIN_OPSET}..{MAX_OPSET} (TensorRT 8.5 parses up to 17)")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise ExportError(f"unknown precision {bad or precisions}; choose from {', '.join(PRECISIONS)}")
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to replace it")
    vae_tiling = vae_tiling or VaeTiling()
    vae_tiling.check()
    if not isinstance(model, DeeDSR):
        model = model()
    model = model.eval()
    tile = tile or model.config.sampler.tile
    dims = compute_dims(model, tile, min_size, max_size, max_batch, vae_tiling.window)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_exports(out)  # what killed exports to this name left (runtime/stale.py)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        graphs = {}
        for spec in graph_specs(model, fuse_denoiser):
            graphs[spec.name] = _export_one(spec, tmp, dims, precisions, opset)
            if progress:
                progress(spec.name)
        manifest = build_manifest(model, dims, graphs, opset, tile)
        manifest["vae_tiling"] = vae_tiling.manifest_entry(model)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        del model, spec  # the last references when `model` was a loader: the probes below need the memory
        gc.collect()
        # The runtime's memory model reads these (runtime/memory_model.py); the probes read
        # Linux's /proc (elsewhere the runtime falls back to its rough estimate).
        if measure_memory and sys.platform.startswith("linux"):
            from .memory import measure

            # fp32 is what runs on a CPU, where host memory is the limit (fp16 only when alone)
            measured = [p for p in precisions if p == "fp32"] or list(precisions)
            manifest["memory"] = measure(tmp, measured, fuse_denoiser, progress=progress)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _make_readable(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _make_readable(root: Path) -> None:
    """mkdtemp makes the folder private; an engine directory is meant to be served to others."""
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _export_one(spec, root: Path, dims: dict, precisions, opset: int) -> dict:
    height, width = _example_dims(spec.name, dims)
    torch.manual_seed(0)
    example = spec.example(2, height, width)
    entry = {
        "stage": spec.stage,
        "inputs": [{"name": n, "shape": s} for n, s in spec.inputs],
        "outputs": [{"name": n, "shape": s} for n, s in spec.outputs],
        "precisions": {},
    }
    with tempfile.TemporaryDirectory(dir=root) as scratch:
        scratch = Path(scratch)
        (scratch / "trace").mkdir()
        model = onnx_io.export_graph(spec, scratch / "trace", example, opset)
        fp32 = (root / "fp32" if "fp32" in precisions else scratch) / f"{spec.name}.onnx"
        fp32.parent.mkdir(exist_ok=True)
        data32 = onnx_io.save(model, fp32)
        del model  # its weights were read from the trace, which goes with `scratch`
        written = {"fp32": (fp32, data32)}
        if "fp16" in precisions:
            fp16 = root / "fp16" / f"{spec.name}.onnx"
            fp16.parent.mkdir(exist_ok=True)
            written["fp16"] = (fp16, onnx_io.fp16_file(fp32, fp16))
        for precision in (p for p in ("fp32", "fp16") if p in precisions):
            path, data = written[precision]
            entry["precisions"][precision] = _describe(spec.name, precision, path, data)
    return entry


def _describe(name: str, precision: str, path: Path, data: Path | None) -> dict:
    """Check a written graph and describe it for the manifest."""
    onnx_io.check(path)
    graph = onnx_io.structure(path)
    ops = onnx_io.operators(graph)
    missing = trt_ops.unsupported(ops)
    if missing:
        raise ExportError(f"graph {name} uses operators TensorRT cannot parse: {', '.join(missing)}")
    files = [path] + ([data] if data else [])
    return {
        "file": f"{precision}/{path.name}",
        "external_data": f"{precision}/{data.name}" if data else None,
        "bytes": sum(f.stat().st_size for f in files),
        "sha256": onnx_io.sha256_file(*files),
        "dtypes": onnx_io.io_dtypes(graph),
        "operators": ops,
        "min_tensorrt": trt_ops.min_tensorrt(ops),
    }


def _example_dims(name: str, dims: dict) -> tuple[int, int]:
    prefix = ROLES[name].dims
    return dims[f"{prefix}_height"]["opt"], dims[f"{prefix}_width"]["opt"]


def _versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime

    versions = {"deedsr": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    for name in ("onnxscript", "onnxconverter_common"):
        try:
            versions[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            pass
    return versions


def build_manifest(model: DeeDSR, dims: dict, graphs: dict, opset: int, tile: int) -> dict:
    cfg = model.config
    sched = cfg.scheduler
    sampler = cfg.sampler
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created_by": _versions(),
        "opset": opset,
        "model": {"preset": cfg.preset, "trained": bool(getattr(model, "trained", True)), "config": cfg.to_dict(),
                  "weights_sha256": onnx_io.weights_sha256(model)},
        "image": {
            "upscale": cfg.upscale,
            "latent_downscale": cfg.latent_downscale,
            "latent_multiple": cfg.latent_multiple,
            "latent_channels": cfg.vae["latent_channels"],
            "pixel_multiple": cfg.latent_multiple * cfg.latent_downscale // cfg.upscale,
        },
        "vae": {"scaling_factor": float(cfg.vae["scaling_factor"])},
        "scheduler": {
            "num_train_timesteps": sched.num_train_timesteps,
            "beta_schedule": sched.beta_schedule,
            "beta_start": sched.beta_start,
            "beta_end": sched.beta_end,
            "prediction_type": "epsilon",
            "timestep_spacing": "leading",
            "steps_offset": 1,
            "set_alpha_to_one": False,
            "alphas_cumprod": [float(a) for a in alphas_cumprod(sched)],
        },
        "sampler": {
            "steps": sampler.steps,
            "eta": sampler.eta,
            "noise_guidance_steps": list(sampler.noise_guidance_steps),
            "init": sampler.init,
            "tile": tile,
            "tile_overlap": min(sampler.tile_overlap, tile // 2),
            "tile_weight_variance": 0.01,
            "color_fix": sampler.color_fix,
            "profile": sampler.profile,
        },
        "dims": dims,
        "conditions": condition_names(model),
        "graphs": graphs,
    }
