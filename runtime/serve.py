"""Serving the Upscaler on Triton Inference Server through PyTriton (`deedsr serve`).

One model, `deedsr`, every tensor with Triton's leading batch dimension:
  inputs   image UINT8 (-1, -1, 3) the LR photo (RGB), seed INT64 (1,), steps INT32 (1,) optional
  outputs  image UINT8 (-1, -1, 3) the x4 result, error BYTES (1,) empty unless the request failed

Batching: the `image` input is marked `allow_ragged_batch`, so Triton's dynamic batcher puts
images of different sizes into one batch (by default it would batch identical shapes only).
Requests of a batch with the same step count go through `Upscaler.upscale_batch` together (one
generator per request; tiles of one size, from all images, share graph calls), which on
onnxruntime's CPU provider gives the same bytes as one `upscale` call per image
(tests/test_serve_model.py, tests/test_serve.py).

Errors: PyTriton answers a batch either with one error for all its requests or with one response
per request; it cannot fail one request of a batch alone. So a batch whose requests are all bad
raises (each client gets an error response with the reason), and in a batch that mixes good and
bad requests the bad ones get a 1x1 placeholder image and their reason in `error` (`deedsr
remote` and `RemoteUpscaler` raise it). Malformed tensors (dtype, rank, a missing seed) never reach this
code: Triton refuses them against the model's declared inputs.

PyTriton is imported only by `Server`, so `UpscaleModel` (the batch logic) works without it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import BackendError
from .upscaler import Upscaler

log = logging.getLogger(__name__)

MODEL_NAME = "deedsr"
INSTALL_HINT = "pip install 'deedsr[serve]'"


class RequestRejected(ValueError):
    """A request the model cannot serve; the message is one line for the client."""


# PyTriton sends a failed batch's traceback text back; RemoteUpscaler finds the reason after this.
REJECTED = RequestRejected.__name__


# ---------------------------------------------------------------- the model callable
class UpscaleModel:
    """PyTriton inference callable over one Upscaler: a list of requests (dicts of batched
    numpy arrays, batch 1 each) -> one response dict per request."""

    def __init__(self, upscaler: Upscaler):
        self.upscaler = upscaler

    def __call__(self, requests: Sequence[dict]) -> list[dict]:
        results: list[np.ndarray | str] = [""] * len(requests)
        by_steps: dict[int | None, list[tuple[int, np.ndarray, int]]] = {}
        for i, request in enumerate(requests):
            try:
                image, seed, steps = self.parse(dict(request.items()))
                by_steps.setdefault(steps, []).append((i, image, seed))
            except (ValueError, MemoryError) as e:  # ShapeError, InsufficientMemory, RequestRejected
                results[i] = _one_line(e)
        for steps, members in by_steps.items():
            for i, out in zip([i for i, _, _ in members], self._upscale(members, steps)):
                results[i] = out
        errors = [r for r in results if isinstance(r, str)]
        if len(errors) == len(results):  # nothing to return: an error response for every client
            raise RequestRejected("; ".join(dict.fromkeys(errors)))
        return [_response(r) for r in results]

    def parse(self, request: dict) -> tuple[np.ndarray, int, int | None]:
        """(image, seed, steps) of one request, or RequestRejected/ShapeError/InsufficientMemory."""
        image = request.get("image")
        if image is None or image.ndim != 4 or image.shape[0] != 1 or image.shape[3] != 3:
            raise RequestRejected(f"image must be one HxWx3 UINT8 array per request, got shape "
                                  f"{None if image is None else tuple(image.shape)}")
        image = np.ascontiguousarray(image[0])
        if image.dtype != np.uint8:
            raise RequestRejected(f"image must be UINT8, got {image.dtype}")
        seed = _scalar(request, "seed")
        if seed is None:
            raise RequestRejected("seed is missing")
        if not 0 <= seed < 2**63:
            raise RequestRejected(f"seed must be a non-negative integer, got {seed}")
        steps = _scalar(request, "steps")
        self.upscaler.options(steps=steps)  # ValueError for a step count the schedule cannot space
        self.upscaler.check(image.shape[0], image.shape[1])
        return image, seed, steps

    def _upscale(self, members: list[tuple[int, np.ndarray, int]], steps: int | None) -> list[np.ndarray | str]:
        images = [image for _, image, _ in members]
        seeds = [seed for _, _, seed in members]
        try:
            return list(self.upscaler.upscale_batch(images, seeds=seeds, steps=steps))
        except (ValueError, MemoryError, BackendError) as e:
            if len(members) == 1:
                return [_one_line(e)]
        # one bad image failed the shared run: each alone, so the others still get their result
        return [self._upscale([m], steps)[0] for m in members]


def _scalar(request: dict, name: str) -> int | None:
    value = request.get(name)
    if value is None:
        return None
    if value.size != 1:
        raise RequestRejected(f"{name} must hold one value, got shape {tuple(value.shape)}")
    return int(value.reshape(-1)[0])


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _response(result: np.ndarray | str) -> dict:
    if isinstance(result, str):
        # a 1x1 placeholder: PyTriton cannot send a tensor with a zero-length dimension
        return {"image": np.zeros((1, 1, 1, 3), np.uint8), "error": np.array([[result.encode()]], dtype=object)}
    return {"image": result[None], "error": np.array([[b""]], dtype=object)}


# --------------------------------------------------------------------------- server
@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 4
    queue_delay_us: int = 0  # every lone request waits this long for company
    # After SIGTERM Triton waits this long in all, first for clients' open HTTP connections (idle
    # keep-alive ones included), then for requests in flight; PyTriton kills it after 30 s.
    exit_timeout_s: int = 25
    startup_timeout_s: float = 120.0


class Server:
    """Triton with the `deedsr` model, one instance per Upscaler.

        with Server(upscalers, ServeConfig(http_port=8000)) as server:
            server.wait_for_signal()     # SIGTERM/SIGINT: finish in-flight requests, then return
    """

    def __init__(self, upscalers: Sequence[Upscaler], config: ServeConfig = ServeConfig()):
        if not upscalers:
            raise ValueError("at least one Upscaler (one per instance)")
        if config.max_batch < 1:
            raise ValueError(f"max batch must be at least 1, got {config.max_batch}")
        self.upscalers = list(upscalers)
        self.config = config
        self._triton = None
        self._home: Path | None = None
        self._stop = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{_client_host(self.config.host)}:{self.config.http_port}"

    def start(self) -> "Server":
        c = self.config
        for port in (c.http_port, c.grpc_port, c.metrics_port):  # Triton would exit, PyTriton wait 60 s
            _check_port(c.host, port)
        # PyTriton's workspace (a copy of the server binary, the model store, sockets) goes into a
        # folder of ours, removed on stop. (Triton's python backend copies the model files to
        # /tmp/folderXXXXXX whatever $TMPDIR says.)
        self._home = home = Path(tempfile.mkdtemp(prefix="deedsr-triton-"))
        try:
            self._start(home)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, home: Path) -> None:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig

        c = self.config
        triton_config = TritonConfig(
            http_address=c.host, http_port=c.http_port, grpc_address=c.host, grpc_port=c.grpc_port,
            metrics_address=c.host, metrics_port=c.metrics_port, exit_timeout_secs=c.exit_timeout_s)
        self._triton = Triton(config=triton_config, workspace=home / "workspace")
        self._triton.bind(
            model_name=MODEL_NAME,
            infer_func=[UpscaleModel(u) for u in self.upscalers],
            inputs=[Tensor(name="image", dtype=np.uint8, shape=(-1, -1, 3)),
                    Tensor(name="seed", dtype=np.int64, shape=(1,)),
                    Tensor(name="steps", dtype=np.int32, shape=(1,), optional=True)],
            outputs=[Tensor(name="image", dtype=np.uint8, shape=(-1, -1, 3)),
                     Tensor(name="error", dtype=bytes, shape=(1,))],
            config=ModelConfig(max_batch_size=c.max_batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=c.queue_delay_us)),
            strict=True,
        )
        _allow_mixed_sizes(self._triton, MODEL_NAME)
        with _server_environment(home):  # the Triton process copies this environment at start
            self._triton.run()
        wait_until_ready(self.url, timeout_s=c.startup_timeout_s)

    def wait_for_signal(self) -> None:
        """Block until SIGTERM or SIGINT (or Triton exiting by itself), then stop. A background
        job started from a non-interactive shell ignores SIGINT, so SIGTERM is the one to send."""
        previous = {s: signal.signal(s, lambda *_: self._stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not self._stop.wait(1.0):
                if not self._triton.is_alive():
                    log.error("Triton exited")
                    break
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        self.stop()

    def stop(self) -> None:
        """Finish in-flight requests (Triton drains them on SIGINT), stop Triton, remove its files."""
        if self._triton is not None:
            self._triton.stop()
            self._triton = None
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()


def _allow_mixed_sizes(triton, model_name: str) -> None:
    """Mark the `image` input `allow_ragged_batch` in the model config PyTriton sends to Triton,
    so that Triton's dynamic batcher puts images of different sizes into one batch (by default it
    batches only identical shapes and closes a batch at the first request of another shape).
    The python backend hands each request's tensors over separately, and `UpscaleModel` takes
    images of any sizes together. PyTriton 0.7.0 has no option for it: this wraps the config of
    the bound model (`Triton._model_manager`, a private attribute of the pinned version)."""
    models = [m for m in getattr(getattr(triton, "_model_manager", None), "models", []) if m.model_name == model_name]
    if len(models) != 1 or not hasattr(models[0], "get_model_config"):
        log.warning("this PyTriton cannot mark inputs ragged: Triton will batch same-size images only")
        return
    model = models[0]
    plain = model.get_model_config

    def with_ragged_image() -> dict:
        config = plain()
        for spec in config.get("input", []):
            if spec["name"] == "image":
                spec["allow_ragged_batch"] = True
        return config

    model.get_model_config = with_ragged_image


@contextlib.contextmanager
def _server_environment(home: Path):
    """The environment the Triton process inherits, set only while it starts."""
    saved = {k: os.environ.get(k) for k in ("LD_LIBRARY_PATH",)}
    # Triton's python backend stub loads libpython3.X.so by name; it must be this interpreter's
    # build, not another copy on the system library path (that one fails every model load with
    # "'_thread.RLock' object has no attribute '_recursion_count'").
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [p for p in (saved["LD_LIBRARY_PATH"] or "").split(":") if p]
    if libdir and Path(libdir).is_dir():
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *(p for p in paths if p != libdir)])
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n ports the system had free on `host` a moment ago (for tests and benchmarks on loopback)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def wait_until_ready(url: str, model: str = MODEL_NAME, timeout_s: float = 120.0) -> None:
    """Poll GET {url}/v2/models/{model}/ready until 200 (the server's /v2/health/ready answers
    200 before models load). Raises TimeoutError."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v2/models/{model}/ready", timeout=5) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.2)
    raise TimeoutError(f"model '{model}' at {url} not ready after {timeout_s:.0f} s ({last})")
