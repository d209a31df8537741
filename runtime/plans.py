"""TensorRT plan records: the "trt" section of manifest.json (docs/engine-directory.md).

One record per graph, written by `deedsr.engines` and read by the trt backend: the TensorRT
version and the GPU (name, compute capability) the plan was built for, precision, build mode,
profile shapes and flags. A plan runs only with that TensorRT version on that GPU, so builder
and runtime share `plan_mismatch` to agree on what "compatible" means. No TensorRT import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

PLANS_KEY = "trt"  # manifest.json section written by the engines stage


def rebuild_command(root) -> str:
    return f"deedsr-export build-engines {root} --force"


def plan_records(data: Mapping) -> dict[str, dict]:
    """{graph: plan record} from a manifest's "trt" section ({} when there is none)."""
    section = data.get(PLANS_KEY) if isinstance(data, Mapping) else None
    plans = section.get("plans") if isinstance(section, Mapping) else None
    return {str(k): dict(v) for k, v in plans.items() if isinstance(v, Mapping)} if isinstance(plans, Mapping) else {}


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "major.minor"
    memory: int | None = None  # bytes

    def describe(self) -> str:
        return f"{self.name} (sm {self.compute_capability})"

    def record(self) -> dict:
        return {"name": self.name, "compute_capability": self.compute_capability, "memory": self.memory}


def plan_mismatch(record: Mapping, tensorrt_version: str, gpu: GpuInfo) -> str | None:
    """Why a plan cannot run with this TensorRT on this GPU; None when it can.

    Plans are tied to the exact TensorRT version and to the GPU: both must equal the record's."""
    built = str(record.get("tensorrt") or "")
    built_gpu = record.get("gpu") if isinstance(record.get("gpu"), Mapping) else {}
    name, cc = str(built_gpu.get("name") or ""), str(built_gpu.get("compute_capability") or "")
    if not built or not name or not cc:
        return "its record in manifest.json does not say which TensorRT version and GPU it was built for"
    if built == str(tensorrt_version) and name == gpu.name and cc == gpu.compute_capability:
        return None
    return (f"built with TensorRT {built} for {name} (sm {cc}), but this machine has TensorRT "
            f"{tensorrt_version} and {gpu.describe()}")
