"""engines: an engine directory's ONNX graphs -> TensorRT fp16 plans, on the machine that runs them.

    deedsr-export build-engines ENGINE_DIR [--static] [--max-batch N] [--opt-level 0..5] [--workspace 4G]

or, from Python, `engines.build_plans(engine_dir, engines.BuildOptions(...))`.

- modes.py: TensorRT version -> build mode (strongly typed fp16 graphs on >= 10; the FP16
  builder flag on the fp32 graphs on 8.5 .. 9.x; never the flag on 11).
- profiles.py: the manifest's named dimension ranges -> per-input min/opt/max shapes.
- records.py: plan records in manifest.json (TensorRT version, GPU, precision, profile, flags),
  atomic manifest updates.
- build.py: polygraphy's network_from_onnx_path / CreateConfig / Profile / engine_from_network /
  save_engine.
- check.py: plans vs ONNX Runtime and latency figures, run by scripts/gpu_check.sh.

Reads only the engine directory (through runtime.manifest); never imports torch, deedsr or
export. tensorrt and polygraphy are imported when a build starts.
"""
from __future__ import annotations

_EXPORTS = {
    "build_plans": "build",
    "BuildOptions": "build",
    "BuildError": "errors",
    "choose_mode": "modes",
    "BuildMode": "modes",
    "plan_dims": "profiles",
    "graph_profile": "profiles",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deedsr.engines' has no attribute {name!r}")
