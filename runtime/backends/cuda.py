"""CUDA without torch: the GPU's identity from the driver (libcuda, ctypes), the few CUDA
runtime calls the trt backend needs (libcudart as polygraphy.cuda loads it), device buffers
that only grow, and cuda-python's runtime module for CUDA graphs when it is installed."""
from __future__ import annotations

import ctypes
import sys

import numpy as np

from ..errors import BackendError, EngineError, InsufficientMemory
from ..memory import human_bytes
from ..plans import GpuInfo


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


class Cudart:
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

    STREAM_NON_BLOCKING = 1  # cudaStreamNonBlocking

    def stream(self) -> int:
        """A non-blocking stream: no implicit synchronisation with the legacy default stream,
        which would invalidate a CUDA-graph capture when anything else touches that stream."""
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreateWithFlags(ctypes.byref(ptr), ctypes.c_uint(self.STREAM_NON_BLOCKING)),
                   "cudaStreamCreateWithFlags")
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


class DeviceBuffer:
    """A device allocation that only grows."""

    def __init__(self, cuda: Cudart, what: str):
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


def cudart_graphs():
    """cuda-python's runtime module (CUDA graphs), or None."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            return None
    return cudart
