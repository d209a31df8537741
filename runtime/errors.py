"""Errors of the runtime. Every message is one line that says what is wrong and what to do."""
from __future__ import annotations

from dataclasses import dataclass


class EngineError(Exception):
    """The engine directory cannot be used: missing, incomplete, another schema version,
    unloadable graphs, or a backend that cannot run it."""


class ShapeError(ValueError):
    """An image or tile needs shapes outside the ranges the engine directory was built for."""


class InsufficientMemory(MemoryError):
    """The estimated memory for an image is more than the machine has available."""


class BackendError(RuntimeError):
    """A graph call failed inside the backend (onnxruntime, TensorRT)."""


class Cancelled(Exception):
    """Raised when a step callback returns False."""


@dataclass(frozen=True)
class StepInfo:
    """What a step callback gets after every DDIM step (of all images of a batch)."""

    index: int  # 0-based step index
    steps: int  # number of steps
    timestep: int  # DDIM timestep t of this step
    guided: bool  # True when epsilon came from noise guidance (no graph ran)
