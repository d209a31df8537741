"""TensorRT backend: runs the plans `deedsr-export build-engines DIR` writes into DIR/trt/.

Plan records (manifest.json, top-level "trt" section; docs/engine-directory.md): one per graph
with the TensorRT version and the GPU (name, compute capability) it was built for, precision,
build mode, profile shapes and flags. A plan runs only with that TensorRT version on that GPU;
anything else is refused with one line that says how to rebuild. The pure helpers at the top
(`plan_records`, `plan_mismatch`, `gpu_identity`) import no TensorRT; the engines stage uses
them too, so that builder and runtime agree on what "compatible" means.

Execution uses only the name-based tensor API common to TensorRT 8.5 .. 11: num_io_tensors,
get_tensor_name/mode/dtype, set_input_shape, get_tensor_shape, set_tensor_address,
execute_async_v3, all on one CUDA stream.

- Device memory: plain device buffers through libcudart as loaded by polygraphy.cuda (no
  torch). Execution contexts are created without their own activation memory
  (ExecutionContextAllocationStrategy.USER_MANAGED, or
  create_execution_context_without_device_memory before TensorRT 10) and all share one
  scratch buffer, sized with device_memory_size_v2 where it exists (>= 10.1), else
  device_memory_size, and per call with update_device_memory_size_for_shapes where it exists.
- Per step only x_t, z_lr, the timestep and the conditions go up and eps comes down: the
  adapter writes its local maps and tokens into device buffers that are bound, unchanged, as
  the UNet's inputs.
- CUDA graphs (cuda-python): with static-tile plans (`build-engines --static`) a step's
  adapter+UNet (or denoiser) launches are captured once per input shape, in execution
  contexts of their own, and replayed. $DEEDSR_TRT_CUDA_GRAPHS=1/0 forces them on/off.
- Host maths stays the runtime's numpy sampler.

Thread safety: every graph call holds one lock (one stream, shared buffers).

This file cannot be exercised without an NVIDIA GPU and TensorRT; scripts/gpu_check.sh runs it
end to end (and tests/test_engines.py's `gpu` tests) where both exist.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import math
import os
import sys
import threading
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..errors import BackendError, EngineError, InsufficientMemory, ShapeError
from ..manifest import Manifest, eval_shape
from . import Backend

log = logging.getLogger(__name__)

PLANS_KEY = "trt"  # manifest.json section written by the engines stage
ENV_CUDA_GRAPHS = "DEEDSR_TRT_CUDA_GRAPHS"
PER_IMAGE = ("degradation_learner", "vae_encoder", "vae_decoder")
MAX_CAPTURES = 8  # CUDA graphs kept per backend (one per step input shape)


# ================================================================ pure helpers (no TensorRT)
def rebuild_command(root) -> str:
    return f"deedsr-export build-engines {root} --force"


def plan_records(data: Mapping) -> dict[str, dict]:
    """{graph: plan record} from a manifest's "trt" section ({} when there is none)."""
    section = data.get(PLANS_KEY) if isinstance(data, Mapping) else None
    plans = section.get("plans") if isinstance(section, Mapping) else None
    return {str(k): dict(v) for k, v in plans.items() if isinstance(v, Mapping)} if isinstance(plans, Mapping) else {}


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "major.minor"
    memory: int | None = None  # bytes

    def describe(self) -> str:
        return f"{self.name} (sm {self.compute_capability})"

    def record(self) -> dict:
        return {"name": self.name, "compute_capability": self.compute_capability, "memory": self.memory}


def plan_mismatch(record: Mapping, tensorrt_version: str, gpu: GpuInfo) -> str | None:
    """Why a plan cannot run with this TensorRT on this GPU; None when it can.

    Plans are tied to the exact TensorRT version and to the GPU: both must equal the record's."""
    built = str(record.get("tensorrt") or "")
    built_gpu = record.get("gpu") if isinstance(record.get("gpu"), Mapping) else {}
    name, cc = str(built_gpu.get("name") or ""), str(built_gpu.get("compute_capability") or "")
    if not built or not name or not cc:
        return "its record in manifest.json does not say which TensorRT version and GPU it was built for"
    if built == str(tensorrt_version) and name == gpu.name and cc == gpu.compute_capability:
        return None
    return (f"built with TensorRT {built} for {name} (sm {cc}), but this machine has TensorRT "
            f"{tensorrt_version} and {gpu.describe()}")


