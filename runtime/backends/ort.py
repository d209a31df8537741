"""onnxruntime backend.

CPU: CPUExecutionProvider, `threads` intra-op threads per session (default: onnxruntime's, one
per physical core) that do not spin after a call, sequential execution, all graph
optimisations, one CPU memory arena shared by all sessions (`_shared_cpu_arena`), no memory
patterns. Nothing process-wide that would change how the host application's own sessions must
be created.

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
        options.inter_op_num_threads = 1
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
        # Threads that spin after a call compete with the next graph's (adapter, then UNet) for
        # the same cores. A process-wide pool avoided that too, but it makes onnxruntime refuse
        # every later session with its own pool, the host application's included.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # A memory pattern (one block planned for all of a run's activations) doubles every
        # graph's working set for no measurable speed with the shared arena: sd21-base, 2 CPU
        # threads: UNet tile 64 1.40 -> 0.71 GiB, VAE decoder window 48 1.45 -> 0.89 GiB.
        options.enable_mem_pattern = False
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
        spec = self.manifest.graphs[graph]
        for kind, declared, actual in (("inputs", spec.inputs, sess.get_inputs()),
                                       ("outputs", spec.outputs, sess.get_outputs())):
            names = {t.name for t in actual}
            if {t.name for t in declared} != names:
                raise EngineError(f"{entry.file}: {kind} {sorted(names)} differ from manifest.json's "
                                  f"{sorted(t.name for t in declared)}; re-export")
            shapes = {t.name: t.shape for t in actual}
            for t in declared:  # fixed axes (channels) must agree; named axes are dynamic
                got = shapes[t.name]
                if len(got) != len(t.shape) or any(isinstance(a, int) and isinstance(b, int) and a != b
                                                   for a, b in zip(t.shape, got)):
                    raise EngineError(f"{entry.file}: {t.name} has shape {list(got)}, manifest.json says "
                                      f"{list(t.shape)}; re-export")
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
