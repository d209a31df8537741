"""ONNX graphs of an engine directory -> TensorRT plans in ENGINE_DIR/trt/, on the machine that
will run them, through polygraphy's Python API (network_from_onnx_path, CreateConfig, Profile,
engine_from_network, save_engine).

Per graph: choose the build mode from the TensorRT version (modes.py), the profile from the
manifest (profiles.py), build, write the plan to a temporary file and rename it, then record it
in manifest.json (atomic rewrite). A failure leaves no partial plan and no half-written
manifest; plans finished before it stay recorded, and a rerun skips plans that are up to date
(same TensorRT, GPU, source graph and settings) unless --force.

A persistent timing cache (trt/timing-<TensorRT>-<GPU>-sm<cc>.cache) makes rebuilds fast;
polygraphy reads it from an open file and writes it to a temporary file that is renamed over it.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from deedsr.runtime.backends.cuda import gpu_identity
from deedsr.runtime.backends.trt_api import import_tensorrt, is_oom_message
from deedsr.runtime.contract import GRAPH_ORDER, PER_STEP
from deedsr.runtime.errors import EngineError
from deedsr.runtime.manifest import Manifest
from deedsr.runtime.memory import human_bytes
from deedsr.runtime.memory import parse_bytes as _parse_bytes
from deedsr.runtime.plans import GpuInfo

from . import records
from .errors import BuildError
from .modes import (
    BuildMode,
    at_least,
    check_graph_version,
    choose_mode,
    supports_opt_level,
)
from .profiles import describe_profile, graph_profile, plan_dims


@dataclass
class BuildOptions:
    graphs: tuple[str, ...] | None = None  # default: every graph of the engine directory
    mode: str = "auto"                     # auto | strongly-typed | fp16-flag | fp32
    static: bool = False                   # fixed tile shape for the per-step graphs (CUDA graphs)
    max_batch: int | None = None           # tiles per call of the per-step plans (<= the export's)
    opt_level: int | None = None           # builder optimisation level 0..5 (TensorRT >= 8.6)
    workspace: int | None = None           # workspace memory pool limit, bytes
    timing_cache: bool = True
    fp32_islands: bool = True              # fp16-flag mode: keep normalisation/softmax/exp... in fp32
    force: bool = False                    # rebuild plans that are up to date
    verbose: bool = False                  # polygraphy's and TensorRT's log on stderr


@dataclass
class BuiltPlan:
    graph: str
    record: dict
    skipped: bool = False
    seconds: float = 0.0


@dataclass
class _Env:
    root: Path
    manifest: Manifest
    trt: object
    gpu: GpuInfo
    version: str
    mode: BuildMode
    options: BuildOptions
    log: list = field(default_factory=list)


def parse_bytes(text: str | int | None) -> int | None:
    """"4G", "512M", "1.5GiB", 1048576 -> bytes."""
    if text is None or isinstance(text, int):
        return text
    try:
        return _parse_bytes(str(text))
    except ValueError:
        raise BuildError(f"cannot read a memory size from {text!r} (e.g. 4G, 512M)") from None


def select_graphs(manifest: Manifest, graphs) -> list[str]:
    names = [g for g in GRAPH_ORDER if g in manifest.graphs] + \
        [g for g in manifest.graphs if g not in GRAPH_ORDER]
    if not graphs:
        return names
    unknown = [g for g in graphs if g not in manifest.graphs]
    if unknown:
        raise BuildError(f"{manifest.root} has no graph {', '.join(unknown)} (it has {', '.join(names)})")
    return [g for g in names if g in graphs]


def available_precisions(manifest: Manifest, graphs) -> list[str]:
    """Precisions every one of `graphs` has a graph file in."""
    return [p for p in ("fp32", "fp16") if all(manifest.has_graph(g, p) for g in graphs)]


def plan_settings(data, graph: str, options: BuildOptions) -> tuple[dict, dict]:
    """(dims, profile) of `graph`'s plan: pure, from the manifest and the options."""
    dims = plan_dims(data, graph, static=options.static, max_batch=options.max_batch)
    return dims, graph_profile(data, graph, dims)


# ---------------------------------------------------------------------------- polygraphy
MIN_POLYGRAPHY = (0, 53, 4)  # older ones: raw AttributeErrors on TensorRT 11, no captured log, no pip CUDA runtime
POLYGRAPHY_HINT = "pip install -U 'polygraphy>=0.53.4'"


