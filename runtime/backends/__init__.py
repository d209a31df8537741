"""Backends run the graphs of an engine directory by name.

A backend is small: `run(graph, feeds) -> {output name: float32 array}`, with host numpy
arrays in and out; it casts inputs to the dtypes the manifest records for the chosen
precision and outputs back to float32. `denoise(...)` is one epsilon prediction per tile
batch: adapter then UNet (or the fused denoiser graph); a GPU backend overrides it to keep
the adapter's outputs on the device.

- `ort`: onnxruntime; CPUExecutionProvider, or CUDA/TensorRT execution providers when
  onnxruntime-gpu is installed.
- `trt`: TensorRT plans (filled in by the engines stage; a placeholder here).
- `auto`: trt when the engine directory has plans and tensorrt is importable, else ort with
  GPU providers when present, else ort on the CPU.

Nothing here imports onnxruntime or tensorrt until a backend is opened.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from ..errors import EngineError
from ..manifest import Manifest

log = logging.getLogger(__name__)

BACKENDS = ("auto", "ort", "trt")


class Backend:
    """Runs named graphs of one precision of an engine directory."""

    name = "base"
    on_device = False  # True when graphs run on a GPU (fp16 is the natural precision there)

    def __init__(self, manifest: Manifest, precision: str, use_denoiser: bool | None = None):
        self.manifest = manifest
        self.precision = precision
        have_denoiser = manifest.has_graph("denoiser", precision)
        if use_denoiser and not have_denoiser:
            raise EngineError(f"{manifest.root}: no {precision} denoiser graph; re-export with --fuse-denoiser")
        self.use_denoiser = have_denoiser if use_denoiser is None else use_denoiser

    # -- graph calls ------------------------------------------------------------
    def run(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run one graph; host arrays in, float32 host arrays out."""
        raw = self.run_raw(graph, self.cast_inputs(graph, feeds), outputs)
        return {k: v if v.dtype == np.float32 else v.astype(np.float32) for k, v in raw.items()}

    def run_raw(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str] | None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def cast_inputs(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entry = self.manifest.graph_file(graph, self.precision)
        out = {}
        for name, value in feeds.items():
            dtype = entry.dtype(name)
            out[name] = value if value.dtype == dtype and value.flags.c_contiguous else \
                np.ascontiguousarray(value, dtype=dtype)
        return out

    def denoise(self, x_t: np.ndarray, timestep: np.ndarray, z_lr: np.ndarray,
                conditions: dict[str, np.ndarray]) -> np.ndarray:
        """Epsilon for a batch of tiles: the fused denoiser, or the adapter then the UNet."""
        if self.use_denoiser:
            return self.run("denoiser", {"x_t": x_t, "timestep": timestep, "z_lr": z_lr, **conditions})["eps"]
        adapter = self.run_raw("adapter", self.cast_inputs("adapter", {"z_lr": z_lr, "timestep": timestep,
                                                                       **conditions}), None)
        feeds = {"x_t": x_t, "timestep": timestep, **adapter}
        return self.run("unet", feeds, ["eps"])["eps"]

    def per_step_graphs(self) -> list[str]:
        return ["denoiser"] if self.use_denoiser else ["adapter", "unet"]

    def describe(self) -> str:
        return f"{self.name} {self.precision}"

    def close(self) -> None:
        pass


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def has_plans(manifest: Manifest) -> bool:
    folder = Path(manifest.root) / "trt"
    return "trt" in manifest.data or (folder.is_dir() and any(folder.glob("*.plan")))


def gpu_providers() -> list[str]:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]


def choose_precision(manifest: Manifest, precision: str, on_gpu: bool) -> str:
    """`auto`: fp16 on a GPU, fp32 on the CPU (fp16 arithmetic is emulated there and slower),
    else whatever the engine directory has."""
    have = manifest.precisions()
    if precision == "auto":
        preferred = ["fp16", "fp32"] if on_gpu else ["fp32", "fp16"]
        for p in preferred:
            if p in have:
                return p
        raise EngineError(f"{manifest.root}: no complete set of graphs in any precision; re-export")
    if precision not in ("fp32", "fp16"):
        raise EngineError(f"unknown precision '{precision}'; choose auto, fp32 or fp16")
    manifest.check_precision(precision)
    return precision


def open_backend(manifest: Manifest, backend: str = "auto", precision: str = "auto", threads: int | None = None,
                 use_denoiser: bool | None = None) -> Backend:
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if has_plans(manifest) and tensorrt_available():
            backend = "trt"
        else:
            backend = "ort"
    if backend == "trt":
        from .trt import TrtBackend

        return TrtBackend(manifest, choose_precision(manifest, precision, True), use_denoiser=use_denoiser)
    if importlib.util.find_spec("onnxruntime") is None:
        raise EngineError("the ort backend needs onnxruntime: pip install 'deedsr[ort]' (or onnxruntime-gpu)")
    from .ort import OrtBackend

    providers = gpu_providers()
    chosen = choose_precision(manifest, precision, bool(providers))
    manifest.check_files(chosen, list(_needed(manifest, chosen, use_denoiser)))
    return OrtBackend(manifest, chosen, threads=threads, gpu_providers=providers, use_denoiser=use_denoiser)


def _needed(manifest: Manifest, precision: str, use_denoiser: bool | None):
    graphs = ["degradation_learner", "vae_encoder", "vae_decoder"]
    if use_denoiser and not manifest.has_graph("denoiser", precision):
        raise EngineError(f"{manifest.root}: no {precision} denoiser graph; re-export with --fuse-denoiser")
    denoiser = manifest.has_graph("denoiser", precision) if use_denoiser is None else use_denoiser
    return graphs + (["denoiser"] if denoiser else ["adapter", "unet"])
