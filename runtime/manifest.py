"""Read and check an engine directory's manifest.json (docs/engine-directory.md).

Everything the runtime needs comes from here: the graphs and their files per precision,
named input/output shapes, the dimension ranges the graphs were built for, the noise
schedule and the sampler defaults. Shape entries are ints, dimension names or expressions
over names with `*` and `/` (exact integer division), evaluated left to right.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .contract import (
    DENOISER,
    MANIFEST,
    OPTIONAL_GRAPHS,
    PER_IMAGE,
    PRECISIONS,
    REQUIRED_GRAPHS,
    ROLES,
    SCHEMA,
    SCHEMA_VERSION,
    VAE_DECODER_TILED,
    VAE_ENCODER_TILED,
    call_order,
)
from .errors import EngineError, ShapeError
from .profiles import PAPER, get_profile
from .validate import check_manifest

DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
DIM_NAMES = ("batch", "lr_height", "lr_width", "image_height", "image_width", "latent_height", "latent_width",
             "tile_height", "tile_width")


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __contains__(self, value: int) -> bool:
        return self.min <= value <= self.max

    def __str__(self) -> str:
        return f"{self.min}..{self.max}"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, dimension names or expressions


@dataclass(frozen=True)
class GraphFile:
    precision: str
    file: Path
    external_data: Path | None
    bytes: int | None
    sha256: str | None
    dtypes: Mapping[str, str]

    def dtype(self, tensor: str) -> np.dtype:
        return np.dtype(DTYPES.get(self.dtypes.get(tensor, "float32"), np.float32))


@dataclass(frozen=True)
class GraphSpec:
    name: str
    stage: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precisions: Mapping[str, GraphFile] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


_TOKEN = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*|\d+)\s*")


def eval_dim(expr: int | str, env: Mapping[str, int]) -> int:
    """`3`, `"tile_height"`, `"tile_height/8*tile_width/8"` -> int, given dimension values."""
    if isinstance(expr, bool):
        raise ValueError(f"bad shape entry {expr!r}")
    if isinstance(expr, int):
        return expr
    if not isinstance(expr, str):
        raise ValueError(f"bad shape entry {expr!r}")
    parts = re.split(r"([*/])", expr)
    value: int | None = None
    op = "*"
    for i, part in enumerate(parts):
        if i % 2:
            op = part
            continue
        m = _TOKEN.fullmatch(part)
        if not m:
            raise ValueError(f"bad shape expression {expr!r}")
        token = m.group(1)
        if token.isdigit():
            operand = int(token)
        elif token in env:
            operand = int(env[token])
        else:
            raise KeyError(f"shape expression {expr!r} uses '{token}', which has no value")
        if value is None:
            value = operand
        elif op == "*":
            value *= operand
        else:
            if operand == 0 or value % operand:
                raise ValueError(f"shape expression {expr!r}: {value} is not divisible by {operand}")
            value //= operand
    assert value is not None
    return value


def eval_shape(shape, env: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(eval_dim(d, env) for d in shape)


class Manifest:
    """A checked manifest.json. `Manifest.load(engine_dir)` raises EngineError with one line."""

    def __init__(self, root: Path, data: dict[str, Any]):
        self.root = root
        self.data = data
        where = f"{root / MANIFEST}"
        check_manifest(root, data)  # every field, with a line that names it (runtime/validate.py)
        try:
            self.image = {k: int(data["image"][k]) for k in
                          ("upscale", "latent_downscale", "latent_multiple", "latent_channels", "pixel_multiple")}
            self.scaling_factor = float(data["vae"]["scaling_factor"])
            sched = data["scheduler"]
            self.num_train_timesteps = int(sched["num_train_timesteps"])
            self.steps_offset = int(sched.get("steps_offset", 1))
            self.alphas_cumprod = np.asarray(sched["alphas_cumprod"], dtype=np.float64).astype(np.float32)
            self.sampler = dict(data["sampler"])
            for key in ("steps", "eta", "noise_guidance_steps", "init", "tile", "tile_overlap", "color_fix"):
                self.sampler[key]  # noqa: B018 - presence check
            self.sampler.setdefault("profile", PAPER)  # written since the profiles; before, all were paper
            get_profile(self.sampler["profile"])
            self.dims = {name: DimRange(int(r["min"]), int(r["opt"]), int(r["max"]))
                         for name, r in data["dims"].items()}
            self.conditions = [str(c) for c in data["conditions"]]
            graphs = data["graphs"]
            self.model = dict(data.get("model", {}))
        except KeyError as e:
            raise EngineError(f"{where}: missing {e.args[0]!r}; the file is incomplete, re-export") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise EngineError(f"{where}: malformed ({e}); re-export") from None
        if data["scheduler"].get("prediction_type", "epsilon") != "epsilon":
            raise EngineError(f"{where}: prediction type {data['scheduler']['prediction_type']!r}; "
                              "this runtime samples epsilon-prediction models")
        if len(self.alphas_cumprod) != self.num_train_timesteps:
            raise EngineError(f"{where}: alphas_cumprod has {len(self.alphas_cumprod)} entries, expected "
                              f"{self.num_train_timesteps}")
        missing_dims = [d for d in DIM_NAMES if d not in self.dims]
        if missing_dims:
            raise EngineError(f"{where}: missing dims {', '.join(missing_dims)}; re-export")
        self.graphs: dict[str, GraphSpec] = {}
        for name, g in graphs.items():
            try:
                precisions = {
                    p: GraphFile(
                        precision=p,
                        file=root / e["file"],
                        external_data=root / e["external_data"] if e.get("external_data") else None,
                        bytes=int(e["bytes"]) if e.get("bytes") is not None else None,
                        sha256=e.get("sha256"),
                        dtypes=dict(e.get("dtypes", {})),
                    )
                    for p, e in g["precisions"].items()
                }
                self.graphs[name] = GraphSpec(
                    name=name,
                    stage=g["stage"],
                    inputs=tuple(TensorSpec(t["name"], tuple(t["shape"])) for t in g["inputs"]),
                    outputs=tuple(TensorSpec(t["name"], tuple(t["shape"])) for t in g["outputs"]),
                    precisions=precisions,
                )
            except (KeyError, TypeError) as e:
                raise EngineError(f"{where}: graph '{name}' is malformed (missing {e}); re-export") from None
        missing = [g for g in REQUIRED_GRAPHS if g not in self.graphs]
        if missing:
            raise EngineError(f"{where}: no graph {', '.join(missing)}; the engine directory is incomplete, re-export")
        for name, spec in self.graphs.items():
            role = ROLES.get(name)
            if role is not None and spec.stage != role.stage:
                raise EngineError(f"{where}: graph '{name}' has stage {spec.stage!r}, expected {role.stage!r}; "
                                  "re-export")

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, engine_dir: str | Path) -> "Manifest":
        root = Path(engine_dir).expanduser()
        if not root.exists():
            raise EngineError(f"{root}: engine directory does not exist (write one with deedsr-export)")
        if not root.is_dir():
            raise EngineError(f"{root}: not a directory; --engines takes the folder deedsr-export wrote")
        path = root / MANIFEST
        if not path.is_file():
            raise EngineError(f"{path}: missing; {root} is not an engine directory written by deedsr-export")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise EngineError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); re-export") from None
        except (OSError, UnicodeDecodeError) as e:
            raise EngineError(f"{path}: cannot be read ({e})") from None
        except (RecursionError, ValueError) as e:  # nested too deep, numbers too long to read
            raise EngineError(f"{path}: not valid JSON ({type(e).__name__}); re-export") from None
        if not isinstance(data, dict):
            raise EngineError(f"{path}: not a manifest (expected a JSON object)")
        schema = data.get("schema")
        if schema != SCHEMA:
            raise EngineError(f"{path}: schema {schema!r}, this runtime reads '{SCHEMA}'")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            shown = version if isinstance(version, int) else repr(version)
            raise EngineError(f"{path}: schema version {shown}, this runtime reads {SCHEMA_VERSION}")
        return cls(root, data)

    # ------------------------------------------------------------ precisions
    def precisions(self) -> list[str]:
        """Precisions for which every required graph is listed."""
        return [p for p in PRECISIONS if all(p in self.graphs[g].precisions for g in REQUIRED_GRAPHS)]

    def per_image_graphs(self) -> list[str]:
        """The graphs that run once per image, in call order (from the manifest's stages)."""
        order = call_order(False)
        return sorted((n for n, g in self.graphs.items() if g.stage == PER_IMAGE),
                      key=lambda n: order.index(n) if n in order else len(order))

    def graphs_for(self, precision: str, use_denoiser: bool | None = None) -> list[str]:
        """Every graph one image needs, in call order: the fused denoiser when asked for (or, by
        default, when the directory has it), else the adapter and the UNet."""
        have = self.has_graph(DENOISER, precision)
        if use_denoiser and not have:
            raise EngineError(f"{self.root}: no {precision} denoiser graph; re-export with --fuse-denoiser")
        tiled = self.has_graph(VAE_ENCODER_TILED, precision) and self.has_graph(VAE_DECODER_TILED, precision)
        return list(call_order(have if use_denoiser is None else bool(use_denoiser), tiled))

    def has_graph(self, name: str, precision: str) -> bool:
        return name in self.graphs and precision in self.graphs[name].precisions

    def graph_file(self, name: str, precision: str) -> GraphFile:
        try:
            return self.graphs[name].precisions[precision]
        except KeyError:
            raise EngineError(f"{self.root}: no {precision} {name} graph; re-export with --precision {precision}") from None

    def check_precision(self, precision: str) -> None:
        have = self.precisions()
        if precision not in have:
            raise EngineError(f"{self.root}: no {precision} graphs (has {', '.join(have) or 'none'}); "
                              f"re-export with --precision {precision} or choose --precision "
                              f"{have[0] if have else 'fp32'}")

    def check_files(self, precision: str, graphs=None) -> None:
        """Every listed file is there with the recorded size (cheap; `verify` hashes too)."""
        names = list(graphs or REQUIRED_GRAPHS) + [g for g in OPTIONAL_GRAPHS
                                                   if graphs is None and self.has_graph(g, precision)]
        for name in names:
            entry = self.graph_file(name, precision)
            files = [entry.file] + ([entry.external_data] if entry.external_data else [])
            for f in files:
                if not f.is_file():
                    raise EngineError(f"{f}: missing; the engine directory is incomplete, re-export")
            if entry.bytes is not None:
                size = sum(f.stat().st_size for f in files)
                if size != entry.bytes:
                    raise EngineError(f"{entry.file}: {size} bytes, manifest.json says {entry.bytes} "
                                      "(truncated or replaced); re-export")

    @property
    def trained(self) -> bool:
        """False when the graphs were exported from untrained weights (their output is noise)."""
        return self.model.get("trained", True) is not False

    # ------------------------------------------------------------------ dims
    @property
    def config(self) -> dict:
        cfg = self.model.get("config")
        return cfg if isinstance(cfg, dict) else {}

    def padded(self, height: int, width: int, profile: str | None = None) -> tuple[int, int]:
        """The padded LR size (the x4 image the VAE sees is `upscale` times it) under a
        sampling profile (default: the manifest's)."""
        name = self.sampler["profile"] if profile is None else profile
        return get_profile(name).padded_lr_size(height, width, self.image["pixel_multiple"])

    def latent_size(self, height: int, width: int, profile: str | None = None) -> tuple[int, int]:
        """Latent (h, w) for an LR image of height x width (after padding)."""
        ph, pw = self.padded(height, width, profile)
        s, d = self.image["upscale"], self.image["latent_downscale"]
        return ph * s // d, pw * s // d

    def check_dim(self, name: str, value: int) -> None:
        """Raise ShapeError with what the engines are built for and how to get other shapes."""
        r = self.dims[name]
        if value in r:
            return
        base, _, side = name.rpartition("_")
        sides = "sides" if self.dims.get(f"{base}_height") == self.dims.get(f"{base}_width") else f"{side}s"
        flag = "--max-size" if value > r.max else "--min-size"
        if name.startswith("lr_"):
            raise ShapeError(f"the engines are built for LR {sides} {r}, got {value}; re-export with {flag}")
        if name.startswith(("image_", "latent_")):
            kind = "x4 image" if name.startswith("image_") else "latent"
            raise ShapeError(f"the engines are built for {kind} {sides} {r}, got {value} (after padding); "
                             f"re-export with {flag}")
        if name.startswith("tile_"):
            hint = f"use --tile {r.max} or less, or re-export with --tile {value}" if value > r.max else \
                "re-export with a smaller --min-size"
            raise ShapeError(f"the engines are built for latent tile {sides} {r}, got {value}; {hint}")
        raise ShapeError(f"dimension {name} = {value} is outside {r}, the range the engines are built for")

    def image_dims(self, height: int, width: int, profile: str | None = None) -> dict[str, int]:
        """Named dimensions of the per-image graphs for an LR image (batch 1); checked."""
        ph, pw = self.padded(height, width, profile)
        s, d = self.image["upscale"], self.image["latent_downscale"]
        env = {"batch": 1, "lr_height": height, "lr_width": width, "image_height": ph * s, "image_width": pw * s,
               "latent_height": ph * s // d, "latent_width": pw * s // d}
        for name in ("lr_height", "lr_width", "image_height", "image_width", "latent_height", "latent_width"):
            self.check_dim(name, env[name])
        return env

    def check_tile(self, tile: int) -> None:
        m = self.image["latent_multiple"]
        if tile <= 0 or tile % m:
            raise ShapeError(f"tile must be a positive multiple of {m}, got {tile}")
        for name in ("tile_height", "tile_width"):
            r = self.dims[name]
            if tile > r.max:
                raise ShapeError(f"the engines are built for latent tiles up to {r.max}, got --tile {tile}; "
                                 f"use --tile {r.max} or less, or re-export with --tile {tile}")

    def tile_dims(self, tile_height: int, tile_width: int, batch: int = 1) -> dict[str, int]:
        env = {"batch": batch, "tile_height": tile_height, "tile_width": tile_width}
        for name in ("tile_height", "tile_width", "batch"):
            self.check_dim(name, env[name])
        return env

    @property
    def max_batch(self) -> int:
        return self.dims["batch"].max