def _polygraphy():
    try:
        import polygraphy
        from polygraphy.backend.trt import (
            CreateConfig,
            Profile,
            engine_from_network,
            network_from_onnx_path,
            save_engine,
        )
        from polygraphy.exception import PolygraphyException
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise BuildError(f"building plans needs polygraphy: {POLYGRAPHY_HINT}") from None
    version = str(getattr(polygraphy, "__version__", "0"))
    if not at_least(version, MIN_POLYGRAPHY):
        raise BuildError(f"polygraphy {version} is too old to build plans for this project: {POLYGRAPHY_HINT}")
    return {"version": getattr(polygraphy, "__version__", None), "CreateConfig": CreateConfig, "Profile": Profile,
            "engine_from_network": engine_from_network, "network_from_onnx_path": network_from_onnx_path,
            "save_engine": save_engine, "PolygraphyException": PolygraphyException, "G_LOGGER": G_LOGGER}


@contextlib.contextmanager
def _captured_log(G_LOGGER, verbose: bool):
    """Route polygraphy's (and through it TensorRT's) messages into a list, so that failures are
    reported as one line; with `verbose` they also go to stderr."""
    lines: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            text = record.getMessage()
            for line in text.splitlines():
                line = line.strip()
                if line.startswith("[") and "]" in line[:4]:
                    line = line[line.index("]") + 1:].strip()
                if line:
                    lines.append(line)

    old_severity, old_colors = G_LOGGER.module_severity, getattr(G_LOGGER, "colors", False)
    G_LOGGER.module_severity = G_LOGGER.VERBOSE if verbose else G_LOGGER.WARNING
    G_LOGGER.colors = False  # plain text (and no notice about the optional 'colored' module)
    routed = hasattr(type(G_LOGGER), "use_python_logging_system")
    pylog = logging.getLogger("Polygraphy")
    handlers = [_Keep()] + ([logging.StreamHandler(sys.stderr)] if verbose else [])
    old = (G_LOGGER.use_python_logging_system if routed else None, pylog.propagate, pylog.level)
    if routed:
        G_LOGGER.use_python_logging_system = True
        for h in handlers:
            pylog.addHandler(h)
        pylog.propagate = False
        pylog.setLevel(1)
    try:
        yield lines
    finally:
        G_LOGGER.module_severity = old_severity
        G_LOGGER.colors = old_colors
        if routed:
            for h in handlers:
                pylog.removeHandler(h)
            G_LOGGER.use_python_logging_system = old[0]
            pylog.propagate = old[1]
            pylog.setLevel(old[2])


