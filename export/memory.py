"""Measure what the runtime's graphs cost in resident memory, for the manifest's "memory" entry.

Each figure comes from a fresh process (deedsr.runtime.memory_probe) running the runtime's own
ORT backend, so nothing this exporting process holds is counted. runtime/memory_model.py
explains how the runtime combines them.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from deedsr.runtime.contract import LEARNER, VAE_DECODER_TILED, VAE_ENCODER_TILED
from deedsr.runtime.manifest import Manifest
from deedsr.runtime.memory_model import runtime_graphs

from .engine_dir import ExportError


def probe(engine_dir: Path, precision: str, graph: str | None = None, dims: dict | None = None,
          threads: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "deedsr.runtime.memory_probe", str(engine_dir), "--precision", precision]
    if threads:
        cmd += ["--threads", str(threads)]
    if graph:
        cmd += ["--graph", graph, "--dims", ",".join(f"{k}={v}" for k, v in dims.items())]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExportError(f"memory probe of {graph or 'all graphs'} ({precision}) failed: {tail[:300]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _sizes(lo: int, hi: int) -> list[int]:
    """Three sides from lo to hi (fewer when the range is narrow)."""
    mid = (lo + hi) // 2
    return sorted({lo, mid, hi})


def measure(engine_dir: Path, precisions, use_denoiser: bool = False, threads: int | None = None,
            progress=None) -> dict:
    """{precision: {"base", "resident", "load_peak", "graphs": {name: {"size": what n counts,
    "points": [[n, working bytes], ...]}}}}"""
    manifest = Manifest.load(engine_dir)
    d = manifest.dims
    out = {}
    for precision in precisions:
        entry = probe(engine_dir, precision, threads=threads)
        entry["graphs"] = {}
        for graph in runtime_graphs(manifest, precision, use_denoiser):
            points = []
            if graph == LEARNER:
                kind = "lr_pixels"
                lo = d["lr_height"].min
                runs = [{"batch": 1, "lr_height": s, "lr_width": s}
                        for s in _sizes(max(lo, 64), min(d["lr_height"].max, 512))]
            elif graph in (VAE_ENCODER_TILED, VAE_DECODER_TILED):
                kind = "window_pixels"
                hi = d["vae_tile_height"].max
                runs = [{"vae_tile_height": s, "vae_tile_width": s} for s in _sizes(min(16, hi), hi)]
            elif graph in manifest.graphs and "tile_height" in str(manifest.graphs[graph].inputs):
                kind = "batch_tile_pixels"
                t, b = d["tile_height"].max, d["batch"].max
                runs = [{"batch": n, "tile_height": t, "tile_width": t} for n in sorted({1, b})]
            else:  # an untiled VAE graph (older layout): measured at the latent's range
                kind = "latent_pixels"
                runs = [{"batch": 1, "latent_height": s, "latent_width": s, "image_height": s * 8,
                         "image_width": s * 8} for s in _sizes(d["latent_height"].min, min(d["latent_height"].max, 64))]
            for env in runs:
                n = 1
                for k, v in env.items():
                    if k.endswith(("height", "width")) and not k.startswith("image") or k == "batch":
                        n *= v
                points.append([n, probe(engine_dir, precision, graph, env, threads)["working"]])
            entry["graphs"][graph] = {"size": kind, "points": points}
            if progress:
                progress(f"memory {graph} {precision}")
        out[precision] = entry
    return out
