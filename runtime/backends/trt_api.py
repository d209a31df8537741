"""The TensorRT Python API across versions 8.5 .. 11: importing it with a one-line error, a
logger that keeps the last errors, and the calls whose names changed between versions."""
from __future__ import annotations

import collections
import logging

from ..errors import EngineError

log = logging.getLogger(__name__)


INSTALL_HINT = ("pip install tensorrt-cu12 on CUDA 12 drivers or tensorrt-cu13 on CUDA 13 (plain `tensorrt` now "
                "installs the CUDA 13 build), or JetPack's python3-libnvinfer")


def import_tensorrt(otherwise: str = "or use --backend ort"):
    """The tensorrt module, or EngineError with what to install (ending in `otherwise`)."""
    try:
        import tensorrt
    except ModuleNotFoundError as e:
        if e.name in ("tensorrt", "tensorrt_bindings"):
            raise EngineError(f"TensorRT is not installed: {INSTALL_HINT}; {otherwise}") from None
        raise EngineError(f"TensorRT cannot be imported (module {e.name} is missing): reinstall it: "
                          f"{INSTALL_HINT}; {otherwise}") from None
    except ImportError as e:  # the binding is there, its native libraries (libnvinfer ...) are not
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise EngineError(f"TensorRT's Python binding is installed but its libraries cannot be loaded ({first}): "
                          "install the TensorRT libraries of the same version (pip install tensorrt-cu12 or "
                          f"tensorrt-cu13, which bring libnvinfer; on JetPack apt install tensorrt); {otherwise}") from None
    except Exception as e:  # OSError and the like: CUDA libraries not loadable
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EngineError(f"TensorRT cannot be loaded ({first[:200]}); check the CUDA and TensorRT "
                          f"libraries; {otherwise}") from None
    return tensorrt


def make_logger(trt):
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


def memory_size(engine) -> int:
    if hasattr(engine, "device_memory_size_v2"):  # TensorRT >= 10.1
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


def create_context(trt, engine):
    """An execution context without activation memory of its own (the backend supplies it)."""
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    if strategy is not None:  # TensorRT >= 10
        return engine.create_execution_context(strategy.USER_MANAGED)
    return engine.create_execution_context_without_device_memory()  # 8.5 .. 9.x


def set_context_memory(context, ptr: int, size: int) -> None:
    if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1
        context.set_device_memory(ptr, size)
    else:
        context.device_memory = ptr
