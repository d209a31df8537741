"""onnxruntime backend.

CPU: CPUExecutionProvider, `threads` intra-op threads (default: onnxruntime's, one per
physical core) in one thread pool shared by all sessions (`_global_thread_pool`), sequential
execution, all graph optimisations, one CPU memory arena shared by all sessions
(`_shared_cpu_arena`).

GPU (only when onnxruntime-gpu is installed; cannot be exercised on the machines this project
is tested on, so it is kept thin and on documented APIs): the providers are
TensorrtExecutionProvider (engine cache under $DEEDSR_CACHE/ort-trt) and/or
CUDAExecutionProvider, then CPU. `denoise` binds the adapter's outputs to CUDA memory with
IOBinding and feeds those OrtValues straight into the UNet, so the local maps and tokens never
travel to the host; only x_t, z_lr, the timestep and conditions go up and eps comes back.

Thread safety: one InferenceSession per graph, created on first use under a lock and then
shared; `InferenceSession.run` may be called from several threads at once. IOBindings are
made per call.
"""
from __future__ import annotations

import logging
import threading

import numpy as np

from ..contract import ADAPTER, DENOISER, UNET
from ..errors import BackendError, EngineError
from ..manifest import Manifest
from ..memory import cache_root
from . import Backend

log = logging.getLogger(__name__)


_arena_lock = threading.Lock()
_arena: bool | None = None


def _shared_cpu_arena(ort) -> bool:
    """One CPU memory arena for all sessions of the process, growing by what is asked for.

    Per-session arenas each keep their own peak and grow in powers of two (peak RSS 1.6 GB on
    the tiny preset at 128x128 against 0.8 GB shared; sd21-base 10.6 GB against 8.5 GB, same
    step time); no arena at all is 10 % slower or worse on the sd21-base UNet (every large
    activation is a fresh mmap, page-faulted again)."""
    global _arena
    with _arena_lock:
        if _arena is None:
            try:
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))  # 1: kSameAsRequested
                _arena = True
            except Exception as e:  # already registered by the host application, or an old onnxruntime
                _arena = "already" in str(e).lower()
                log.info("shared CPU arena: %s", "in place" if _arena else f"not available ({e})")
        return _arena


_pool: int | bool | None = None  # threads of the process-wide pool (0: default), False: not ours


