"""Backends run the graphs of an engine directory by name.

A backend is small: `run(graph, feeds) -> {output name: float32 array}`, with host numpy
arrays in and out; it casts inputs to the dtypes the manifest records for the chosen
precision and outputs back to float32. `denoise(...)` is one epsilon prediction per tile
batch: adapter then UNet (or the fused denoiser graph); a GPU backend overrides it to keep
the adapter's outputs on the device.

- `ort`: onnxruntime; CPUExecutionProvider, or CUDA/TensorRT execution providers when
  onnxruntime-gpu is installed.
- `trt`: TensorRT plans built by `deedsr-export build-engines` (trt.py; CUDA calls in cuda.py,
  TensorRT version differences in trt_api.py).
- `auto`: trt when the engine directory has plans, tensorrt imports and an NVIDIA GPU is
  visible, else ort with GPU providers when present, else ort on the CPU.

Nothing here imports onnxruntime or tensorrt until a backend is opened.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from ..contract import ADAPTER, DENOISER, UNET, step_graphs
from ..errors import EngineError
from ..manifest import Manifest

log = logging.getLogger(__name__)

BACKENDS = ("auto", "ort", "trt")


class Backend:
    """Runs named graphs of one precision of an engine directory."""

    name = "base"
    on_device = False  # True when graphs run on a GPU (fp16 is the natural precision there)

    def __init__(self, manifest: Manifest, precision: str, use_denoiser: bool):
        self.manifest = manifest
        self.precision = precision
        self.use_denoiser = use_denoiser

    # -- graph calls ------------------------------------------------------------
    def run(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run one graph; host arrays in, float32 host arrays out."""
        raw = self.run_raw(graph, self.cast_inputs(graph, feeds), outputs)
        return {k: v if v.dtype == np.float32 else v.astype(np.float32) for k, v in raw.items()}

    def run_raw(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str] | None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def input_dtype(self, graph: str, tensor: str) -> np.dtype:
        """The dtype the graph takes for this input (the manifest's record by default)."""
        return self.manifest.graph_file(graph, self.precision).dtype(tensor)

    def cast_inputs(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for name, value in feeds.items():
            dtype = self.input_dtype(graph, name)
            out[name] = value if value.dtype == dtype and value.flags.c_contiguous else \
                np.ascontiguousarray(value, dtype=dtype)
        return out

    def denoise(self, x_t: np.ndarray, timestep: np.ndarray, z_lr: np.ndarray,
                conditions: dict[str, np.ndarray]) -> np.ndarray:
        """Epsilon for a batch of tiles: the fused denoiser, or the adapter then the UNet."""
        if self.use_denoiser:
            return self.run(DENOISER, {"x_t": x_t, "timestep": timestep, "z_lr": z_lr, **conditions})["eps"]
        adapter = self.run_raw(ADAPTER, self.cast_inputs(ADAPTER, {"z_lr": z_lr, "timestep": timestep,
                                                                   **conditions}), None)
        feeds = {"x_t": x_t, "timestep": timestep, **adapter}
        return self.run(UNET, feeds, ["eps"])["eps"]

    def per_step_graphs(self) -> list[str]:
        return list(step_graphs(self.use_denoiser))

    def graphs(self) -> list[str]:
        """Every graph an image needs, in call order."""
        return self.manifest.graphs_for(self.precision, self.use_denoiser)

    def preload(self) -> None:
        """Load every graph now rather than on first use."""

    def loaded_bytes(self) -> int:
        """Bytes of graph files already resident (all of them unless a backend loads lazily)."""
        return sum(self.manifest.graph_file(g, self.precision).bytes or 0 for g in self.graphs())

    def check_shapes(self, env: dict[str, int]) -> None:
        """Raise ShapeError when named dimensions fall outside what this backend's graphs take
        (beyond the manifest's ranges, which the Upscaler checks)."""

    def describe(self) -> str:
        return f"{self.name} {self.precision}"

    def close(self) -> None:
        pass


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def trt_usable() -> bool:
    """TensorRT imports (binding and native libraries) and the driver shows a GPU: what
    `--backend auto` needs before it picks the plans over onnxruntime."""
    if not tensorrt_available():
        return False
    from .cuda import gpu_identity
    from .trt_api import import_tensorrt

    try:
        import_tensorrt()
        gpu_identity()
    except EngineError as e:
        log.info("TensorRT plans present but not usable here (%s); using onnxruntime", e)
        return False
    return True


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
        if has_plans(manifest) and trt_usable():
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
    manifest.check_files(chosen, manifest.graphs_for(chosen, use_denoiser))
    return OrtBackend(manifest, chosen, threads=threads, gpu_providers=providers, use_denoiser=use_denoiser)

