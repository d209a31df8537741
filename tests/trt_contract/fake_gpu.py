"""The FAKED GPU side of the TensorRT contract suite; everything above it is real.

Real in every combination: the tensorrt binding module (its enums, Dims, Logger, ILogger,
nptype, class and method signatures), polygraphy, cuda-python's runtime module (its enums and
function names), numpy, onnx, onnxruntime, and the project's engines and trt backend.

Faked here, and only here (each fake names the real binding class it stands for and is held
to that class's attributes and signatures by api_contract.Faked):

- trt.Builder / INetworkDefinition / ITensor / ILayer / IOptimizationProfile / IBuilderConfig /
  ITimingCache / IHostMemory / OnnxParser: the network is read from the real ONNX file with
  `onnx`; the "plan" a build serialises is JSON naming the ONNX file, the flags, the profile
  and the timing cache the builder saw;
- trt.Runtime / ICudaEngine / IExecutionContext: a context runs its graph with onnxruntime on
  the CPU, reading and writing "device" memory; it enforces what TensorRT documents: device
  memory of at least the engine's size, every I/O address set, shapes inside the profile, and
  no stream capture of the first enqueue after shapes or memory changed;
- libcudart (what polygraphy.cuda loads): host memory stands in for device memory, with
  pointer checks; streams record their flags;
- cuda-python's graph calls (cudaStreamBeginCapture, ...): capture records the contexts'
  enqueues, launch replays them with the addresses of capture time; the real module's enums
  and function names are used and checked;
- libcuda's device query (gpu_identity): one stand-in GPU.
"""
from __future__ import annotations

import ctypes
import inspect
import json
from pathlib import Path

import numpy as np

from api_contract import VIOLATIONS, Faked

GPU_NAME = "NVIDIA Contract Stand-in"
GPU_CC = (8, 9)
ENGINE_MEMORY = 3 << 20  # activation bytes a fake engine needs at its largest shapes ...
BIG_ENGINE_MEMORY = 20 << 20  # ... and the UNet's (more than the backend's first 16 MiB scratch step)


def _engine_memory(context_or_engine) -> int:
    engine = getattr(context_or_engine, "_engine", context_or_engine)
    return BIG_ENGINE_MEMORY if Path(engine._plan["source"]).stem == "unet" else ENGINE_MEMORY
STATS = {"builds": 0, "timing_cache_loaded": [], "captures": 0, "launches": 0, "graphs_alive": 0,
         "executions": 0, "capture_refused": 0}
FAIL = {"capture_enqueue": False, "graph_launch": False}  # failure injection for the checks


def install(trt):
    """Replace the GPU-side entry points of the real modules by the fakes; returns the fakes'
    namespace for the checks."""
    for cls in _FAKES:
        cls._module_ = trt
        cls._real_ = getattr(trt, cls._real_name_)
    trt.Builder = FakeBuilder
    trt.OnnxParser = FakeParser
    trt.Runtime = FakeRuntime
    plugins = trt.init_libnvinfer_plugins

    def init_libnvinfer_plugins(logger, namespace):
        from api_contract import check_call

        check_call(type("module", (), {"init_libnvinfer_plugins": plugins}), "init_libnvinfer_plugins",
                   (logger, namespace), {}, trt)
        STATS["plugins_initialised"] = True
        return True

    trt.init_libnvinfer_plugins = init_libnvinfer_plugins
    global TRT
    TRT = trt
    import polygraphy.cuda as pcuda

    pcuda.wrapper = lambda: _POLY_CUDA
    from deedsr.runtime.backends import cuda as backend_cuda

    backend_cuda._libcuda = lambda: FakeLibcuda()


TRT = None


# ------------------------------------------------------------------------ helpers
def _onnx_dtype_to_trt(elem_type: int):
    import onnx

    np_type = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    if np_type == np.int64 and not hasattr(TRT, "int64"):
        return TRT.int32  # TensorRT < 9: the ONNX parser turns INT64 inputs into INT32
    names = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", np.dtype(np.int32): "int32",
             np.dtype(np.int64): "int64", np.dtype(np.bool_): "bool"}
    return getattr(TRT, names[np_type])


def _dims(values):
    return TRT.Dims([int(v) for v in values])