def _global_thread_pool(ort, threads: int | None) -> bool:
    """One intra-op thread pool for all sessions of the process, sized by the first backend that
    opens a session; later backends share it whatever thread count they ask for.

    Per-session pools each spin for a while after a call, so the adapter's pool and the UNet's
    compete for the same cores: on the tiny preset (2 cores) a 10-step image took 2.5 s with
    per-session pools and 1.5 s with one shared pool."""
    global _pool
    wanted = int(threads or 0)
    with _arena_lock:
        if _pool is None:
            try:
                ort.set_global_thread_pool_sizes(wanted, 1)
                _pool = wanted
            except Exception as e:  # the host application created the global pools already
                log.info("process-wide thread pool not available (%s); one pool per session", e)
                _pool = False
        if _pool is not False and _pool != wanted:
            # Once the process-wide pool exists onnxruntime refuses sessions with their own pools
            # ("use_per_session_threads must be false when using a global thread pool").
            log.warning("process-wide thread pool has %s threads, %s asked for: using the pool",
                        _pool or "default", wanted or "default")
        return _pool is not False


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, manifest: Manifest, precision: str, threads: int | None = None,
                 gpu_providers: list[str] | None = None, use_denoiser: bool | None = None):
        super().__init__(manifest, precision, DENOISER in manifest.graphs_for(precision, use_denoiser))
        import onnxruntime

        self._ort = onnxruntime
        self.threads = threads
        self.providers = self._providers(gpu_providers or [])
        self.on_device = bool(gpu_providers)
        self._sessions: dict[str, object] = {}
        self._lock = threading.Lock()
        log.info("ort backend: %s graphs, providers %s, threads %s", precision,
                 [p[0] if isinstance(p, tuple) else p for p in self.providers], threads or "default")

    def _providers(self, gpu: list[str]) -> list:
        providers: list = []
        if "TensorrtExecutionProvider" in gpu:
            cache = cache_root() / "ort-trt"
            cache.mkdir(parents=True, exist_ok=True)
            providers.append(("TensorrtExecutionProvider", {
                "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
            }))
        if "CUDAExecutionProvider" in gpu:
            providers.append("CUDAExecutionProvider")
        providers.append("CPUExecutionProvider")
        return providers

    def describe(self) -> str:
        names = [p[0] if isinstance(p, tuple) else p for p in self.providers]
        return f"ort {self.precision} ({', '.join(n.replace('ExecutionProvider', '') for n in names)})"

    # ------------------------------------------------------------------ sessions
    def session(self, graph: str):
        sess = self._sessions.get(graph)
        if sess is not None:
            return sess
        with self._lock:
            sess = self._sessions.get(graph)
            if sess is None:
                sess = self._sessions[graph] = self._create(graph)
        return sess

    def _create(self, graph: str):
        ort = self._ort
        entry = self.manifest.graph_file(graph, self.precision)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if _global_thread_pool(ort, self.threads):
            options.use_per_session_threads = False
        else:
            options.inter_op_num_threads = 1
            if self.threads:
                options.intra_op_num_threads = int(self.threads)
        options.log_severity_level = 3
        if _shared_cpu_arena(ort):
            options.add_session_config_entry("session.use_env_allocators", "1")
        if not entry.file.is_file():
            raise EngineError(f"{entry.file}: missing; the engine directory is incomplete, re-export")
        try:
            # A path (not bytes) so that external data beside the graph is found.
            sess = ort.InferenceSession(str(entry.file), sess_options=options, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EngineError(f"{entry.file}: onnxruntime cannot load it ({first[:300]}); re-export") from None
        names = {i.name for i in sess.get_inputs()}
        spec = self.manifest.graphs[graph]
        if set(spec.input_names) != names:
            raise EngineError(f"{entry.file}: inputs {sorted(names)} differ from manifest.json's "
                              f"{sorted(spec.input_names)}; re-export")
        log.info("loaded %s", entry.file)
        return sess

    def preload(self) -> None:
        for graph in self.graphs():
            self.session(graph)

    # -------------------------------------------------------------------- running
    def run_raw(self, graph, feeds, outputs=None):
        sess = self.session(graph)
        names = outputs or self.manifest.graphs[graph].output_names
        try:
            values = sess.run(names, feeds)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BackendError(f"{graph}: onnxruntime failed ({first[:300]})") from None
        return dict(zip(names, values))

    def denoise(self, x_t, timestep, z_lr, conditions):
        if not self.on_device or self.use_denoiser:
            return super().denoise(x_t, timestep, z_lr, conditions)
        # GPU: adapter outputs stay in CUDA memory and go straight into the UNet.
        adapter, unet = self.session(ADAPTER), self.session(UNET)
        try:
            bind = adapter.io_binding()
            for name, value in self.cast_inputs(ADAPTER, {"z_lr": z_lr, "timestep": timestep,
                                                          **conditions}).items():
                bind.bind_cpu_input(name, value)
            out_names = self.manifest.graphs[ADAPTER].output_names
            for name in out_names:
                bind.bind_output(name, "cuda")
            adapter.run_with_iobinding(bind)
            device_outputs = bind.get_outputs()
            bind2 = unet.io_binding()
            for name, value in self.cast_inputs(UNET, {"x_t": x_t, "timestep": timestep}).items():
                bind2.bind_cpu_input(name, value)
            for name, value in zip(out_names, device_outputs):
                bind2.bind_ortvalue_input(name, value)
            bind2.bind_output("eps", "cpu")
            unet.run_with_iobinding(bind2)
            eps = bind2.copy_outputs_to_cpu()[0]
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BackendError(f"adapter/unet: onnxruntime failed ({first[:300]})") from None
        return eps.astype(np.float32, copy=False)

    def loaded_bytes(self) -> int:
        """Bytes of graph files already loaded (their weights are resident)."""
        return sum(self.manifest.graph_file(g, self.precision).bytes or 0 for g in list(self._sessions))

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()
