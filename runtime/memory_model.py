"""Peak resident memory of one upscale, from figures the export measured, and the tile sizes
that keep it under a limit.

Model (CPU backends; every term is measured, none guessed):
    peak = resident + max(working of each graph at its input size, sum over the per-step graphs)
           + host(LR pixels)
- resident: RSS once every graph the runtime uses is loaded (weights, sessions, libraries);
- working(graph, n): what one call adds on top (activations in onnxruntime's arena, which keeps
  its peak), measured at export at a few sizes n and interpolated (a + b n + c n^2: attention
  is quadratic). n is the graph's spatial size: LR pixels for the learner, window pixels for
  the tiled VAE, batch x tile pixels for the per-step graphs. With one shared arena the graphs'
  working sets mostly overlap rather than add, hence the max; except the per-step graphs, the
  adapter and the UNet, which run back to back with the adapter's outputs alive and add up
  (sd21-base, LR 256, batch 4: measured peak 9.76 GiB; resident 4.53 + host 0.21 + adapter
  2.27 + UNet 2.79 = 9.80, where the max alone said 7.53);
- host: the numpy arrays of one image (x4 image, decoded image, colour fix, latents), bytes per
  LR pixel, plus a fixed share for the process itself, measured on this runtime
  (benchmarks/bench_memory.py) and independent of the model.
The manifest's "memory" entry (export/memory.py) holds resident and the working points.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .contract import (
    LEARNER,
    VAE_DECODER,
    VAE_DECODER_TILED,
    VAE_ENCODER,
    VAE_ENCODER_TILED,
    step_graphs,
)
from .tiling import tiles as latent_tiles
from .vae_tiling import vae_tiles

# Host arrays alive at the peak (the x4 image, the decoded image, the colour fix's float64
# temporaries of one channel), per LR pixel; fitted to peaks measured on the demo engines with
# benchmarks/bench_memory.py (peak - resident - largest working set: 3.2 KB/px at 512x512,
# 2.1 KB/px at 1024x768; 2400 keeps both within +-15 %).
HOST_BYTES_PER_LR_PIXEL = 2400
# What the runtime process holds beyond the probe's resident set whatever the image (its own
# Python objects, Pillow, the sampler, allocator arenas of the threads that ran graphs): peak -
# resident - working - per-pixel host arrays came to 40-90 MB at LR 64-128 once onnxruntime's
# memory patterns were off (demo architecture and the tiny preset; sd21-base within 0.1 GiB).
HOST_FIXED_BYTES = 64 << 20
SMALLEST_VAE_CORE = 8


def runtime_graphs(manifest, precision: str, use_denoiser: bool) -> list[str]:
    """The graphs an upscale calls, in order (the tiled VAE when the directory has it)."""
    tiled = all(manifest.has_graph(g, precision) for g in (VAE_ENCODER_TILED, VAE_DECODER_TILED)) \
        and "vae_tiling" in manifest.data
    encoder, decoder = (VAE_ENCODER_TILED, VAE_DECODER_TILED) if tiled else (VAE_ENCODER, VAE_DECODER)
    return [LEARNER, encoder, *step_graphs(use_denoiser), decoder]


QUADRATIC = ("window_pixels", "latent_pixels")  # graphs with the VAE's attention inside


def fit(points: list[tuple[float, float]], quadratic: bool = False):
    """a + b n (+ c n^2 for graphs with attention over all their pixels), least squares, never
    below the smallest measured point (extrapolating a noisy fit must not promise less)."""
    n = np.array([p[0] for p in points], np.float64)
    y = np.array([p[1] for p in points], np.float64)
    degree = min(len(points) - 1, 2 if quadratic else 1)
    if degree <= 0:
        value = float(y[0]) if len(y) else 0.0
        return lambda x: value
    coef = np.polyfit(n, y, degree)
    floor = float(y.min())
    return lambda x: max(float(np.polyval(coef, x)), floor)


@dataclass(frozen=True)
class Plan:
    """What one image will use: tile settings and the bytes the model expects at the peak."""

    vae_core: int | None
    tile: int
    batch: int
    bytes: int
    parts: dict


class MemoryModel:
    def __init__(self, manifest, precision: str, use_denoiser: bool):
        self.manifest = manifest
        entry = manifest.data.get("memory", {}).get(precision)
        self.measured = entry is not None
        self.graphs = runtime_graphs(manifest, precision, use_denoiser)
        self.step = set(step_graphs(use_denoiser))
        self.resident = int(entry["resident"]) if entry else None
        self.load_peak = int(entry["load_peak"]) if entry else None
        self._fits = {g: fit([tuple(p) for p in entry["graphs"][g]["points"]],
                             entry["graphs"][g].get("size") in QUADRATIC)
                      for g in self.graphs if entry and g in entry["graphs"]}

    def working(self, graph: str, n: int) -> int:
        f = self._fits.get(graph)
        return int(f(n)) if f else 0

    def plan(self, height: int, width: int, tile: int, vae_core: int | None, batch: int) -> Plan:
        """Bytes at the peak for an LR image of height x width with these settings."""
        m = self.manifest
        lh, lw = m.latent_size(height, width)
        th, tw = min(tile, lh), min(tile, lw)
        batch = max(1, min(batch, len(latent_tiles(lh, lw, tile, min(int(m.sampler["tile_overlap"]), tile - 1)))))
        sizes = {}
        for g in self.graphs:
            if g == LEARNER:
                sizes[g] = height * width
            elif g in (VAE_ENCODER_TILED, VAE_DECODER_TILED):
                pad = int(m.data["vae_tiling"]["pad"])
                sizes[g] = max(t.window[2] * t.window[3] for t in vae_tiles(lh, lw, vae_core, pad))
            elif g in (VAE_ENCODER, VAE_DECODER):
                sizes[g] = lh * lw
            else:
                sizes[g] = batch * th * tw
        working = {g: self.working(g, n) for g, n in sizes.items()}
        host = HOST_FIXED_BYTES + HOST_BYTES_PER_LR_PIXEL * height * width
        base = max(self.resident or 0, self.load_peak or 0)  # loading may pass the settled resident set
        step = sum(w for g, w in working.items() if g in self.step)
        total = base + max(*working.values(), step) + host
        return Plan(vae_core, tile, batch, int(total), {"resident": base, "host": host, **working})

    def vae_cores(self) -> list[int]:
        """VAE tile cores to try, largest (fastest) first."""
        t = self.manifest.data.get("vae_tiling")
        if not t:
            return [None]
        top = int(t["core"])
        cores = [c for c in (top, 96, 64, 48, 32, 24, 16, SMALLEST_VAE_CORE) if c <= top]
        return sorted(set(cores), reverse=True)


def fits_message(model: MemoryModel, height: int, width: int, tile: int, batch: int, limit: int) -> str:
    """'the largest WxH of this shape that fits is about ...' for a refusal."""
    core = model.vae_cores()[-1]
    lo, hi = 0.0, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        h, w = max(int(height * mid), 8), max(int(width * mid), 8)
        if model.plan(h, w, tile, core, batch).bytes <= limit:
            lo = mid
        else:
            hi = mid
    h, w = int(height * lo), int(width * lo)
    if min(h, w) < 8:
        return "no image fits; free memory or raise --memory-limit"
    return f"the largest {width}:{height} image that fits is about {w}x{h}"


def choose_plan(model: MemoryModel, height: int, width: int, tile: int, batch: int, limit: int | None,
                vae_core: int | None = None) -> Plan:
    """The largest VAE tile (fastest) whose peak stays under `limit`; raises ValueError with
    the need when none does (the caller words the refusal)."""
    cores = [vae_core] if vae_core is not None else model.vae_cores()
    plan = None
    for core in cores:
        plan = model.plan(height, width, tile, core, batch)
        if limit is None or plan.bytes <= limit:
            return plan
    raise MemoryError(plan.bytes)


def batch_bytes(plans: list[Plan]) -> int:
    """Peak of images sampled together: the largest single-image peak plus the others' host arrays."""
    top = max(plans, key=lambda p: p.bytes)
    return top.bytes + sum(max(p.parts.get("host", 0) - HOST_FIXED_BYTES, 0) for p in plans if p is not top)
