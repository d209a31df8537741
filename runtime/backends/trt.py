"""TensorRT backend: runs the plans `deedsr-export build-engines DIR` writes into DIR/trt/.

Plan records (runtime/plans.py) say which TensorRT version and GPU each plan was built for;
anything else is refused with one line that says how to rebuild. CUDA calls live in cuda.py,
the TensorRT version differences in trt_api.py.

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

import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..contract import (
    DENOISER,
    PRECISIONS,
    VAE_DECODER_TILED,
    VAE_ENCODER_TILED,
    call_order,
    step_graphs,
)
from ..errors import BackendError, EngineError, InsufficientMemory, ShapeError
from ..manifest import Manifest, eval_shape
from ..memory import human_bytes
from ..plans import plan_mismatch, plan_records, rebuild_command
from . import Backend
from .cuda import Cudart, DeviceBuffer, cudart_graphs, gpu_identity
from .trt_api import (
    create_context,
    import_tensorrt,
    is_oom_message,
    make_logger,
    memory_size,
    set_context_memory,
)

log = logging.getLogger(__name__)

ENV_CUDA_GRAPHS = "DEEDSR_TRT_CUDA_GRAPHS"
MAX_CAPTURES = 8  # CUDA graphs kept per backend (one per step input shape)

_DIM_LABELS = {"batch": "tiles per call", "lr": "LR sides", "image": "x4 image sides (after padding)",
               "latent": "latent sides", "tile": "latent tile sides"}


def _dim_label(name: str) -> str:
    return _DIM_LABELS.get(name.split("_")[0], name)


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


def _cuda_error(err) -> str:
    return getattr(err, "name", None) or str(err)


def _driver_hint(err) -> str:
    """cuda-python 13 on a CUDA 12 driver (and JetPack) reports an insufficient driver."""
    if "InsufficientDriver" in _cuda_error(err) or int(err) == 35:
        return (" (this cuda-python needs a newer NVIDIA driver: pip install 'cuda-python>=12.4,<13' on CUDA 12 "
                "drivers and JetPack 6)")
    return ""


class TrtBackend(Backend):
    name = "trt"
    on_device = True

    def __init__(self, manifest: Manifest, precision: str, use_denoiser: bool | None = None,
                 cuda_graphs: bool | None = None):
        self._closed = True  # until everything below is open (close() and __del__ check it)
        root = manifest.root
        trt = self._trt = import_tensorrt()
        records = plan_records(manifest.data)
        if not records:
            raise EngineError(f"{root}: no TensorRT plans; build them on this machine: "
                              f"deedsr-export build-engines {root}")
        have_denoiser = DENOISER in records
        if use_denoiser and not have_denoiser:
            hint = "" if any(manifest.has_graph(DENOISER, p) for p in PRECISIONS) else \
                " (re-export with --fuse-denoiser first)"
            raise EngineError(f"{root}: no TensorRT plan for the denoiser graph; build it with "
                              f"deedsr-export build-engines {root}{hint}")
        split = all(g in records for g in step_graphs(False))
        # default: the fused denoiser when it has a plan (as the ort backend), else adapter + UNet
        fused = (have_denoiser or not split) if use_denoiser is None else bool(use_denoiser)
        needed = list(call_order(fused, tiled=all(g in records for g in (VAE_ENCODER_TILED, VAE_DECODER_TILED))))
        missing = [g for g in needed if g not in records]
        if missing:
            raise EngineError(f"{root}: no TensorRT plan for {', '.join(missing)}; build them on this machine: "
                              f"deedsr-export build-engines {root}")
        self.gpu = gpu_identity()
        self.tensorrt_version = str(trt.__version__)
        for graph in needed:
            self._check_record(manifest, graph, records[graph])
        kinds = {records[g].get("precision") for g in needed}
        if len(kinds) != 1:
            raise EngineError(f"{root}: the TensorRT plans mix precisions {sorted(map(str, kinds))}; rebuild them: "
                              f"{rebuild_command(root)}")
        plan_precision = str(kinds.pop())
        if precision == "fp32" and plan_precision != "fp32" and "fp16" in manifest.precisions():
            raise EngineError(f"{root}: the TensorRT plans are {plan_precision}; leave --precision auto, or build "
                              f"fp32 plans: deedsr-export build-engines {root} --mode fp32 --force")
        super().__init__(manifest, plan_precision, fused)
        self.mode = str(records[needed[0]].get("mode", "?"))
        self.static = all(records[g].get("static") for g in self.per_step_graphs())

        self._lock = threading.RLock()
        self._cuda = Cudart()
        self._logger = make_logger(trt)
        trt.init_libnvinfer_plugins(self._logger, "")  # plans from TensorRT 8.5 may use its plugins
        self._runtime = trt.Runtime(self._logger)
        self._plans: dict[str, _Plan] = {}
        self._buffers: dict[str, DeviceBuffer] = {}
        self._scratch = DeviceBuffer(self._cuda, "TensorRT activations")
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
    def _check_record(self, manifest: Manifest, graph: str, record: dict) -> None:
        root = manifest.root
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
        spec = manifest.graphs.get(graph)
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
        context = create_context(trt, engine)
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
                     memory_size(engine))

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
            buf = self._buffers.setdefault(f"step:{name}", DeviceBuffer(self._cuda, f"per-step tensor {name}"))
            buf.ensure(nbytes)

    def _want_cuda_graphs(self, requested: bool | None) -> bool:
        env = os.environ.get(ENV_CUDA_GRAPHS, "").strip().lower()
        if requested is None and env in ("1", "true", "yes", "on"):
            requested = True
        elif requested is None and env in ("0", "false", "no", "off"):
            requested = False
        cudart = cudart_graphs()
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
    def input_dtype(self, graph: str, tensor: str) -> np.dtype:
        return self._plan(graph).dtypes.get(tensor, np.dtype(np.float32))

    def _plan(self, graph: str) -> _Plan:
        if self._closed:
            raise BackendError("the TensorRT backend is closed")
        try:
            return self._plans[graph]
        except KeyError:
            raise BackendError(f"no TensorRT plan for {graph} is loaded") from None

    def _buffer(self, key: str, nbytes: int, what: str) -> DeviceBuffer:
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = DeviceBuffer(self._cuda, what)
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
        set_context_memory(context, self._scratch.ptr, self._scratch.nbytes)

    def _execute(self, plan: _Plan, context, addresses: Mapping[str, int], grow: bool = True) -> None:
        for name in plan.inputs + plan.outputs:
            context.set_tensor_address(name, int(addresses[name]))
        self._bind_memory(plan, context, grow=grow)
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
        key = tuple(sorted((n, tuple(s)) for n, s in shapes.items()))
        cap = self._captures.get(key)
        if cap is not None and cap.exec is not None and cap.generation == self._generation:
            err = self._graph_call("cudaGraphLaunch", cap.exec, self._stream)[0]
            if int(err) != 0:
                raise BackendError(f"CUDA graph launch failed ({_cuda_error(err)}); set {ENV_CUDA_GRAPHS}=0 to run "
                                   "without CUDA graphs")
            return cap.shapes
        if cap is None:
            if len(self._captures) >= MAX_CAPTURES:
                return self._chain(plans, [p.context for p in plans], shapes, addresses)
            cap = self._captures[key] = _Capture([create_context(self._trt, p.engine) for p in plans])
        self._destroy_capture(cap)
        out_shapes = self._chain(plans, cap.contexts, shapes, addresses)  # the step itself
        # The first run may have grown (moved) the shared scratch buffer after earlier contexts
        # were bound to the old one: re-point every context, then enqueue once more, because
        # TensorRT finishes its per-shape and per-address setup in the first enqueue after a
        # change, which must not be captured.
        for context in cap.contexts:
            set_context_memory(context, self._scratch.ptr, self._scratch.nbytes)
        for plan, context in zip(plans, cap.contexts):
            self._execute(plan, context, addresses, grow=False)
        self._cuda.synchronize(self._stream, "denoising step on the GPU")
        graph = None
        try:
            graph, exec_ = self._capture(cap.contexts)
        except (BackendError, RuntimeError, TypeError, AttributeError) as e:
            try:  # leave capture mode whatever happened, and drop a half-made graph
                self._graph_call("cudaStreamEndCapture", self._stream)
            except Exception:
                pass
            log.warning("CUDA graph capture failed (%s); running steps without CUDA graphs", e)
            self.cuda_graphs = False
            return out_shapes
        cap.graph, cap.exec, cap.generation, cap.shapes = graph, exec_, self._generation, out_shapes
        log.info("captured a CUDA graph for step inputs %s", dict(key))
        return out_shapes

    def _capture(self, contexts) -> tuple:
        """(graph, executable graph) of one enqueue of every context; no graph left on failure."""
        cudart = self._cudart
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        err = self._graph_call("cudaStreamBeginCapture", self._stream, mode)[0]
        if int(err) != 0:
            raise BackendError(f"begin capture: {_cuda_error(err)}{_driver_hint(err)}")
        ok = all(context.execute_async_v3(self._stream) for context in contexts)
        err, graph = self._graph_call("cudaStreamEndCapture", self._stream)
        if not ok or int(err) != 0:
            if graph is not None and int(err) == 0:
                self._graph_call("cudaGraphDestroy", graph)
            raise BackendError(f"capture: {self._logger.last_error() if not ok else _cuda_error(err)}")
        err, exec_ = self._graph_call("cudaGraphInstantiateWithFlags", graph, 0)
        if int(err) != 0:
            self._graph_call("cudaGraphDestroy", graph)
            raise BackendError(f"instantiate: {_cuda_error(err)}")
        return graph, exec_

    def _graph_call(self, name: str, *args):
        """A cuda-python runtime call; its exceptions (cuda-python 11.8/12.x raise RuntimeError or
        TypeError for a missing driver entry point or an argument it cannot convert) become the
        backend's one-line error."""
        try:
            return getattr(self._cudart, name)(*args)
        except (RuntimeError, TypeError, AttributeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise BackendError(f"cuda-python {name} failed ({first}); set {ENV_CUDA_GRAPHS}=0 to run without CUDA "
                               "graphs") from None

    def _destroy_capture(self, cap: _Capture) -> None:
        if self._cudart is not None:
            for name, handle in (("cudaGraphExecDestroy", cap.exec), ("cudaGraphDestroy", cap.graph)):
                if handle is not None:
                    try:
                        getattr(self._cudart, name)(handle)
                    except Exception:
                        pass
        cap.exec = cap.graph = None

    # ------------------------------------------------------------------ misc
    def preload(self) -> None:
        """Plans are deserialised when the backend opens; nothing more to load."""

    def graphs(self) -> list[str]:
        """The graphs whose plans this backend loaded, in call order."""
        return list(self._plans)

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