def _libcuda():
    names = ["nvcuda.dll"] if sys.platform.startswith("win") else ["libcuda.so.1", "libcuda.so"]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def gpu_identity(ordinal: int = 0, otherwise: str = "on this machine use --backend ort") -> GpuInfo:
    """Name, compute capability and memory of CUDA device `ordinal` (after CUDA_VISIBLE_DEVICES),
    read from the driver (libcuda) with ctypes: no torch, no CUDA toolkit needed.
    Raises EngineError (one line, ending in `otherwise`) when there is no driver or no GPU."""
    lib = _libcuda()
    if lib is None:
        raise EngineError(f"no NVIDIA driver found (libcuda): TensorRT plans need an NVIDIA GPU; {otherwise}")
    rc = lib.cuInit(0)
    if rc == 100:  # CUDA_ERROR_NO_DEVICE
        raise EngineError(f"no NVIDIA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES); {otherwise}")
    if rc != 0:
        raise EngineError(f"the NVIDIA driver failed to initialise (CUDA driver error {rc}); check nvidia-smi; "
                          f"{otherwise}")
    count = ctypes.c_int(0)
    lib.cuDeviceGetCount(ctypes.byref(count))
    if ordinal >= count.value:
        raise EngineError(f"no CUDA device {ordinal} ({count.value} visible); check CUDA_VISIBLE_DEVICES")
    device = ctypes.c_int(0)
    if lib.cuDeviceGet(ctypes.byref(device), ctypes.c_int(ordinal)) != 0:
        raise EngineError(f"cannot open CUDA device {ordinal}; check nvidia-smi")
    name = ctypes.create_string_buffer(256)
    lib.cuDeviceGetName(name, ctypes.c_int(256), device)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    lib.cuDeviceGetAttribute(ctypes.byref(major), ctypes.c_int(75), device)  # COMPUTE_CAPABILITY_MAJOR
    lib.cuDeviceGetAttribute(ctypes.byref(minor), ctypes.c_int(76), device)  # COMPUTE_CAPABILITY_MINOR
    memory = ctypes.c_size_t(0)
    total = getattr(lib, "cuDeviceTotalMem_v2", None) or getattr(lib, "cuDeviceTotalMem", None)
    if total is None or total(ctypes.byref(memory), device) != 0:
        memory = ctypes.c_size_t(0)
    return GpuInfo(name.value.decode(errors="replace").strip(), f"{major.value}.{minor.value}",
                   int(memory.value) or None)


def import_tensorrt(otherwise: str = "or use --backend ort"):
    """The tensorrt module, or EngineError with what to install (ending in `otherwise`)."""
    try:
        import tensorrt
    except ImportError:
        raise EngineError("TensorRT is not installed: pip install tensorrt (x86-64/aarch64 with CUDA 12), "
                          f"or use JetPack's python3-libnvinfer; {otherwise}") from None
    except Exception as e:  # OSError and the like: libnvinfer or CUDA libraries not loadable
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EngineError(f"TensorRT cannot be loaded ({first[:200]}); check the CUDA and TensorRT "
                          f"libraries; {otherwise}") from None
    return tensorrt


