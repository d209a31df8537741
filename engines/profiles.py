"""Optimisation profiles from an engine directory's manifest (docs/engine-directory.md).

Every graph input has a symbolic shape: ints, dimension names, or expressions over names with
`*` and `/` ("tile_height/8*tile_width/8"). A plan's profile evaluates those shapes at the
named dimensions' min, opt and max:

- batch: 1..N for the per-step graphs (N = the manifest's batch max, or less with --max-batch),
  optimised for N: the sampler sends all tiles of one size in calls of N;
  1 for the per-image graphs, which the runtime always runs on one image;
- tile_height/tile_width: the manifest's range with the sampler's tile as opt; with `static`,
  min = opt = max = the tile (fixed shapes, needed for CUDA graphs);
- every other dimension (lr_*, image_*, latent_*): the manifest's min/opt/max.
"""
from __future__ import annotations

import re
from typing import Mapping

from deedsr.runtime.contract import PER_STEP
from deedsr.runtime.manifest import eval_shape

from .errors import BuildError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def dims_used(data: Mapping, graph: str) -> list[str]:
    """Named dimensions a graph's input and output shapes refer to, in first-use order."""
    names: list[str] = []
    spec = data["graphs"][graph]
    for tensor in list(spec["inputs"]) + list(spec["outputs"]):
        for entry in tensor["shape"]:
            if isinstance(entry, str):
                for name in _NAME.findall(entry):
                    if name not in names:
                        names.append(name)
    return names


def plan_dims(data: Mapping, graph: str, *, static: bool = False, max_batch: int | None = None) -> dict[str, dict]:
    """{dimension: {"min", "opt", "max"}} a plan of `graph` is built for."""
    try:
        manifest_dims = data["dims"]
        stage = data["graphs"][graph]["stage"]
        tile = int(data["sampler"]["tile"])
    except KeyError as e:
        raise BuildError(f"manifest.json lacks {e.args[0]!r} (for {graph}); re-export") from None
    per_step = stage == PER_STEP
    out: dict[str, dict] = {}
    for name in dims_used(data, graph):
        if name not in manifest_dims:
            raise BuildError(f"graph {graph} uses dimension '{name}', which manifest.json's dims lack; re-export")
        rng = {k: int(manifest_dims[name][k]) for k in ("min", "opt", "max")}
        if name == "batch":
            if not per_step:
                rng = {"min": 1, "opt": 1, "max": 1}
            elif max_batch is not None:
                if not 1 <= max_batch <= rng["max"]:
                    raise BuildError(f"--max-batch {max_batch} is outside 1..{rng['max']}, the batch range the "
                                     f"graphs were exported for; re-export with --max-batch {max_batch} first")
                rng["max"] = max_batch
            rng["opt"] = rng["max"]  # the sampler's usual call (up to max tiles at once)
        elif name.startswith("tile_"):
            opt = min(max(tile, rng["min"]), rng["max"])
            rng = {"min": opt, "opt": opt, "max": opt} if static else {**rng, "opt": opt}
        rng["opt"] = min(max(rng["opt"], rng["min"]), rng["max"])
        if rng["min"] < 1 or rng["min"] > rng["max"]:
            raise BuildError(f"manifest.json's range for {name} ({rng['min']}..{rng['max']}) is empty; re-export")
        out[name] = rng
    return out


def graph_profile(data: Mapping, graph: str, dims: Mapping[str, Mapping[str, int]]) -> dict[str, dict]:
    """{input name: {"min": [..], "opt": [..], "max": [..]}} at the dims' min, opt and max."""
    profile: dict[str, dict] = {}
    for tensor in data["graphs"][graph]["inputs"]:
        shapes = {}
        for which in ("min", "opt", "max"):
            env = {name: int(rng[which]) for name, rng in dims.items()}
            try:
                shapes[which] = list(eval_shape(tensor["shape"], env))
            except (KeyError, ValueError) as e:
                raise BuildError(f"{graph}.{tensor['name']}: shape {tensor['shape']} cannot be evaluated at the "
                                 f"{which} dims ({e}); re-export") from None
        for axis, (a, b, c) in enumerate(zip(shapes["min"], shapes["opt"], shapes["max"])):
            if not 0 < a <= b <= c:
                raise BuildError(f"{graph}.{tensor['name']}: axis {axis} has min/opt/max {a}/{b}/{c}; re-export")
        profile[tensor["name"]] = shapes
    return profile


def describe_profile(profile: Mapping[str, Mapping]) -> str:
    """A short line for progress output: the first input's min / opt / max."""
    name, p = next(iter(profile.items()))
    fmt = lambda s: "x".join(str(d) for d in s)  # noqa: E731
    return f"{name} {fmt(p['min'])} / {fmt(p['opt'])} / {fmt(p['max'])}"
