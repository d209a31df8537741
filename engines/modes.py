"""How to build fp16 plans on a given TensorRT version (README.md, TensorRT engines: TensorRT 11 has no FP16 builder flag, so fp16 lives in
the ONNX graph; 8.5 .. 9.x use the flag on fp32 graphs).

| TensorRT   | mode (auto)      | graphs | network        | builder flags                          |
|------------|------------------|--------|----------------|----------------------------------------|
| 8.5 .. 9.x | `fp16-flag`      | fp32/  | weakly typed   | FP16 (+ PREFER_PRECISION_CONSTRAINTS   |
|            |                  |        |                | pinning the fp32 islands)              |
| 10.x       | `strongly-typed` | fp16/  | strongly typed | none                                   |
| >= 11      | `strongly-typed` | fp16/  | strongly typed | none (the FP16 flag was removed)       |

`fp16-flag` can be asked for on 10.x (the flag still exists there), never on 11. `fp32`
builds fp32 plans from the fp32 graphs (strongly typed from 10 on, TF32 off), for checks.
Nothing here imports TensorRT: the version is a string.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BuildError

MIN_TENSORRT = (8, 5)
MODES = ("auto", "strongly-typed", "fp16-flag", "fp32")


def parse_version(text: str) -> tuple[int, ...]:
    """"10.3.0.26" -> (10, 3, 0, 26); "10.0.0b6" -> (10, 0, 0)."""
    parts = []
    for piece in str(text).strip().split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
        if m.end() != len(piece):
            break
    if not parts:
        raise BuildError(f"cannot read a TensorRT version from {text!r}")
    return tuple(parts)


def at_least(version: str | tuple, minimum: tuple[int, ...]) -> bool:
    v = parse_version(version) if isinstance(version, str) else tuple(version)
    return v[: len(minimum)] + (0,) * max(0, len(minimum) - len(v)) >= minimum


@dataclass(frozen=True)
class BuildMode:
    name: str              # strongly-typed | fp16-flag | fp32
    source_precision: str  # which exported graphs are parsed: fp16 | fp32
    plan_precision: str    # what the plan computes in: fp16 | fp32
    strongly_typed: bool   # NetworkDefinitionCreationFlag.STRONGLY_TYPED
    fp16_flag: bool        # BuilderFlag.FP16 (weak typing)
    fp32_islands: bool     # pin fp32 layers with precision constraints (fp16-flag only)

    def describe(self) -> str:
        if self.name == "strongly-typed":
            return f"strongly typed from the {self.source_precision} graph"
        if self.name == "fp16-flag":
            islands = ", fp32 islands pinned" if self.fp32_islands else ""
            return f"FP16 builder flag on the {self.source_precision} graph{islands}"
        return f"fp32 from the {self.source_precision} graph"


def choose_mode(version: str, requested: str = "auto", available=("fp32", "fp16"),
                fp32_islands: bool = True) -> BuildMode:
    """The build mode for TensorRT `version`; `available` are the precisions the engine directory
    has graphs of (for every graph to build). Raises BuildError with the fix."""
    if requested not in MODES:
        raise BuildError(f"unknown build mode '{requested}'; choose one of {', '.join(MODES)}")
    v = parse_version(version)
    if not at_least(v, MIN_TENSORRT):
        raise BuildError(f"TensorRT {version} is older than 8.5, the oldest this project builds for; "
                         "install TensorRT 8.5 or newer (JetPack 5.1+)")
    v10, v11 = at_least(v, (10,)), at_least(v, (11,))
    available = set(available)
    if requested == "auto":
        if v10 and "fp16" in available:
            requested = "strongly-typed"
        elif v10 and not v11 and "fp32" in available:
            requested = "fp16-flag"  # 10.x still has the weak FP16 flag: use it on an fp32-only export
        elif v10:
            raise BuildError(f"TensorRT {version} builds fp16 plans only from fp16 graphs (the FP16 builder "
                             "flag is gone) and this engine directory has none; re-export with --precision fp32,fp16")
        else:
            requested = "fp16-flag"
    if requested == "strongly-typed":
        if not v10:
            raise BuildError(f"strongly typed fp16 plans need TensorRT 10 or newer (this is {version}); "
                             "use --mode auto (FP16 builder flag on the fp32 graphs)")
        if "fp16" not in available:
            raise BuildError("strongly typed fp16 plans are built from the fp16 graphs and this engine directory "
                             "has none; re-export with --precision fp32,fp16")
        return BuildMode("strongly-typed", "fp16", "fp16", True, False, False)
    if requested == "fp16-flag":
        if v11:
            raise BuildError(f"TensorRT {version} removed the FP16 builder flag; use --mode auto "
                             "(strongly typed fp16 graphs)")
        if "fp32" not in available:
            raise BuildError("the FP16 builder flag works on the fp32 graphs and this engine directory has none; "
                             "re-export with --precision fp32,fp16")
        return BuildMode("fp16-flag", "fp32", "fp16", False, True, bool(fp32_islands))
    if "fp32" not in available:
        raise BuildError("fp32 plans are built from the fp32 graphs and this engine directory has none; "
                         "re-export with --precision fp32,fp16")
    return BuildMode("fp32", "fp32", "fp32", v10, False, False)


def supports_opt_level(version: str) -> bool:
    """IBuilderConfig.builder_optimization_level exists from TensorRT 8.6 on."""
    return at_least(version, (8, 6))


def check_graph_version(version: str, graph: str, entry: dict) -> None:
    """A graph whose operators need a newer TensorRT (the export records `min_tensorrt`)."""
    need = str(entry.get("min_tensorrt") or "8.5")
    if not at_least(version, parse_version(need)):
        ops = ", ".join(op for op in entry.get("operators", []) if op in ("LayerNormalization",)) or "its operators"
        raise BuildError(f"graph {graph} needs TensorRT {need} or newer for {ops}, this is {version}; re-export "
                         "with --trt 8.5 (opset 16 spells them with basic operators) or update TensorRT")