def human_bytes(n: int | float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


_DIM_LABELS = {"batch": "tiles per call", "lr": "LR sides", "image": "x4 image sides (after padding)",
               "latent": "latent sides", "tile": "latent tile sides"}


def _dim_label(name: str) -> str:
    return _DIM_LABELS.get(name.split("_")[0], name)


# ====================================================================== CUDA (libcudart)
class _Cudart:
    """The few CUDA runtime calls the backend needs, on the libcudart polygraphy.cuda loads.

    Calls go through the library handle directly so that failures come back as status codes
    (turned into one-line errors here) rather than polygraphy's multi-line log."""

    MEMCPY_H2D, MEMCPY_D2H = 1, 2

    def __init__(self):
        try:
            from polygraphy import cuda as pcuda
        except ImportError:
            raise EngineError("the trt backend needs polygraphy: pip install 'deedsr[trt]'") from None
        try:
            self.lib = pcuda.wrapper().handle
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise EngineError(f"the CUDA runtime library (libcudart) cannot be loaded ({first[:160]}); "
                              "pip install nvidia-cuda-runtime-cu12 or put the CUDA toolkit's lib64 on "
                              "LD_LIBRARY_PATH") from None
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p

    def error(self, rc: int) -> str:
        try:
            return self.lib.cudaGetErrorString(ctypes.c_int(rc)).decode()
        except Exception:
            return f"CUDA error {rc}"

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise BackendError(f"{what}: {self.error(rc)} (CUDA error {rc})")

    def malloc(self, nbytes: int, what: str) -> int:
        ptr = ctypes.c_void_p()
        rc = self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(int(nbytes), 1)))
        if rc == 2:  # cudaErrorMemoryAllocation
            self.lib.cudaGetLastError()
            raise InsufficientMemory(
                f"GPU out of memory allocating {human_bytes(nbytes)} for {what}; use a smaller image or "
                "--tile, close other GPU programs, or rebuild the plans with a smaller --max-batch")
        self.check(rc, f"cudaMalloc for {what}")
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        if ptr:
            self.lib.cudaFree(ctypes.c_void_p(ptr))

    def stream(self) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(ptr)), "cudaStreamCreate")
        return int(ptr.value)

    def destroy_stream(self, stream: int) -> None:
        if stream:
            self.lib.cudaStreamDestroy(ctypes.c_void_p(stream))

    def synchronize(self, stream: int, what: str) -> None:
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), what)

    def upload(self, dst: int, array: np.ndarray, stream: int, what: str) -> None:
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(array.ctypes.data),
                                            ctypes.c_size_t(array.nbytes), ctypes.c_int(self.MEMCPY_H2D),
                                            ctypes.c_void_p(stream)), f"copy of {what} to the GPU")

    def download(self, array: np.ndarray, src: int, stream: int, what: str) -> None:
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(array.ctypes.data), ctypes.c_void_p(src),
                                            ctypes.c_size_t(array.nbytes), ctypes.c_int(self.MEMCPY_D2H),
                                            ctypes.c_void_p(stream)), f"copy of {what} from the GPU")


class _Buffer:
    """A device allocation that only grows."""

    def __init__(self, cuda: _Cudart, what: str):
        self.cuda, self.what, self.ptr, self.nbytes = cuda, what, 0, 0

    def ensure(self, nbytes: int) -> bool:
        """At least nbytes; True when the address changed."""
        if nbytes <= self.nbytes and self.ptr:
            return False
        self.free()
        self.ptr = self.cuda.malloc(nbytes, self.what)
        self.nbytes = max(int(nbytes), 1)
        return True

    def free(self) -> None:
        self.cuda.free(self.ptr)
        self.ptr, self.nbytes = 0, 0


def _cudart_graphs():
    """cuda-python's runtime module (CUDA graphs), or None."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            return None
    return cudart


# ====================================================================== TensorRT objects
def _make_logger(trt):
    class _Logger(trt.ILogger):
        """TensorRT's messages into Python logging; the last errors kept for one-line reports."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: collections.deque = collections.deque(maxlen=8)

        def log(self, severity, msg):
            if severity in (trt.Logger.INTERNAL_ERROR, trt.Logger.ERROR):
                self.errors.append(str(msg))
                log.debug("TensorRT error: %s", msg)
            elif severity == trt.Logger.WARNING:
                log.debug("TensorRT warning: %s", msg)

        def last_error(self) -> str:
            return self.errors[-1].strip().splitlines()[0][:300] if self.errors else "no message from TensorRT"

    return _Logger()


def is_oom_message(text: str) -> bool:
    """TensorRT or CUDA saying that GPU memory ran out."""
    text = text.lower()
    return any(k in text for k in ("out of memory", "outofmemory", "memoryallocation", "failed to allocate",
                                   "insufficient memory", "requested amount of gpu memory"))


def _memory_size(engine) -> int:
    if hasattr(engine, "device_memory_size_v2"):  # TensorRT >= 10.1
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


def _create_context(trt, engine):
    """An execution context without activation memory of its own (the backend supplies it)."""
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    if strategy is not None:  # TensorRT >= 10
        return engine.create_execution_context(strategy.USER_MANAGED)
    return engine.create_execution_context_without_device_memory()  # 8.5 .. 9.x


def _set_context_memory(context, ptr: int, size: int) -> None:
    if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1
        context.set_device_memory(ptr, size)
    else:
        context.device_memory = ptr


@dataclass
class _Plan:
    name: str
    record: dict
    engine: object
    context: object
    inputs: list[str]
    outputs: list[str]
    dtypes: dict[str, np.dtype]
    memory: int  # activation bytes at the profile's largest shapes

    def limits(self, tensor: str) -> tuple[list[int], list[int]] | None:
        p = self.record.get("profile", {}).get(tensor)
        return (list(p["min"]), list(p["max"])) if p else None


@dataclass
class _Capture:
    contexts: list
    graph: object = None
    exec: object = None
    generation: int = -1
    shapes: dict | None = None


