"""Plan records in manifest.json and their atomic update.

Layout (docs/engine-directory.md, "TensorRT plans"):

    "trt": {
      "timing_cache": "trt/timing-10.3.0-NVIDIA-GeForce-RTX-3090-sm8.6.cache",
      "plans": {"unet": {<record>}, ...}
    }

Compatibility (same TensorRT version, same GPU) is decided by `runtime.backends.trt.plan_mismatch`,
which the runtime uses when it loads plans: one rule for both sides.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Mapping

from deedsr.runtime.integrity import sha256_files
from deedsr.runtime.plans import PLANS_KEY, GpuInfo, plan_mismatch, plan_records

from .errors import BuildError
from .modes import BuildMode

MANIFEST = "manifest.json"
PLAN_DIR = "trt"
RECORD_VERSION = 1


def sha256_file(path: Path) -> str:
    return sha256_files([path])


def timing_cache_name(tensorrt_version: str, gpu: GpuInfo) -> str:
    """Timing caches are as tied to TensorRT and the GPU as plans are: one file per TensorRT
    version and GPU model (two GPUs of one compute capability time tactics differently)."""
    model = re.sub(r"[^A-Za-z0-9]+", "-", gpu.name).strip("-") or "gpu"
    return f"{PLAN_DIR}/timing-{tensorrt_version}-{model}-sm{gpu.compute_capability}.cache"


def make_readable(path: Path) -> None:
    """rw-r--r-- under the usual umask (mkstemp makes 0600): the export makes engine
    directories readable by other users (a service account), and plans must stay so."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask | 0o600)


def build_flags(mode: BuildMode, *, static: bool, opt_level: int | None, workspace: int | None,
                timing_cache: bool, fp32_layers: int = 0) -> dict:
    return {
        "strongly_typed": mode.strongly_typed,
        "fp16": mode.fp16_flag,
        "tf32": False,
        "fp32_islands": mode.fp32_islands,
        "fp32_layers": fp32_layers,
        "static_tile": static,
        "builder_optimization_level": opt_level,
        "workspace_bytes": workspace,
        "timing_cache": timing_cache,
    }


def plan_record(*, graph: str, plan_file: str, plan_bytes: int, plan_sha256: str, tensorrt_version: str,
                gpu: GpuInfo, mode: BuildMode, source: Mapping, dims: Mapping, profile: Mapping,
                static: bool, flags: Mapping, io_dtypes: Mapping, build_seconds: float,
                polygraphy_version: str | None = None) -> dict:
    """One plan's record: what it is, what it was built from, for and with."""
    return {
        "record_version": RECORD_VERSION,
        "file": plan_file,
        "bytes": int(plan_bytes),
        "sha256": plan_sha256,
        "tensorrt": str(tensorrt_version),
        "gpu": gpu.record(),
        "precision": mode.plan_precision,
        "mode": mode.name,
        "source": {"precision": mode.source_precision, "file": source.get("file"), "sha256": source.get("sha256")},
        "dims": {k: dict(v) for k, v in dims.items()},
        "profile": {k: {w: list(s) for w, s in v.items()} for k, v in profile.items()},
        "static": bool(static),
        "build": dict(flags),
        "io_dtypes": dict(io_dtypes),
        "build_seconds": round(float(build_seconds), 3),
        "built_at": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "polygraphy": polygraphy_version,
    }


def up_to_date(record: Mapping | None, root: Path, *, tensorrt_version: str, gpu: GpuInfo, mode: BuildMode,
               source: Mapping, profile: Mapping, flags: Mapping) -> bool:
    """An existing plan that a rebuild with these settings would reproduce (skipped without --force)."""
    if not record or plan_mismatch(record, tensorrt_version, gpu) is not None:
        return False
    file = root / str(record.get("file", ""))
    if not file.is_file() or file.stat().st_size != record.get("bytes"):
        return False
    return (record.get("mode") == mode.name
            and record.get("source", {}).get("sha256") == source.get("sha256")
            and record.get("profile") == {k: {w: list(s) for w, s in v.items()} for k, v in profile.items()}
            and record.get("build") == dict(flags))


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary file beside `path`, then rename it over `path`; on any failure
    (Ctrl-C included) the temporary file is removed and `path` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def update_manifest(root: Path, change: Callable[[dict], None]) -> dict:
    """Re-read manifest.json, apply `change(data)` and write it back atomically."""
    path = Path(root) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BuildError(f"{path}: cannot be read ({e}); re-export") from None
    change(data)
    text = json.dumps(data, indent=1) + "\n"

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, write)
    return data


def set_plan(root: Path, graph: str, record: dict, timing_cache: str | None = None) -> dict:
    def change(data: dict) -> None:
        section = data.setdefault(PLANS_KEY, {})
        section.setdefault("plans", {})[graph] = record
        if timing_cache:
            section["timing_cache"] = timing_cache

    return update_manifest(root, change)


__all__ = ["plan_records", "plan_record", "up_to_date", "set_plan", "update_manifest", "write_atomic",
           "timing_cache_name", "build_flags", "sha256_file", "make_readable"]
