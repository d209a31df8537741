"""The Python half of libdeedsr: what the C functions of deedsr.h call inside the embedded
interpreter. Upscalers live in a table keyed by the handle the C side holds; every call maps
its outcome to a return code and, on failure, a one-line message for deedsr_last_error().

Nothing here prints or lets an exception escape into cffi (which would print it): errors
become codes. The image is the one `Upscaler.upscale` returns for the same arguments.
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
from typing import Callable

import numpy as np

from ..backends import BACKENDS
from ..errors import BackendError, Cancelled, EngineError
from ..upscaler import Upscaler

OK, BAD_ARGUMENT, ENGINE_ERROR, OUT_OF_MEMORY, CANCELLED, INTERNAL_ERROR = range(6)
SCALE = 4  # the ABI's output size is 4x the input


class Upscalers:
    """Open upscalers by handle; safe to use from many threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[int, Upscaler] = {}
        self._handles = itertools.count(1)

    def add(self, upscaler: Upscaler) -> int:
        with self._lock:
            handle = next(self._handles)
            self._open[handle] = upscaler
            return handle

    def get(self, handle: int) -> Upscaler:
        with self._lock:
            upscaler = self._open.get(handle)
        if upscaler is None:
            raise ValueError(f"upscaler {handle} is not open (closed already?)")
        return upscaler

    def close(self, handle: int) -> None:
        with self._lock:
            upscaler = self._open.pop(handle, None)
        if upscaler is not None:
            upscaler.close()


def code_for(error: BaseException) -> int:
    if isinstance(error, Cancelled):
        return CANCELLED
    if isinstance(error, MemoryError):  # InsufficientMemory included
        return OUT_OF_MEMORY
    if isinstance(error, (EngineError, BackendError)):
        return ENGINE_ERROR
    if isinstance(error, ValueError):  # ShapeError included: sizes and options out of range
        return BAD_ARGUMENT
    return INTERNAL_ERROR


def message_for(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if code_for(error) == INTERNAL_ERROR:
        return f"internal error: {type(error).__name__}: {text}"
    return text


def open_upscaler(engine_dir: str, backend: str) -> Upscaler:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    upscaler = Upscaler.from_engine_dir(engine_dir, backend=backend)
    try:
        if upscaler.scale != SCALE:
            raise EngineError(f"{engine_dir}: the engines upscale x{upscaler.scale}; libdeedsr's ABI is x{SCALE}")
        upscaler.backend.preload()  # a corrupt graph fails here, not in the first upscale
    except BaseException:
        upscaler.close()
        raise
    return upscaler


def ffi_eta(eta: float) -> float | None:
    """eta < 0 is the default; otherwise the shortest decimal of the float32 the caller passed,
    so 0.3f from C samples exactly like eta=0.3 from Python."""
    return None if eta < 0 else float(str(np.float32(eta)))


def upscale_into(upscaler: Upscaler, image: np.ndarray, out: np.ndarray, seed: int, steps: int, eta: float,
                 progress: Callable[[int, int], int] | None) -> None:
    """Upscale `image` (HxWx3 uint8) into the view `out` (4Hx4Wx3) with the ABI's defaults:
    steps 0 and eta < 0 mean the engine directory's; `progress(step, steps) == 0` cancels."""
    callback = None
    if progress is not None:
        def callback(info):
            return progress(info.index + 1, info.steps) != 0
    sr = upscaler.upscale(image, seed=seed, steps=steps or None, eta=ffi_eta(eta), callback=callback)
    out[...] = sr  # only now: a failed or cancelled call leaves the caller's buffer as it was


def _quiet() -> None:
    """In an interpreter this library started, nothing may reach the host's stderr (warnings,
    'Exception ignored' reports, log records); DEEDSR_CAPI_STDERR=1 keeps it for debugging."""
    if os.environ.get("DEEDSR_CAPI_STDERR") == "1":
        return
    logging.getLogger().addHandler(logging.NullHandler())
    sys.stderr = open(os.devnull, "w")


def install(ffi, lib) -> None:
    """Define the extern "Python" functions of the cffi module `ffi`/`lib` (build.py)."""
    if lib._deedsr_owns_python():
        _quiet()
    table = Upscalers()

    def fail(error: BaseException) -> int:
        lib._deedsr_set_error(message_for(error).encode("utf-8", "replace"))
        return code_for(error)

    def on_escape(exc_type, exc, traceback):  # cffi's last resort; the functions catch everything
        fail(exc if exc is not None else RuntimeError("unknown error"))
        return None  # -> the `error` value below

    @ffi.def_extern(error=INTERNAL_ERROR, onerror=on_escape)
    def _deedsr_py_open(engine_dir, backend, handle):
        try:
            upscaler = open_upscaler(os.fsdecode(ffi.string(engine_dir)), ffi.string(backend).decode("utf-8"))
        except BaseException as e:
            return fail(e)
        handle[0] = table.add(upscaler)
        return OK

    @ffi.def_extern(error=INTERNAL_ERROR, onerror=on_escape)
    def _deedsr_py_upscale(handle, rgb, width, height, stride, seed, steps, eta, progress, user, out, out_stride):
        try:
            upscaler = table.get(handle)
            upscaler.check(height, width)  # sizes and memory before copying anything
            src = ffi.buffer(rgb, (height - 1) * stride + width * 3)
            image = np.ndarray((height, width, 3), np.uint8, src, strides=(stride, 3, 1)).copy()
            h, w = SCALE * height, SCALE * width
            dst = ffi.buffer(out, (h - 1) * out_stride + w * 3)
            view = np.ndarray((h, w, 3), np.uint8, dst, strides=(out_stride, 3, 1))
            call = None if progress == ffi.NULL else (lambda step, steps: progress(user, step, steps))
            upscale_into(upscaler, image, view, seed, steps, eta, call)
        except BaseException as e:
            return fail(e)
        return OK

    @ffi.def_extern(onerror=on_escape)
    def _deedsr_py_close(handle):
        try:
            table.close(handle)
        except BaseException as e:
            fail(e)
