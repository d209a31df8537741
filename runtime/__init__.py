"""The deedsr runtime: numpy + onnxruntime or TensorRT. Never imports torch, diffusers,
deedsr or export.

    from deedsr.runtime import Upscaler
    sr = Upscaler.from_engine_dir("ENGINE_DIR").upscale(lr_uint8_hwc, seed=0)

Names are imported on first use, so `import deedsr.runtime` stays cheap and onnxruntime is loaded
only when an Upscaler opens a backend.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "Upscaler": "upscaler",
    "Manifest": "manifest",
    "StepInfo": "errors",
    "Cancelled": "errors",
    "EngineError": "errors",
    "ShapeError": "errors",
    "InsufficientMemory": "errors",
    "BackendError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deedsr.runtime' has no attribute {name!r}")