def _first_error(lines: list[str], default: str) -> str:
    interesting = [ln for ln in lines if "error" in ln.lower() or "fail" in ln.lower() or is_oom_message(ln)]
    text = (interesting or lines or [default])[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _pin_fp32_islands(trt, network) -> int:
    """fp16-flag mode: ask for fp32 in the layers the fp16 export keeps in fp32 (normalisation,
    its reductions, softmax, exp/sin/cos/sqrt/erf, pow), with PREFER_PRECISION_CONSTRAINTS."""
    from polygraphy.backend.trt import util as trt_util

    classes = trt_util.get_layer_class_mapping()
    LT = trt.LayerType
    always = {getattr(LT, n) for n in ("SOFTMAX", "NORMALIZATION", "REDUCE", "PLUGIN_V2") if hasattr(LT, n)}
    unary = {getattr(trt.UnaryOperation, n) for n in ("EXP", "SIN", "COS", "SQRT", "ERF")
             if hasattr(trt.UnaryOperation, n)}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = layer.type
        if kind in always:
            wanted = True
        elif kind == LT.UNARY and kind in classes:
            layer.__class__ = classes[kind]
            wanted = layer.op in unary
        elif kind == LT.ELEMENTWISE and kind in classes:
            layer.__class__ = classes[kind]
            wanted = layer.op == trt.ElementWiseOperation.POW
        else:
            wanted = False
        if not wanted:
            continue
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outputs or any(o.dtype != trt.float32 or getattr(o, "is_shape_tensor", False) for o in outputs):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


# ------------------------------------------------------------------------------- building
def build_plans(engine_dir, options: BuildOptions | None = None,
                echo: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> list[BuiltPlan]:
    """Build (or confirm up to date) the plans of an engine directory; returns one entry per graph.
    Raises BuildError (one line, with the fix)."""
    options = options or BuildOptions()
    try:
        manifest = Manifest.load(engine_dir)
    except EngineError as e:
        raise BuildError(str(e)) from None
    root = Path(manifest.root)
    graphs = select_graphs(manifest, options.graphs)
    where = "plans are built on the machine that will run them"
    try:
        trt = import_tensorrt(otherwise=f"{where}, then rerun")
        gpu = gpu_identity(otherwise=f"{where}, which needs an NVIDIA GPU")
    except EngineError as e:
        raise BuildError(str(e)) from None
    poly = _polygraphy()
    version = str(trt.__version__)
    mode = choose_mode(version, options.mode, available_precisions(manifest, graphs), options.fp32_islands)
    if options.opt_level is not None:
        if not 0 <= options.opt_level <= 5:
            raise BuildError(f"--opt-level must be in 0..5, got {options.opt_level}")
        if not supports_opt_level(version):
            raise BuildError(f"--opt-level needs TensorRT 8.6 or newer (this is {version}); leave it out")
    settings = {}
    for graph in graphs:
        entry = manifest.data["graphs"][graph]["precisions"][mode.source_precision]
        check_graph_version(version, graph, entry)
        settings[graph] = plan_settings(manifest.data, graph, options)
    try:
        manifest.check_files(mode.source_precision, graphs)
    except EngineError as e:
        raise BuildError(str(e)) from None
    env = _Env(root, manifest, trt, gpu, version, mode, options)
    _init_plugins(trt)
    echo(f"building {len(graphs)} TensorRT plans in {root / records.PLAN_DIR}: TensorRT {version}, "
         f"{gpu.describe()}, {mode.describe()}")
    built, started = [], time.perf_counter()
    for i, graph in enumerate(graphs, 1):
        built.append(_build_one(env, poly, graph, *settings[graph], f"[{i}/{len(graphs)}]", echo))
    done = [b for b in built if not b.skipped]
    echo(f"{len(done)} built, {len(built) - len(done)} up to date, {time.perf_counter() - started:.1f} s")
    return built


def _build_one(env: _Env, poly: dict, graph: str, dims: dict, profile: dict, tag: str, echo) -> BuiltPlan:
    trt, mode, options, root = env.trt, env.mode, env.options, env.root
    source = env.manifest.data["graphs"][graph]["precisions"][mode.source_precision]
    flags = records.build_flags(mode, static=options.static and _per_step(env, graph), opt_level=options.opt_level,
                                workspace=options.workspace, timing_cache=options.timing_cache)
    existing = records.plan_records(env.manifest.data).get(graph)
    if not options.force and records.up_to_date(
            existing, root, tensorrt_version=env.version, gpu=env.gpu, mode=mode, source=source, profile=profile,
            flags={**flags, "fp32_layers": (existing or {}).get("build", {}).get("fp32_layers", 0)}):
        echo(f"{tag} {graph}: up to date ({existing['file']}, built {existing.get('built_at', '?')})")
        return BuiltPlan(graph, existing, skipped=True)

    echo(f"{tag} {graph}: building, profile {describe_profile(profile)} ...")
    plan_rel = f"{records.PLAN_DIR}/{graph}.plan"
    plan_path = root / plan_rel
    cache_rel = records.timing_cache_name(env.version, env.gpu) if options.timing_cache else None
    cache_path = root / cache_rel if cache_rel else None
    started = time.perf_counter()
    plan_dir = root / records.PLAN_DIR
    made_dir = not plan_dir.exists()
    plan_dir.mkdir(exist_ok=True)
    try:
        with _captured_log(poly["G_LOGGER"], options.verbose) as lines:
            network = _parse(env, poly, graph, root / source["file"], lines)
            fp32_layers = _pin_fp32_islands(trt, network[1]) if mode.fp16_flag and mode.fp32_islands else 0
            flags["fp32_layers"] = fp32_layers
            engine = _build_engine(env, poly, graph, network, profile, fp32_layers, cache_path, lines)
            try:
                io_dtypes = _check_io(env, graph, engine)
                records.write_atomic(plan_path, lambda tmp, built=engine: poly["save_engine"](built, str(tmp)))
            finally:
                del engine, network
                gc.collect()
    except BaseException:
        if made_dir and not any(plan_dir.iterdir()):
            plan_dir.rmdir()
        raise
    seconds = time.perf_counter() - started
    record = records.plan_record(
        graph=graph, plan_file=plan_rel, plan_bytes=plan_path.stat().st_size,
        plan_sha256=records.sha256_file(plan_path), tensorrt_version=env.version, gpu=env.gpu, mode=mode,
        source=source, dims=dims, profile=profile, static=flags["static_tile"], flags=flags, io_dtypes=io_dtypes,
        build_seconds=seconds, polygraphy_version=poly["version"])
    records.set_plan(root, graph, record, cache_rel)
    echo(f"{tag} {graph}: {seconds:.1f} s, {human_bytes(record['bytes'])} -> {plan_rel}")
    return BuiltPlan(graph, record, seconds=seconds)


def _init_plugins(trt) -> None:
    """TensorRT's own plugins (InstanceNormalization on 8.x parses into one): registered here, as
    not every polygraphy version does it before parsing."""
    try:
        trt.init_libnvinfer_plugins(trt.Logger(trt.Logger.ERROR), "")
    except Exception:  # a missing plugin library only matters to graphs that need a plugin
        pass


def _per_step(env: _Env, graph: str) -> bool:
    return env.manifest.graphs[graph].stage == PER_STEP


def _parse(env: _Env, poly: dict, graph: str, path: Path, lines: list[str]):
    kwargs = {"strongly_typed": True} if env.mode.strongly_typed else {}
    if kwargs:
        import inspect

        from polygraphy.backend.trt import NetworkFromOnnxPath

        if "strongly_typed" not in inspect.signature(NetworkFromOnnxPath.__init__).parameters:
            raise BuildError(f"polygraphy {poly['version']} cannot build strongly typed networks: "
                             "pip install -U polygraphy")
    try:
        return poly["network_from_onnx_path"](str(path), **kwargs)
    except poly["PolygraphyException"]:
        why = _first_error(lines, "no message")
        raise BuildError(f"TensorRT {env.version} cannot parse {path} ({why}); re-export (opset <= 17), or use a "
                         "newer TensorRT") from None


def _build_engine(env: _Env, poly: dict, graph: str, network, profile: dict, fp32_layers: int,
                  cache_path: Path | None, lines: list[str]):
    trt, mode, options = env.trt, env.mode, env.options
    prof = poly["Profile"]()
    for name, shapes in profile.items():
        prof.add(name, min=tuple(shapes["min"]), opt=tuple(shapes["opt"]), max=tuple(shapes["max"]))
    kwargs: dict = {"profiles": [prof]}
    if mode.fp16_flag:  # never on TensorRT >= 11 (choose_mode refuses), where it raises
        kwargs["fp16"] = True
    if fp32_layers:
        kwargs["precision_constraints"] = "prefer"
    if options.opt_level is not None:
        kwargs["builder_optimization_level"] = options.opt_level
    if options.workspace:
        kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(options.workspace)}
    cache_tmp = None
    stack = contextlib.ExitStack()
    if cache_path is not None:
        if cache_path.is_file():
            # an open binary file: polygraphy checks a file-like object's .mode (io.BytesIO has none,
            # and then every build fails with "load_timing_cache ... is not available")
            kwargs["load_timing_cache"] = stack.enter_context(open(cache_path, "rb"))
        cache_tmp = cache_path.with_name(f".{cache_path.name}.tmp-{os.getpid()}")
    try:
        try:
            engine = poly["engine_from_network"](network, config=poly["CreateConfig"](**kwargs),
                                                 save_timing_cache=str(cache_tmp) if cache_tmp else None)
        except poly["PolygraphyException"]:
            engine = None
        except MemoryError:
            raise BuildError(f"out of host memory building {graph}; close other programs or use a machine with "
                             "more RAM") from None
        except (AttributeError, TypeError) as e:  # polygraphy and TensorRT disagreeing on the API
            raise BuildError(f"polygraphy {poly['version']} cannot drive TensorRT {env.version} ({e}); "
                             f"{POLYGRAPHY_HINT}") from None
        if engine is None:
            why = _first_error(lines, "the builder returned no engine")
            if is_oom_message(why) or any(is_oom_message(ln) for ln in lines):
                free = f" ({human_bytes(env.gpu.memory)})" if env.gpu.memory else ""
                raise BuildError(f"GPU out of memory building {graph} on {env.gpu.name}{free}; lower --max-batch, "
                                 "--workspace or --opt-level, close other GPU programs, or re-export with a smaller "
                                 "--max-size/--tile")
            raise BuildError(f"TensorRT {env.version} could not build {graph} ({why}); rerun with --verbose for "
                             "TensorRT's log")
        if cache_tmp is not None and cache_tmp.is_file():
            records.make_readable(cache_tmp)
            os.replace(cache_tmp, cache_path)
        return engine
    finally:
        stack.close()
        if cache_tmp is not None:
            cache_tmp.unlink(missing_ok=True)
            Path(str(cache_tmp) + ".lock").unlink(missing_ok=True)


def _check_io(env: _Env, graph: str, engine) -> dict[str, str]:
    """The plan's I/O tensors are the manifest's (names) and their dtypes, for the record."""
    import numpy as np

    trt = env.trt
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    spec = env.manifest.graphs[graph]
    if set(names) != set(spec.input_names) | set(spec.output_names):
        raise BuildError(f"the {graph} plan's tensors {sorted(names)} differ from manifest.json's; re-export")
    return {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))).name for n in names}