class TrtBackend(Backend):
    name = "trt"
    on_device = True

    def __init__(self, manifest: Manifest, precision: str, use_denoiser: bool | None = None,
                 cuda_graphs: bool | None = None):
        # Base.__init__ checks graphs of the manifest's precision; a TensorRT backend is about
        # plans, so it sets the same attributes from the plan records instead.
        self.manifest = manifest
        self._closed = True
        root = manifest.root
        trt = self._trt = import_tensorrt()
        records = plan_records(manifest.data)
        if not records:
            raise EngineError(f"{root}: no TensorRT plans; build them on this machine: "
                              f"deedsr-export build-engines {root}")
        have_denoiser = "denoiser" in records
        if use_denoiser and not have_denoiser:
            hint = "" if manifest.has_graph("denoiser", "fp16") or manifest.has_graph("denoiser", "fp32") else \
                " (re-export with --fuse-denoiser first)"
            raise EngineError(f"{root}: no TensorRT plan for the denoiser graph; build it with "
                              f"deedsr-export build-engines {root}{hint}")
        split = "adapter" in records and "unet" in records
        # default: the fused denoiser when it has a plan (as the ort backend), else adapter + UNet
        self.use_denoiser = (have_denoiser or not split) if use_denoiser is None else bool(use_denoiser)
        needed = [*PER_IMAGE[:2], *self.per_step_graphs(), PER_IMAGE[2]]
        missing = [g for g in needed if g not in records]
        if missing:
            raise EngineError(f"{root}: no TensorRT plan for {', '.join(missing)}; build them on this machine: "
                              f"deedsr-export build-engines {root}")
        self.gpu = gpu_identity()
        self.tensorrt_version = str(trt.__version__)
        for graph in needed:
            self._check_record(graph, records[graph])
        kinds = {records[g].get("precision") for g in needed}
        if len(kinds) != 1:
            raise EngineError(f"{root}: the TensorRT plans mix precisions {sorted(map(str, kinds))}; rebuild them: "
                              f"{rebuild_command(root)}")
        plan_precision = str(kinds.pop())
        if precision == "fp32" and plan_precision != "fp32" and "fp16" in manifest.precisions():
            raise EngineError(f"{root}: the TensorRT plans are {plan_precision}; leave --precision auto, or build "
                              f"fp32 plans: deedsr-export build-engines {root} --mode fp32 --force")
        self.precision = plan_precision
        self.mode = str(records[needed[0]].get("mode", "?"))
        self.static = all(records[g].get("static") for g in self.per_step_graphs())

        self._lock = threading.RLock()
        self._cuda = _Cudart()
        self._logger = _make_logger(trt)
        trt.init_libnvinfer_plugins(self._logger, "")  # plans from TensorRT 8.5 may use its plugins
        self._runtime = trt.Runtime(self._logger)
        self._plans: dict[str, _Plan] = {}
        self._buffers: dict[str, _Buffer] = {}
        self._scratch = _Buffer(self._cuda, "TensorRT activations")
        self._generation = 0  # bumps when the scratch buffer moves (captured graphs then go stale)
        self._captures: dict[tuple, _Capture] = {}
        self._cudart = None
        self.cuda_graphs = False
        self._stream = self._cuda.stream()
        self._closed = False
        try:
            for graph in needed:
                self._plans[graph] = self._load(graph, records[graph])
            self._check_links()
            self._step_batch = min(int(records[g].get("dims", {}).get("batch", {}).get("max", manifest.max_batch))
                                   for g in self.per_step_graphs())
            self._allocate_step_buffers()
            self.cuda_graphs = self._want_cuda_graphs(cuda_graphs)
        except BaseException:
            self.close()
            raise
        log.info("trt backend: %s", self.describe())

    # ---------------------------------------------------------------- opening
    def _check_record(self, graph: str, record: dict) -> None:
        root = self.manifest.root
        file = root / str(record.get("file", f"trt/{graph}.plan"))
        reason = plan_mismatch(record, self.tensorrt_version, self.gpu)
        if reason:
            raise EngineError(f"{file}: {reason}; rebuild the plans on this machine: {rebuild_command(root)}")
        if not file.is_file():
            raise EngineError(f"{file}: missing; rebuild the plans: {rebuild_command(root)}")
        if record.get("bytes") is not None and file.stat().st_size != int(record["bytes"]):
            raise EngineError(f"{file}: {file.stat().st_size} bytes, manifest.json says {record['bytes']} "
                              f"(truncated or replaced); rebuild the plans: {rebuild_command(root)}")
        source = record.get("source", {})
        spec = self.manifest.graphs.get(graph)
        entry = spec.precisions.get(str(source.get("precision"))) if spec else None
        if entry is None or (entry.sha256 and source.get("sha256") and entry.sha256 != source["sha256"]):
            raise EngineError(f"{file}: built from another export of the {graph} graph; rebuild the plans: "
                              f"{rebuild_command(root)}")

    def _load(self, graph: str, record: dict) -> _Plan:
        trt = self._trt
        file = self.manifest.root / str(record.get("file", f"trt/{graph}.plan"))
        self._logger.errors.clear()
        try:
            data = file.read_bytes()
        except OSError as e:
            raise EngineError(f"{file}: cannot be read ({e.strerror or e})") from None
        engine = self._runtime.deserialize_cuda_engine(data)
        del data
        if engine is None:
            why = self._logger.last_error()
            if is_oom_message(why):
                raise EngineError(f"{file}: GPU out of memory loading the plan ({human_bytes(file.stat().st_size)}) "
                                  f"on {self.gpu.describe()}; close other GPU programs or use a larger GPU")
            raise EngineError(f"{file}: TensorRT cannot load it ({why}); rebuild the plans: "
                              f"{rebuild_command(self.manifest.root)}")
        context = _create_context(trt, engine)
        if context is None:
            raise EngineError(f"{file}: TensorRT cannot create an execution context ({self._logger.last_error()})")
        inputs, outputs, dtypes = [], [], {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = engine.get_tensor_mode(name)
            (inputs if mode == trt.TensorIOMode.INPUT else outputs).append(name)
            dtypes[name] = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        spec = self.manifest.graphs[graph]
        if set(inputs) != set(spec.input_names) or set(outputs) != set(spec.output_names):
            raise EngineError(f"{file}: its inputs/outputs differ from manifest.json's {graph} graph; rebuild the "
                              f"plans: {rebuild_command(self.manifest.root)}")
        # Keep the manifest's order (inputs are uploaded and outputs returned in this order).
        return _Plan(graph, record, engine, context, list(spec.input_names), list(spec.output_names), dtypes,
                     _memory_size(engine))

    def _check_links(self) -> None:
        """Adapter outputs are bound as UNet inputs as they are: their dtypes must agree."""
        plans = [self._plans[g] for g in self.per_step_graphs()]
        seen: dict[str, np.dtype] = {}
        for plan in plans:
            for name in plan.inputs + plan.outputs:
                if name in seen and seen[name] != plan.dtypes[name]:
                    raise EngineError(f"{self.manifest.root}: tensor {name} is {seen[name]} in one plan and "
                                      f"{plan.dtypes[name]} in another; rebuild the plans: "
                                      f"{rebuild_command(self.manifest.root)}")
                seen.setdefault(name, plan.dtypes[name])

    def _allocate_step_buffers(self) -> None:
        """One device buffer per per-step tensor name, at the plans' largest shapes, allocated once
        (stable addresses: CUDA graphs bake them in). Adapter outputs and UNet inputs of the same
        name are the same buffer."""
        sizes: dict[str, int] = {}
        for graph in self.per_step_graphs():
            plan = self._plans[graph]
            dims = plan.record.get("dims", {})
            env = {k: int(v["max"]) for k, v in dims.items()}
            spec = self.manifest.graphs[graph]
            for t in list(spec.inputs) + list(spec.outputs):
                try:
                    shape = eval_shape(t.shape, env)
                except (KeyError, ValueError) as e:
                    raise EngineError(f"{self.manifest.root}: plan record of {graph} lacks dims for {t.name} ({e}); "
                                      f"rebuild the plans: {rebuild_command(self.manifest.root)}") from None
                nbytes = math.prod(shape) * plan.dtypes[t.name].itemsize
                sizes[t.name] = max(sizes.get(t.name, 0), nbytes)
        for name, nbytes in sizes.items():
            buf = self._buffers.setdefault(f"step:{name}", _Buffer(self._cuda, f"per-step tensor {name}"))
            buf.ensure(nbytes)

    def _want_cuda_graphs(self, requested: bool | None) -> bool:
        env = os.environ.get(ENV_CUDA_GRAPHS, "").strip().lower()
        if requested is None and env in ("1", "true", "yes", "on"):
            requested = True
        elif requested is None and env in ("0", "false", "no", "off"):
            requested = False
        cudart = _cudart_graphs()
        if requested and cudart is None:
            raise EngineError("CUDA graphs need cuda-python: pip install cuda-python (or unset "
                              f"{ENV_CUDA_GRAPHS})")
        if requested is None:
            requested = self.static and cudart is not None
        self._cudart = cudart if requested else None
        return bool(requested)

    def describe(self) -> str:
        extra = ", static tiles" if self.static else ""
        extra += ", CUDA graphs" if getattr(self, "cuda_graphs", False) else ""
        return (f"trt {self.precision} (TensorRT {self.tensorrt_version}, {self.gpu.name}, {self.mode}{extra}, "
                f"{'denoiser' if self.use_denoiser else 'adapter+unet'})")

    # ------------------------------------------------------------ shape checks
    def check_shapes(self, env: Mapping[str, int]) -> None:
        """Raise ShapeError when named dimensions (lr_height, tile_width, ...) fall outside
        what the loaded plans were built for."""
        for plan in self._plans.values():
            for name, rng in plan.record.get("dims", {}).items():
                if name in env and not int(rng["min"]) <= int(env[name]) <= int(rng["max"]):
                    raise self._shape_error(plan, name, int(env[name]), int(rng["min"]), int(rng["max"]))

    def _shape_error(self, plan: _Plan, dim: str, value: int, lo: int, hi: int) -> ShapeError:
        root = self.manifest.root
        if dim.startswith("tile_") and plan.record.get("static"):
            image = self.manifest.image
            lr = lo * image["latent_downscale"] // image["upscale"]
            fix = (f"these plans have a static tile of {lo}: use --tile {lo} and LR images of at least {lr} px a "
                   f"side, or rebuild without --static: {rebuild_command(root)}")
        else:
            export = self.manifest.dims.get(dim)
            if export is not None and value not in export:
                fix = "re-export with a wider --min-size/--max-size, then build the plans again"
            else:
                fix = f"rebuild the plans to cover it: {rebuild_command(root)}"
        return ShapeError(f"the TensorRT plans are built for {_dim_label(dim)} {lo}..{hi} ({plan.name}: {dim}), "
                          f"got {value}; {fix}")

    def _check_profile(self, plan: _Plan, tensor: str, shape: tuple[int, ...]) -> None:
        limits = plan.limits(tensor)
        if limits is None:
            return
        lo, hi = limits
        if len(lo) != len(shape):
            raise ShapeError(f"{plan.name}: input {tensor} has {len(shape)} dimensions, the plan expects {len(lo)}")
        spec = next((t for t in self.manifest.graphs[plan.name].inputs if t.name == tensor), None)
        for axis, (v, a, b) in enumerate(zip(shape, lo, hi)):
            if not a <= v <= b:
                entry = spec.shape[axis] if spec is not None else None
                dim = entry if isinstance(entry, str) and entry.isidentifier() else f"{tensor}[{axis}]"
                raise self._shape_error(plan, dim, int(v), int(a), int(b))

    # ------------------------------------------------------------- execution
    def cast_inputs(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        plan = self._plan(graph)
        out = {}
        for name, value in feeds.items():
            dtype = plan.dtypes.get(name, np.dtype(np.float32))
            out[name] = value if value.dtype == dtype and value.flags.c_contiguous else \
                np.ascontiguousarray(value, dtype=dtype)
        return out

    def _plan(self, graph: str) -> _Plan:
        if self._closed:
            raise BackendError("the TensorRT backend is closed")
        try:
            return self._plans[graph]
        except KeyError:
            raise BackendError(f"no TensorRT plan for {graph} is loaded") from None

    def _buffer(self, key: str, nbytes: int, what: str) -> _Buffer:
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = _Buffer(self._cuda, what)
        buf.ensure(nbytes)
        return buf

    def _set_shapes(self, plan: _Plan, context, shapes: Mapping[str, tuple]) -> None:
        for name in plan.inputs:
            shape = tuple(int(d) for d in shapes[name])
            self._check_profile(plan, name, shape)
            if not context.set_input_shape(name, shape):
                raise ShapeError(f"{plan.name}: TensorRT rejects shape {shape} for {name} "
                                 f"({self._logger.last_error()})")

    def _bind_memory(self, plan: _Plan, context, grow: bool = True) -> None:
        """Point the context at the shared scratch buffer, growing it when the current shapes
        need more (TensorRT >= 10 can say how much; older versions need the profile's maximum)."""
        need = plan.memory
        update = getattr(context, "update_device_memory_size_for_shapes", None)
        if update is not None:
            try:
                need = int(update()) or plan.memory
            except Exception:
                need = plan.memory
        if grow and need > self._scratch.nbytes:
            self._cuda.synchronize(self._stream, "waiting for the GPU")  # the old buffer may be in use
            step = 16 << 20  # grow in 16 MiB steps: fewer reallocations (and CUDA-graph recaptures)
            if self._scratch.ensure(-(-need // step) * step):
                self._generation += 1
        _set_context_memory(context, self._scratch.ptr, self._scratch.nbytes)

    def _execute(self, plan: _Plan, context, addresses: Mapping[str, int]) -> None:
        for name in plan.inputs + plan.outputs:
            context.set_tensor_address(name, int(addresses[name]))
        self._bind_memory(plan, context)
        self._logger.errors.clear()
        if not context.execute_async_v3(self._stream):
            why = self._logger.last_error()
            if is_oom_message(why):
                raise InsufficientMemory(f"{plan.name}: GPU out of memory ({why}); use a smaller image or --tile")
            raise BackendError(f"{plan.name}: TensorRT execution failed ({why})")

    def run_raw(self, graph, feeds, outputs=None):
        plan = self._plan(graph)
        names = list(outputs or plan.outputs)
        with self._lock:
            try:
                arrays = {n: feeds[n] for n in plan.inputs}
            except KeyError as e:
                raise BackendError(f"{graph}: missing input {e.args[0]}") from None
            context = plan.context
            self._set_shapes(plan, context, {n: a.shape for n, a in arrays.items()})
            addresses = {}
            for name, array in arrays.items():
                buf = self._buffer(f"{graph}:{name}", array.nbytes, f"{graph} input {name}")
                self._cuda.upload(buf.ptr, array, self._stream, name)
                addresses[name] = buf.ptr
            shapes = {n: tuple(context.get_tensor_shape(n)) for n in plan.outputs}
            for name in plan.outputs:
                nbytes = math.prod(shapes[name]) * plan.dtypes[name].itemsize
                addresses[name] = self._buffer(f"{graph}:{name}", nbytes, f"{graph} output {name}").ptr
            self._execute(plan, context, addresses)
            results = {}
            for name in names:
                host = np.empty(shapes[name], plan.dtypes[name])
                self._cuda.download(host, addresses[name], self._stream, name)
                results[name] = host
            self._cuda.synchronize(self._stream, f"{graph} on the GPU")
        return results

    # ------------------------------------------------------------------ steps
    def denoise(self, x_t, timestep, z_lr, conditions):
        n = int(x_t.shape[0])
        if n > self._step_batch:  # plans built for fewer tiles per call than the sampler batches
            parts = [self.denoise(x_t[i:i + self._step_batch], timestep[i:i + self._step_batch],
                                  z_lr[i:i + self._step_batch], {k: v[i:i + self._step_batch]
                                                                 for k, v in conditions.items()})
                     for i in range(0, n, self._step_batch)]
            return np.concatenate(parts)
        feeds = {"x_t": x_t, "timestep": timestep, "z_lr": z_lr, **conditions}
        with self._lock:
            eps = self._step(feeds)
        return eps if eps.dtype == np.float32 else eps.astype(np.float32)

    def _step(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        plans = [self._plan(g) for g in self.per_step_graphs()]
        produced: set[str] = set()
        shapes: dict[str, tuple] = {}
        uploads = []
        for plan in plans:
            for name in plan.inputs:
                if name in produced or name in shapes:
                    continue
                if name not in feeds:
                    raise BackendError(f"{plan.name}: missing input {name}")
                array = feeds[name]
                if array.dtype != plan.dtypes[name] or not array.flags.c_contiguous:
                    array = np.ascontiguousarray(array, dtype=plan.dtypes[name])
                self._check_profile(plan, name, array.shape)
                shapes[name] = tuple(array.shape)
                uploads.append((name, array))
            produced.update(plan.outputs)
        for name, array in uploads:
            buf = self._buffers[f"step:{name}"]
            if array.nbytes > buf.nbytes:
                raise ShapeError(f"{name}: {array.shape} is larger than the plans' largest shape")
            self._cuda.upload(buf.ptr, array, self._stream, name)
        addresses = {name[5:]: buf.ptr for name, buf in self._buffers.items() if name.startswith("step:")}
        if self.cuda_graphs:
            out_shapes = self._step_graph(plans, shapes, addresses)
        else:
            out_shapes = self._chain(plans, [p.context for p in plans], shapes, addresses)
        last = plans[-1]
        eps = np.empty(out_shapes["eps"], last.dtypes["eps"])
        self._cuda.download(eps, addresses["eps"], self._stream, "eps")
        self._cuda.synchronize(self._stream, "denoising step on the GPU")
        return eps

    def _chain(self, plans, contexts, shapes, addresses, execute=True) -> dict[str, tuple]:
        """Set shapes (and run, when execute) of the per-step plans in order; device
        intermediates keep their buffers, so the adapter's outputs feed the UNet in place."""
        shapes = dict(shapes)
        for plan, context in zip(plans, contexts):
            self._set_shapes(plan, context, {n: shapes[n] for n in plan.inputs})
            for name in plan.outputs:
                shapes[name] = tuple(context.get_tensor_shape(name))
                need = math.prod(shapes[name]) * plan.dtypes[name].itemsize
                if need > self._buffers[f"step:{name}"].nbytes:
                    raise ShapeError(f"{plan.name}: output {name} {shapes[name]} exceeds the plans' largest shape")
            if execute:
                self._execute(plan, context, addresses)
        return shapes

    def _step_graph(self, plans, shapes, addresses) -> dict[str, tuple]:
        """Replay the captured CUDA graph for these input shapes, capturing it first (the
        capturing call runs the step normally, so its result is this call's result)."""
        cudart = self._cudart
        key = tuple(sorted((n, tuple(s)) for n, s in shapes.items()))
        cap = self._captures.get(key)
        if cap is not None and cap.exec is not None and cap.generation == self._generation:
            err = cudart.cudaGraphLaunch(cap.exec, self._stream)[0]
            if int(err) != 0:
                raise BackendError(f"CUDA graph launch failed ({err})")
            return cap.shapes
        if cap is None:
            if len(self._captures) >= MAX_CAPTURES:
                return self._chain(plans, [p.context for p in plans], shapes, addresses)
            cap = self._captures[key] = _Capture([_create_context(self._trt, p.engine) for p in plans])
        self._destroy_capture(cap)
        out_shapes = self._chain(plans, cap.contexts, shapes, addresses)  # also the warm-up TensorRT asks for
        for context in cap.contexts:  # every context on the final scratch buffer
            _set_context_memory(context, self._scratch.ptr, self._scratch.nbytes)
        self._cuda.synchronize(self._stream, "denoising step on the GPU")
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        try:
            err = cudart.cudaStreamBeginCapture(self._stream, mode)[0]
            if int(err) != 0:
                raise RuntimeError(f"begin capture: {err}")
            ok = all(context.execute_async_v3(self._stream) for context in cap.contexts)
            err, graph = cudart.cudaStreamEndCapture(self._stream)
            if not ok or int(err) != 0:
                raise RuntimeError(f"capture: {err if ok else self._logger.last_error()}")
            err, exec_ = cudart.cudaGraphInstantiateWithFlags(graph, 0)
            if int(err) != 0:
                cudart.cudaGraphDestroy(graph)
                raise RuntimeError(f"instantiate: {err}")
        except Exception as e:
            try:  # leave capture mode whatever happened
                cudart.cudaStreamEndCapture(self._stream)
            except Exception:
                pass
            log.warning("CUDA graph capture failed (%s); running steps without CUDA graphs", e)
            self.cuda_graphs = False
            return out_shapes
        cap.graph, cap.exec, cap.generation, cap.shapes = graph, exec_, self._generation, out_shapes
        log.info("captured a CUDA graph for step inputs %s", dict(key))
        return out_shapes

    def _destroy_capture(self, cap: _Capture) -> None:
        if self._cudart is not None:
            if cap.exec is not None:
                self._cudart.cudaGraphExecDestroy(cap.exec)
            if cap.graph is not None:
                self._cudart.cudaGraphDestroy(cap.graph)
        cap.exec = cap.graph = None

    # ------------------------------------------------------------------ misc
    def preload(self) -> None:
        """Plans are deserialised when the backend opens; nothing more to load."""

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        with self._lock:
            self._closed = True
            try:
                self._cuda.synchronize(self._stream, "closing")
            except Exception:
                pass
            for cap in self._captures.values():
                self._destroy_capture(cap)
                cap.contexts.clear()
            self._captures.clear()
            for plan in self._plans.values():
                plan.context = None
                plan.engine = None
            self._plans.clear()
            for buf in self._buffers.values():
                buf.free()
            self._buffers.clear()
            self._scratch.free()
            self._cuda.destroy_stream(self._stream)
            self._stream = 0

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