class FakeHostMemory(bytes):
    """IHostMemory: a buffer (bytes) with nbytes/dtype."""

    def __getattr__(self, name):
        if name == "nbytes":
            return len(self)
        if name == "dtype":
            return TRT.DataType.UINT8 if hasattr(TRT.DataType, "UINT8") else TRT.DataType.INT8
        raise AttributeError(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -------------------------------------------------------------------------- builder
class FakeTensor(Faked):
    _real_name_ = "ITensor"

    def __init__(self, name, dtype, shape, is_input=False):
        self._name, self._dtype, self._shape, self._input = name, dtype, list(shape), is_input

    name = property(lambda self: self._name)
    dtype = property(lambda self: self._dtype, lambda self, v: setattr(self, "_dtype", v))
    shape = property(lambda self: _dims(self._shape))
    is_network_input = property(lambda self: self._input)
    is_network_output = property(lambda self: not self._input)
    is_shape_tensor = property(lambda self: False)
    is_execution_tensor = property(lambda self: True)
    location = property(lambda self: TRT.TensorLocation.DEVICE)
    dynamic_range = property(lambda self: None)
    allowed_formats = property(lambda self: 1)
    broadcast_across_batch = property(lambda self: False)


_UNARY = {"Exp": "EXP", "Sin": "SIN", "Cos": "COS", "Sqrt": "SQRT", "Erf": "ERF", "Abs": "ABS", "Neg": "NEG",
          "Log": "LOG", "Reciprocal": "RECIP", "Tanh": "TANH"}
_ELEMENTWISE = {"Add": "SUM", "Sub": "SUB", "Mul": "PROD", "Div": "DIV", "Pow": "POW", "Max": "MAX", "Min": "MIN"}
_LAYER = {"Conv": "CONVOLUTION", "MatMul": "MATRIX_MULTIPLY", "Gemm": "MATRIX_MULTIPLY", "Softmax": "SOFTMAX",
          "LayerNormalization": "NORMALIZATION", "InstanceNormalization": "NORMALIZATION",
          "GroupNormalization": "NORMALIZATION", "ReduceMean": "REDUCE", "ReduceSum": "REDUCE",
          "Sigmoid": "ACTIVATION", "Relu": "ACTIVATION", "Concat": "CONCATENATION", "Reshape": "SHUFFLE",
          "Transpose": "SHUFFLE", "Resize": "RESIZE", "Cast": "CAST", "Gather": "GATHER", "Slice": "SLICE",
          "Shape": "SHAPE", "Constant": "CONSTANT"}


class FakeLayer(Faked):
    _real_name_ = "ILayer"

    def __init__(self, index, node, outputs):
        LT = TRT.LayerType
        op = node.op_type
        if op in _UNARY and hasattr(TRT.UnaryOperation, _UNARY[op]):
            kind, self._op = LT.UNARY, getattr(TRT.UnaryOperation, _UNARY[op])
        elif op in _ELEMENTWISE:
            kind, self._op = LT.ELEMENTWISE, getattr(TRT.ElementWiseOperation, _ELEMENTWISE[op])
        else:
            kind, self._op = getattr(LT, _LAYER.get(op, "IDENTITY"), LT.IDENTITY), None
        self._type, self._name, self._outputs = kind, f"{op}_{index}", outputs
        self._cls = type(self)._real_
        self._precision, self._output_types = None, {}

    # polygraphy downcasts layers by assigning __class__ (to trt.IUnaryLayer, ...)
    def _get_class(self):
        return type(self)

    def _set_class(self, cls):
        if not (isinstance(cls, type) and issubclass(cls, TRT.ILayer)):
            VIOLATIONS.append(f"layer.__class__ = {cls!r}, not a TensorRT layer class")
        self._cls = cls

    __class__ = property(_get_class, _set_class)

    def _real_instance(self):
        return self._cls

    name = property(lambda self: self._name, lambda self, v: setattr(self, "_name", v))
    type = property(lambda self: self._type)
    num_inputs = property(lambda self: 0)
    num_outputs = property(lambda self: len(self._outputs))
    op = property(lambda self: self._op)
    precision_is_set = property(lambda self: self._precision is not None)
    metadata = property(lambda self: "")

    def _get_precision(self):
        return self._precision if self._precision is not None else TRT.float32

    def _set_precision(self, value):
        if not isinstance(value, TRT.DataType):
            raise TypeError(f"precision must be a DataType, got {value!r}")
        self._precision = value

    precision = property(_get_precision, _set_precision)

    def get_output(self, index):
        return self._outputs[index]

    def get_input(self, index):
        return None

    def set_output_type(self, index, dtype):
        self._output_types[index] = dtype

    def get_output_type(self, index):
        return self._output_types.get(index, self._outputs[index].dtype)

    def output_type_is_set(self, index):
        return index in self._output_types

    def reset_precision(self):
        self._precision = None


class FakeNetwork(Faked):
    _real_name_ = "INetworkDefinition"

    def __init__(self, flags):
        self._flags = int(flags)
        self._inputs, self._outputs, self._layers = [], [], []
        self._source = None
        self._name = "network"

    name = property(lambda self: self._name, lambda self, v: setattr(self, "_name", v))
    num_inputs = property(lambda self: len(self._inputs))
    num_outputs = property(lambda self: len(self._outputs))
    num_layers = property(lambda self: len(self._layers))
    flags = property(lambda self: self._flags)
    has_implicit_batch_dimension = property(lambda self: False)
    error_recorder = property(lambda self: None)

    def get_input(self, i):
        return self._inputs[i]

    def get_output(self, i):
        return self._outputs[i]

    def get_layer(self, i):
        return self._layers[i]

    def get_flag(self, flag):
        return bool(self._flags & (1 << int(flag)))

    # the binding makes networks sequences of their layers (__len__, __getitem__)
    def __len__(self):
        return len(self._layers)

    def __getitem__(self, i):
        return self._layers[i]

    def strongly_typed(self):
        return self.get_flag(TRT.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


class FakeParser(Faked):
    _real_name_ = "OnnxParser"

    def __init__(self, network, logger):
        self._network, self._logger, self._errors = network, logger, []

    num_errors = property(lambda self: len(self._errors))

    def get_error(self, i):
        return self._errors[i]

    def clear_errors(self):
        self._errors.clear()

    def parse_from_file(self, model):
        import onnx

        proto = onnx.load(model, load_external_data=False)
        net = self._network
        net._source = str(Path(model).resolve())
        strongly = net._flags & (1 << int(TRT.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) \
            if hasattr(TRT.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") else 0
        net._strongly_typed = bool(strongly)

        def shape(vi):
            return [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]

        for vi in proto.graph.input:
            net._inputs.append(FakeTensor(vi.name, _onnx_dtype_to_trt(vi.type.tensor_type.elem_type), shape(vi), True))
        for vi in proto.graph.output:
            net._outputs.append(FakeTensor(vi.name, _onnx_dtype_to_trt(vi.type.tensor_type.elem_type), shape(vi)))
        for i, node in enumerate(proto.graph.node):
            dtype = TRT.float16 if (strongly and "fp16" in model) else TRT.float32
            outs = [FakeTensor(o, dtype, []) for o in node.output]
            net._layers.append(FakeLayer(i, node, outs))
        return True

    def parse(self, model, path=None):
        raise AssertionError("the project parses from a file (parse_from_file); parse() is not faked")

    def supports_model(self, model, path=None):
        return True


class FakeProfile(Faked):
    _real_name_ = "IOptimizationProfile"

    def __init__(self):
        self._shapes = {}

    def set_shape(self, input, min, opt, max):
        lo, mid, hi = (tuple(int(d) for d in s) for s in (min, opt, max))
        if not (len(lo) == len(mid) == len(hi)) or not all(a <= b <= c for a, b, c in zip(lo, mid, hi)):
            return None
        self._shapes[input] = {"min": list(lo), "opt": list(mid), "max": list(hi)}

    def get_shape(self, input):
        s = self._shapes.get(input)
        return [_dims(s[w]) for w in ("min", "opt", "max")] if s else []

    def set_shape_input(self, input, min, opt, max):
        raise AssertionError("no shape-tensor inputs in these graphs")

    def get_shape_input(self, input):
        return []

    def __bool__(self):
        return True


class FakeTimingCache(Faked):
    _real_name_ = "ITimingCache"

    def __init__(self, data: bytes):
        self._entries = json.loads(data.decode()) if data else []

    def serialize(self):
        return FakeHostMemory(json.dumps(self._entries).encode())

    def combine(self, input_cache, ignore_mismatch):
        self._entries += [e for e in input_cache._entries if e not in self._entries]
        return True

    def reset(self):
        self._entries = []
        return True


class FakeConfig(Faked):
    _real_name_ = "IBuilderConfig"

    def __init__(self):
        self._flags, self._pools, self._profiles, self._cache = 0, {}, [], None
        self._values = {}

    flags = property(lambda self: self._flags, lambda self, v: object.__setattr__(self, "_flags", int(v)))
    num_optimization_profiles = property(lambda self: len(self._profiles))
    profiling_verbosity = property(lambda self: self._values.get("profiling_verbosity", TRT.ProfilingVerbosity.LAYER_NAMES_ONLY),
                                   lambda self, v: self._values.__setitem__("profiling_verbosity", v))
    builder_optimization_level = property(lambda self: self._values.get("builder_optimization_level", 3),
                                          lambda self, v: self._values.__setitem__("builder_optimization_level", int(v)))
    engine_capability = property(lambda self: TRT.EngineCapability.STANDARD,
                                 lambda self, v: self._values.__setitem__("engine_capability", v))
    default_device_type = property(lambda self: TRT.DeviceType.GPU, lambda self, v: None)
    DLA_core = property(lambda self: -1, lambda self, v: None)
    avg_timing_iterations = property(lambda self: 1, lambda self, v: None)
    max_aux_streams = property(lambda self: -1, lambda self, v: None)
    hardware_compatibility_level = property(lambda self: TRT.HardwareCompatibilityLevel.NONE, lambda self, v: None)
    runtime_platform = property(lambda self: TRT.RuntimePlatform.SAME_AS_BUILD, lambda self, v: None)
    tiling_optimization_level = property(lambda self: TRT.TilingOptimizationLevel.NONE, lambda self, v: None)
    l2_limit_for_tiling = property(lambda self: -1, lambda self, v: None)
    max_num_tactics = property(lambda self: -1, lambda self, v: None)
    int8_calibrator = property(lambda self: None, lambda self, v: None)
    algorithm_selector = property(lambda self: None, lambda self, v: None)
    progress_monitor = property(lambda self: None, lambda self, v: None)
    profile_stream = property(lambda self: 0, lambda self, v: None)
    plugins_to_serialize = property(lambda self: [], lambda self, v: None)
    quantization_flags = property(lambda self: 0, lambda self, v: None)

    def set_flag(self, flag):
        self._flags |= 1 << int(flag)

    def clear_flag(self, flag):
        self._flags &= ~(1 << int(flag))

    def get_flag(self, flag):
        return bool(self._flags & (1 << int(flag)))

    def set_memory_pool_limit(self, pool, pool_size):
        self._pools[int(pool)] = int(pool_size)

    def get_memory_pool_limit(self, pool):
        return self._pools.get(int(pool), 1 << 40)

    def add_optimization_profile(self, profile):
        self._profiles.append(profile)
        return len(self._profiles) - 1

    def get_calibration_profile(self):
        return None

    def create_timing_cache(self, serialized_timing_cache):
        data = bytes(serialized_timing_cache)
        if data:
            STATS["timing_cache_loaded"].append(data)
        return FakeTimingCache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self._cache = cache
        return True

    def get_timing_cache(self):
        return self._cache

    def get_tactic_sources(self):
        return 0

    def set_tactic_sources(self, tactic_sources):
        return True

    def get_preview_feature(self, feature):
        return False

    def set_preview_feature(self, feature, enable):
        pass

    def get_quantization_flag(self, flag):
        return False

    def get_device_type(self, layer):
        return TRT.DeviceType.GPU

    def is_device_type_set(self, layer):
        return False

    def can_run_on_DLA(self, layer):
        return False


class FakeBuilder(Faked):
    _real_name_ = "Builder"

    def __init__(self, logger):
        if not isinstance(logger, TRT.ILogger):
            VIOLATIONS.append(f"Builder(logger={logger!r}): not a tensorrt.ILogger")
        self._logger = logger

    platform_has_fast_fp16 = property(lambda self: True)
    platform_has_tf32 = property(lambda self: True)
    platform_has_fast_int8 = property(lambda self: True)
    num_DLA_cores = property(lambda self: 0)
    max_threads = property(lambda self: 1, lambda self, v: None)
    error_recorder = property(lambda self: None, lambda self, v: None)

    def create_network(self, flags=0):
        return FakeNetwork(flags)

    def create_builder_config(self):
        return FakeConfig()

    def create_optimization_profile(self):
        return FakeProfile()

    def is_network_supported(self, network, config):
        return True

    def get_plugin_registry(self):
        return None

    def build_serialized_network(self, network, config):
        STATS["builds"] += 1
        flag = TRT.BuilderFlag
        if config._profiles:
            profile = config._profiles[0]._shapes
            missing = [t.name for t in network._inputs if t.name not in profile]
            if missing:
                VIOLATIONS.append(f"profile lacks inputs {missing}")
                return None
        else:
            profile = {}
        if config._cache is not None:  # what a build leaves in the timing cache
            config._cache._entries.append(f"{Path(network._source).name}:{len(profile)}")
        pinned = sum(1 for layer in network._layers if layer._precision is not None)
        plan = {
            "fake_plan": 1, "tensorrt": TRT.__version__, "source": network._source,
            "strongly_typed": network._strongly_typed,
            "fp16_flag": config.get_flag(flag.FP16) if hasattr(flag, "FP16") else False,
            "prefer_precision_constraints": config.get_flag(flag.PREFER_PRECISION_CONSTRAINTS)
            if hasattr(flag, "PREFER_PRECISION_CONSTRAINTS") else False,
            "tf32": config.get_flag(flag.TF32) if hasattr(flag, "TF32") else False,
            "pinned_layers": pinned, "profile": profile,
            "opt_level": config._values.get("builder_optimization_level"),
            "pools": {str(k): v for k, v in config._pools.items()},
            "timing_cache_entries": list(config._cache._entries) if config._cache else None,
            "inputs": [[t.name, str(t.dtype)] for t in network._inputs],
            "outputs": [[t.name, str(t.dtype)] for t in network._outputs],
        }
        return FakeHostMemory(json.dumps(plan).encode())


# -------------------------------------------------------------------------- runtime
class FakeRuntime(Faked):
    _real_name_ = "Runtime"

    def __init__(self, logger):
        self._logger = logger

    error_recorder = property(lambda self: None, lambda self, v: None)
    max_threads = property(lambda self: 1, lambda self, v: None)
    engine_host_code_allowed = property(lambda self: False, lambda self, v: None)

    def deserialize_cuda_engine(self, serialized_engine):
        data = bytes(serialized_engine)
        try:
            plan = json.loads(data.decode())
        except ValueError:
            self._logger.log(TRT.Logger.ERROR, "Serialization assertion failed: magic tag does not match")
            return None
        if plan.get("tensorrt") != TRT.__version__:
            self._logger.log(TRT.Logger.ERROR, "The engine plan file is not compatible with this version of TensorRT")
            return None
        engine = FakeEngine(plan, data)
        engine._logger = self._logger
        return engine


def _dtype_by_name(text):
    return getattr(TRT.DataType, text.split(".")[-1])


class FakeEngine(Faked):
    _real_name_ = "ICudaEngine"

    def __init__(self, plan, data):
        self._plan, self._data = plan, data
        self._io = [(n, _dtype_by_name(d), TRT.TensorIOMode.INPUT) for n, d in plan["inputs"]] + \
                   [(n, _dtype_by_name(d), TRT.TensorIOMode.OUTPUT) for n, d in plan["outputs"]]

    num_io_tensors = property(lambda self: len(self._io))
    num_optimization_profiles = property(lambda self: 1)
    device_memory_size = property(lambda self: _engine_memory(self))
    device_memory_size_v2 = property(lambda self: _engine_memory(self))
    name = property(lambda self: Path(self._plan["source"]).stem)
    num_layers = property(lambda self: 1)

    def get_tensor_name(self, index):
        return self._io[index][0]

    def get_tensor_dtype(self, name):
        return next(d for n, d, _ in self._io if n == name)

    def get_tensor_mode(self, name):
        return next(m for n, _, m in self._io if n == name)

    def get_tensor_shape(self, name):
        p = self._plan["profile"].get(name)
        return _dims([-1] * len(p["min"])) if p else _dims([])

    def get_tensor_profile_shape(self, name, profile_index):
        p = self._plan["profile"][name]
        return [_dims(p[w]) for w in ("min", "opt", "max")]

    def serialize(self):
        return FakeHostMemory(self._data)

    def create_execution_context(self, strategy=None):
        if strategy is not None and not isinstance(strategy, TRT.ExecutionContextAllocationStrategy):
            raise TypeError("strategy must be an ExecutionContextAllocationStrategy")
        user = strategy is not None and strategy == TRT.ExecutionContextAllocationStrategy.USER_MANAGED
        return FakeContext(self, user_memory=user)

    def create_execution_context_without_device_memory(self):
        return FakeContext(self, user_memory=True)


_SESSIONS: dict = {}


def _session(path):
    import onnxruntime as ort

    if path not in _SESSIONS:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.use_per_session_threads = False  # the project's ort backend sets up ORT's global thread pool
        try:
            _SESSIONS[path] = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        except Exception:  # no global pool in this process yet: a session of its own, one thread
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.intra_op_num_threads = 1
            _SESSIONS[path] = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return _SESSIONS[path]


class FakeContext(Faked):
    _real_name_ = "IExecutionContext"

    def __init__(self, engine, user_memory):
        self._engine, self._user_memory = engine, user_memory
        self._shapes, self._addresses = {}, {}
        self._memory = (0, 0)
        self._dirty = True  # shapes/memory changed since the last (uncaptured) enqueue
        self._logger = None

    engine = property(lambda self: self._engine)
    name = property(lambda self: "context", lambda self, v: None)
    debug_sync = property(lambda self: False, lambda self, v: None)
    error_recorder = property(lambda self: None, lambda self, v: None)
    profiler = property(lambda self: None, lambda self, v: None)
    active_optimization_profile = property(lambda self: 0)
    all_binding_shapes_specified = property(lambda self: all(n in self._shapes for n in self._inputs()))
    all_shape_inputs_specified = property(lambda self: True)
    persistent_cache_limit = property(lambda self: 0, lambda self, v: None)
    nvtx_verbosity = property(lambda self: None, lambda self, v: None)

    def _inputs(self):
        return [n for n, _, m in self._engine._io if m == TRT.TensorIOMode.INPUT]

    def _set_memory(self, ptr, size):
        if (ptr, size) != self._memory:
            self._dirty = True
        self._memory = (int(ptr), int(size))

    # TensorRT < 10.1: the device_memory property; >= 10.1: set_device_memory(memory, size)
    device_memory = property(lambda self: self._memory[0], lambda self, v: self._set_memory(v, _engine_memory(self)))

    def set_device_memory(self, memory, size):
        self._set_memory(memory, size)

    def update_device_memory_size_for_shapes(self):
        return _engine_memory(self)

    def set_input_shape(self, name, shape):
        shape = tuple(int(d) for d in shape)
        p = self._engine._plan["profile"].get(name)
        if p is None or len(shape) != len(p["min"]) or not all(a <= v <= b for v, a, b in zip(shape, p["min"], p["max"])):
            return False
        if self._shapes.get(name) != shape:
            self._dirty = True
        self._shapes[name] = shape
        return True

    def get_tensor_shape(self, name):
        if name in self._shapes:
            return _dims(self._shapes[name])
        return _dims(self._output_shapes()[name])

    def _output_shapes(self):
        sess = _session(self._engine._plan["source"])
        # the output shapes are those onnxruntime infers for the current input shapes
        feeds = {i.name: np.zeros(self._shapes[i.name], _np_type(i.type)) for i in sess.get_inputs()}
        key = tuple(sorted((k, v.shape) for k, v in feeds.items()))
        cache = self.__dict__.setdefault("_shape_cache", {})
        if key not in cache:
            outs = sess.run(None, feeds)
            cache[key] = {o.name: tuple(a.shape) for o, a in zip(sess.get_outputs(), outs)}
        return cache[key]

    def set_tensor_address(self, name, memory):
        if name not in [n for n, _, _ in self._engine._io]:
            return False
        if self._addresses.get(name) != int(memory):
            self._dirty = True
        self._addresses[name] = int(memory)
        return True

    def get_tensor_address(self, name):
        return self._addresses.get(name, 0)

    def set_optimization_profile_async(self, profile_index, stream_handle):
        return True

    def infer_shapes(self):
        return []

    def execute_async_v3(self, stream_handle):
        stream = _LIBCUDART.streams.get(int(stream_handle))
        if stream is None:
            return self._fail(f"enqueue on an unknown stream {stream_handle}")
        missing = [n for n, _, _ in self._engine._io if n not in self._addresses]
        if missing or not all(n in self._shapes for n in self._inputs()):
            return self._fail(f"tensor addresses or input shapes not set: {missing}")
        if self._user_memory:
            ptr, size = self._memory
            need = _engine_memory(self)
            if not _LIBCUDART.valid(ptr, need) or size < need:
                return self._fail(f"device memory {ptr:#x}+{size} is not a live allocation of >= {need} bytes")
        if stream.capturing is not None:
            if self._dirty or FAIL["capture_enqueue"]:
                STATS["capture_refused"] += 1
                stream.capture_invalid = True
                return self._fail("the first enqueue after a change of shapes, addresses or device memory "
                                  "cannot be captured; enqueue once before capturing")
            stream.capturing.append((self, dict(self._shapes), dict(self._addresses), self._memory))
            return True
        self._run(self._shapes, self._addresses, self._memory)
        self._dirty = False
        return True

    def _fail(self, message):
        logger = getattr(self._engine, "_logger", None)
        if logger is not None:
            logger.log(TRT.Logger.ERROR, message)
        STATS.setdefault("context_errors", []).append(message)
        return False

    def _run(self, shapes, addresses, memory):
        if self._user_memory and not _LIBCUDART.valid(memory[0], _engine_memory(self)):
            raise RuntimeError("replay with freed device memory")
        STATS["executions"] += 1
        sess = _session(self._engine._plan["source"])
        feeds = {}
        for i in sess.get_inputs():
            dtype = np.dtype(TRT.nptype(self._engine.get_tensor_dtype(i.name)))
            feeds[i.name] = _LIBCUDART.read(addresses[i.name], shapes[i.name], dtype).astype(_np_type(i.type))
        outs = sess.run(None, feeds)
        for o, value in zip(sess.get_outputs(), outs):
            dtype = np.dtype(TRT.nptype(self._engine.get_tensor_dtype(o.name)))
            _LIBCUDART.write(addresses[o.name], np.ascontiguousarray(value, dtype))


def _np_type(ort_type: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
            "tensor(int32)": np.int32}[ort_type]


# ------------------------------------------------------------------------ libcudart
class _Stream:
    def __init__(self, flags):
        self.flags, self.capturing, self.capture_invalid = flags, None, False


class FakeLibcudart:
    """libcudart as polygraphy.cuda loads it (ctypes calls), host memory for device memory."""

    def __init__(self):
        self.blocks: dict[int, ctypes.Array] = {}
        self.streams: dict[int, _Stream] = {}
        self.calls: list[str] = []
        self._next_stream = 0x1000

    def __getattr__(self, name):
        raise AttributeError(f"libcudart stand-in: {name} is not faked")

    def valid(self, ptr, nbytes):
        for base, block in self.blocks.items():
            if base <= ptr and ptr + nbytes <= base + ctypes.sizeof(block):
                return True
        return False

    def read(self, ptr, shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if not self.valid(ptr, n):
            raise RuntimeError(f"read of {n} bytes at {ptr:#x}: not device memory")
        return np.frombuffer(ctypes.string_at(ptr, n), dtype).reshape(shape).copy()

    def write(self, ptr, array):
        if not self.valid(ptr, array.nbytes):
            raise RuntimeError(f"write of {array.nbytes} bytes at {ptr:#x}: not device memory")
        ctypes.memmove(ptr, array.ctypes.data, array.nbytes)

    # the C API, as called through ctypes
    def cudaMalloc(self, ptr_ref, size):
        block = ctypes.create_string_buffer(int(size.value if hasattr(size, "value") else size))
        addr = ctypes.addressof(block)
        self.blocks[addr] = block
        ctypes.cast(ptr_ref, ctypes.POINTER(ctypes.c_void_p))[0] = addr
        return 0

    def cudaFree(self, ptr):
        addr = ptr.value if hasattr(ptr, "value") else ptr
        return 0 if self.blocks.pop(int(addr or 0), None) is not None or not addr else 1

    def cudaStreamCreate(self, ptr_ref):
        return self.cudaStreamCreateWithFlags(ptr_ref, ctypes.c_uint(0))

    def cudaStreamCreateWithFlags(self, ptr_ref, flags):
        self._next_stream += 0x10
        self.streams[self._next_stream] = _Stream(int(flags.value if hasattr(flags, "value") else flags))
        ctypes.cast(ptr_ref, ctypes.POINTER(ctypes.c_void_p))[0] = self._next_stream
        return 0

    def cudaStreamDestroy(self, stream):
        return 0 if self.streams.pop(int(stream.value or 0), None) is not None else 400

    def cudaStreamSynchronize(self, stream):
        s = self.streams.get(int(stream.value or 0))
        if s is None:
            return 400  # cudaErrorInvalidResourceHandle
        return 900 if s.capturing is not None else 0  # cudaErrorStreamCaptureUnsupported

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        n = int(count.value)
        d, s = int(dst.value or 0), int(src.value or 0)
        k = int(kind.value)
        st = self.streams.get(int(stream.value or 0))
        if st is None:
            return 400
        if (k == 1 and not self.valid(d, n)) or (k == 2 and not self.valid(s, n)):
            return 1  # cudaErrorInvalidValue
        ctypes.memmove(d, s, n)
        return 0

    def cudaGetLastError(self):
        return 0

    class _ErrorString:
        restype = None

        def __call__(self, rc):
            return f"fake CUDA error {int(rc.value if hasattr(rc, 'value') else rc)}".encode()

    cudaGetErrorString = _ErrorString()


class _PolyCuda:
    def __init__(self, lib):
        self.handle = lib


_LIBCUDART = FakeLibcudart()
_POLY_CUDA = _PolyCuda(_LIBCUDART)


class FakeLibcuda:
    """libcuda's device queries (ctypes), for gpu_identity: one stand-in GPU."""

    def cuInit(self, flags):
        return 0

    def cuDeviceGetCount(self, ref):
        ctypes.cast(ref, ctypes.POINTER(ctypes.c_int))[0] = 1
        return 0

    def cuDeviceGet(self, ref, ordinal):
        ctypes.cast(ref, ctypes.POINTER(ctypes.c_int))[0] = 0
        return 0

    def cuDeviceGetName(self, buf, size, device):
        ctypes.memmove(buf, GPU_NAME.encode() + b"\0", len(GPU_NAME) + 1)
        return 0

    def cuDeviceGetAttribute(self, ref, attr, device):
        value = {75: GPU_CC[0], 76: GPU_CC[1]}[attr.value]
        ctypes.cast(ref, ctypes.POINTER(ctypes.c_int))[0] = value
        return 0

    def cuDeviceTotalMem_v2(self, ref, device):
        ctypes.cast(ref, ctypes.POINTER(ctypes.c_size_t))[0] = 24 << 30
        return 0


# ------------------------------------------------------------- cuda-python runtime
class FakeCudaPythonRuntime:
    """cuda-python's runtime module with its graph calls faked: every attribute the backend
    touches must exist in the REAL module (names, enums), and faked calls must bind to the
    real function's parameters."""

    def __init__(self, real):
        self._real = real
        self.graphs: set[int] = set()
        self.execs: dict[int, list] = {}
        self._next = 0x5000
        self.touched: set[str] = set()

    def __getattr__(self, name):
        real = object.__getattribute__(self, "_real")
        if not hasattr(real, name):
            VIOLATIONS.append(f"cuda-python runtime has no {name}")
            raise AttributeError(f"module {real.__name__!r} has no attribute {name!r}")
        self.touched.add(name)
        impl = getattr(type(self), "_" + name, None)
        if impl is None:
            value = getattr(real, name)
            if callable(value) and not isinstance(value, type):
                raise AttributeError(f"cuda-python runtime {name}: called but not faked by the suite")
            return value
        real_fn = getattr(real, name)

        def call(*args):
            _check_arity(real_fn, name, args)
            return impl(self, *args)

        return call

    def _err(self, code=0):
        e = self._real.cudaError_t
        return e(code) if code else e.cudaSuccess

    def _stream(self, stream):
        return _LIBCUDART.streams.get(int(stream))

    def _cudaStreamBeginCapture(self, stream, mode):
        if not isinstance(mode, self._real.cudaStreamCaptureMode):
            VIOLATIONS.append(f"cudaStreamBeginCapture mode {mode!r} is not a cudaStreamCaptureMode")
        s = self._stream(stream)
        if s is None:
            return (self._err(400),)
        if s.flags & 1 == 0:  # a blocking stream: implicit synchronisation with the legacy stream breaks captures
            return (self._err(906),)  # cudaErrorStreamCaptureImplicit
        s.capturing, s.capture_invalid = [], False
        return (self._err(),)

    def _cudaStreamEndCapture(self, stream):
        s = self._stream(stream)
        if s is None or s.capturing is None:
            return (self._err(901), None)  # cudaErrorStreamCaptureUnmatched
        ops, s.capturing = s.capturing, None
        if s.capture_invalid:
            return (self._err(901), None)  # cudaErrorStreamCaptureInvalidated
        self._next += 1
        self.graphs.add(self._next)
        self.execs[-self._next] = ops
        STATS["graphs_alive"] = len(self.graphs) + len([k for k in self.execs if k > 0])
        return (self._err(), self._next)

    def _cudaGraphInstantiateWithFlags(self, graph, flags):
        if int(graph) not in self.graphs:
            return (self._err(400), None)
        self._next += 1
        self.execs[self._next] = self.execs[-int(graph)]
        STATS["captures"] += 1
        STATS["graphs_alive"] = len(self.graphs) + len([k for k in self.execs if k > 0])
        return (self._err(), self._next)

    def _cudaGraphLaunch(self, graphExec, stream):
        if FAIL["graph_launch"]:
            return (self._err(719),)  # cudaErrorLaunchFailure
        ops = self.execs.get(int(graphExec))
        if ops is None or self._stream(stream) is None:
            return (self._err(400),)
        STATS["launches"] += 1
        for context, shapes, addresses, memory in ops:
            context._run(shapes, addresses, memory)
        return (self._err(),)

    def _cudaGraphExecDestroy(self, graphExec):
        self.execs.pop(int(graphExec), None)
        STATS["graphs_alive"] = len(self.graphs) + len([k for k in self.execs if k > 0])
        return (self._err(),)

    def _cudaGraphDestroy(self, graph):
        self.graphs.discard(int(graph))
        self.execs.pop(-int(graph), None)
        STATS["graphs_alive"] = len(self.graphs) + len([k for k in self.execs if k > 0])
        return (self._err(),)

    def _cudaStreamIsCapturing(self, stream):
        s = self._stream(stream)
        status = self._real.cudaStreamCaptureStatus
        return (self._err(), status.cudaStreamCaptureStatusActive if s and s.capturing is not None
                else status.cudaStreamCaptureStatusNone)

    def _cudaGetErrorString(self, error):
        return (self._err(), f"fake error {int(error)}".encode())

    def _cudaGetErrorName(self, error):
        return (self._err(), f"cudaError{int(error)}".encode())


def _check_arity(fn, name, args):
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in params if p.default is p.empty]
    if not len(required) <= len(args) <= len(params):
        msg = f"cuda-python {name}{sig}: called with {len(args)} arguments"
        VIOLATIONS.append(msg)
        raise TypeError(msg)


def install_cuda_python(runtime_module):
    """Fake the graph calls of cuda-python's runtime module where the backend finds it."""
    fake = FakeCudaPythonRuntime(runtime_module)
    from deedsr.runtime.backends import cuda as backend_cuda

    backend_cuda.cudart_graphs = lambda: fake
    from deedsr.runtime.backends import trt as backend_trt

    backend_trt.cudart_graphs = lambda: fake
    return fake


_FAKES = [FakeTensor, FakeLayer, FakeNetwork, FakeParser, FakeProfile, FakeTimingCache, FakeConfig, FakeBuilder,
          FakeRuntime, FakeEngine, FakeContext]
