"""A client for `deedsr serve`: the Upscaler's `upscale` over Triton's KServe v2 protocol.

    with RemoteUpscaler("http://127.0.0.1:8000") as up:     # or grpc://host:8001
        sr = up.upscale(lr_uint8_hwc, seed=0, steps=20)      # the same bytes as Upscaler.upscale

One request per call, through PyTriton's `ModelClient` (tritonclient underneath); a client is
not thread-safe, so use one per thread. Errors are one line: RemoteError for a request the server
refused (the reason the model gave, or Triton's own for a malformed request), Unreachable when no
server answers.
"""
from __future__ import annotations

import re
import warnings

import numpy as np

from .serve import MODEL_NAME, REJECTED


class RemoteError(ValueError):
    """The server refused or failed this request; the message says why in one line."""


class Unreachable(ConnectionError):
    """No Triton server with the `deedsr` model answers at the URL."""


class RemoteUpscaler:
    def __init__(self, url: str, model: str = MODEL_NAME, timeout_s: float = 600.0, init_timeout_s: float = 30.0):
        """url: http://host:port or grpc://host:port (a bare host:port means http).
        timeout_s: how long one request may take, queueing included; init_timeout_s: how long to
        wait for the server and the model to be ready."""
        from pytriton.client import ModelClient
        from pytriton.client.exceptions import (
            PyTritonClientError,
            PyTritonClientTimeoutError,
        )
        from pytriton.client.warnings import NotSupportedTimeoutWarning

        self.url = url
        self._client_errors = PyTritonClientError
        # PyTriton warns whenever the request timeout exceeds the time to wait for the model
        warnings.filterwarnings("ignore", category=NotSupportedTimeoutWarning)
        try:
            self._client = ModelClient(url, model, init_timeout_s=init_timeout_s, inference_timeout_s=timeout_s,
                                       lazy_init=False)
        except PyTritonClientTimeoutError:
            raise Unreachable(f"no model '{model}' is ready at {url} (waited {init_timeout_s:g} s)") from None
        except PyTritonClientError as e:
            raise Unreachable(f"no model '{model}' answers at {url}: {_reason(str(e))}") from None

    def upscale(self, image: np.ndarray, seed: int = 0, steps: int | None = None) -> np.ndarray:
        """uint8 HxWx3 -> uint8 (4H)x(4W)x3, computed by the server."""
        from pytriton.client.exceptions import (
            PyTritonClientInferenceServerError,
            PyTritonClientTimeoutError,
        )

        inputs = {"image": np.ascontiguousarray(image), "seed": np.array([seed], dtype=np.int64)}
        if steps is not None:
            inputs["steps"] = np.array([steps], dtype=np.int32)
        try:
            result = self._client.infer_sample(**inputs)
        except PyTritonClientInferenceServerError as e:
            raise RemoteError(_reason(str(e))) from None
        except PyTritonClientTimeoutError as e:
            raise Unreachable(f"{self.url}: {_reason(str(e))}") from None
        except self._client_errors as e:
            raise RemoteError(_reason(str(e))) from None
        error = result.get("error")
        if error is not None and error.size and error.reshape(-1)[0]:
            raise RemoteError(bytes(error.reshape(-1)[0]).decode(errors="replace"))
        return result["image"]

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "RemoteUpscaler":
        return self

    def __exit__(self, *_) -> None:
        self.close()


def _reason(message: str) -> str:
    """The one line that says why, out of the text PyTriton and Triton send back (which holds the
    server-side traceback when the model raised)."""
    found = re.findall(rf"{REJECTED}: ([^\n]*)", message)
    if found:
        return found[-1].strip()
    if "Traceback" in message:  # the model failed unexpectedly: the exception's own line
        raised = re.findall(r"^\s*([\w.]*(?:Error|Exception)): ([^\n]*)$", message, re.MULTILINE)
        if raised:
            kind, text = raised[-1]
            return f"server error: {kind.rsplit('.', 1)[-1]}: {text.strip()}"
    message = message.split("Message: ", 1)[-1]
    message = re.sub(r"^\[request id: [^\]]*\]\s*", "", message.strip())
    lines = [line for line in message.splitlines() if line.strip()]
    return lines[0].strip() if lines else "no reason given"
