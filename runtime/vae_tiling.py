"""Tiled VAE encode/decode with global GroupNorm statistics: the one layout and host procedure.

Shared by the runtime (graphs `vae_encoder_tiled`, `vae_decoder_tiled`) and the PyTorch
reference (deedsr/vae_tiling.py), so both cut, normalise and stitch the same way.

Why not plain overlap + blend (diffusers' `enable_tiling`): every GroupNorm would normalise a
tile with the tile's own statistics, which differ from the whole image's, and that shows as
seams. Here every GroupNorm of the VAE takes its per-group (mean, variance) as a graph input,
so all tiles are normalised alike, and reports the moments of its own input over the tile's
*core* (the part of the tile it owns), so the host can gather the whole image's statistics
without ever holding more than one tile:

Layout (latent units; image units are x `downscale`):
  - the latent (h, w) is cut into a grid of cores of at most `core` x `core`, sizes balanced
    (`core_starts`); cores partition the latent, every latent pixel has exactly one owner;
  - each tile is its core grown by `pad` on every side, clipped to the latent: the padding is
    context for the convolutions and is thrown away; only the core of a tile's output is kept.

Graph inputs: x (tile of the image or latent), `mask` (1, 1, th, tw) at latent resolution, 1 on
the core, 0 on the padding; `stats` (1, L, G, 2): mean and variance of every GroupNorm's
groups (L GroupNorms, G groups, in call order); `own` (1,): 1 = normalise with the tile's own
core moments (one tile = the untiled result exactly), 0 = with `stats`.
Graph outputs: y (the tile's output) and `moments` (1, L, G, 2): over the core, the mean of
(x - stats_mean) and of (x - stats_mean)^2 at every GroupNorm's input.

Host procedure (`run_tiled`):
  - one tile: one call with own = 1 -> exact;
  - otherwise: pass 0 with own = 1 on every tile gives first statistics (the core-area-weighted
    mean of the tiles' moments); then `passes` - 1 refinement passes with own = 0 and the
    statistics of the pass before; the last pass's outputs are kept. After pass k the first k
    GroupNorms' statistics are exact; in practice 2-3 passes are within float noise of
    the untiled result for the attention-free parts (see benchmarks/bench_vae_tiling.py).
Attention in the VAE's mid-block sees only its tile (which is what bounds memory: the
untiled mid-block attention is quadratic in latent pixels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .contract import VAE_DECODER_TILED, VAE_ENCODER_TILED

STAT_FIELDS = 2  # mean, variance (stats) | mean shift, mean squared shift (moments)

# Defaults of the export and the reference, measured on the demo VAE (benchmarks/
# bench_vae_tiling.py; 256 px photo, core 16, pad 8): tiled vs untiled PSNR of the encoder's
# latent 47.8 / 57.0 / 64.2 dB after 2 / 3 / 4 passes; of the decoder's image 33.5 / 39.6 /
# 43.8 / 42.8 dB after 2 / 3 / 4 / 5 (the floor: the mid-block attention sees only its tile).
DEFAULT_CORE = 64  # latent pixels (512 image pixels)
DEFAULT_PAD = 8
DEFAULT_PASSES = {VAE_ENCODER_TILED: 3, VAE_DECODER_TILED: 4}


@dataclass(frozen=True)
class VaeTile:
    """One tile in latent units: the core it owns and the padded window the graph sees."""

    core: tuple[int, int, int, int]  # top, left, height, width
    window: tuple[int, int, int, int]

    @property
    def area(self) -> int:
        return self.core[2] * self.core[3]

    def mask(self) -> np.ndarray:
        """(1, 1, window h, window w) float32, 1 on the core."""
        (ct, cl, ch, cw), (wt, wl, wh, ww) = self.core, self.window
        m = np.zeros((1, 1, wh, ww), np.float32)
        m[..., ct - wt: ct - wt + ch, cl - wl: cl - wl + cw] = 1.0
        return m


def core_starts(length: int, core: int) -> list[tuple[int, int]]:
    """(start, size) of ceil(length / core) balanced cores covering [0, length)."""
    if core < 1:
        raise ValueError(f"VAE tile core must be at least 1 latent pixel, got {core}")
    n = -(-length // core)
    edges = [round(i * length / n) for i in range(n + 1)]
    return [(a, b - a) for a, b in zip(edges[:-1], edges[1:])]


def vae_tiles(height: int, width: int, core: int, pad: int) -> list[VaeTile]:
    """The tiles of a (height, width) latent, row-major."""
    out = []
    for top, th in core_starts(height, core):
        for left, tw in core_starts(width, core):
            t0, l0 = max(top - pad, 0), max(left - pad, 0)
            t1, l1 = min(top + th + pad, height), min(left + tw + pad, width)
            out.append(VaeTile((top, left, th, tw), (t0, l0, t1 - t0, l1 - l0)))
    return out


def max_window(core: int, pad: int) -> int:
    """Largest window side (latent units) a layout with this core and pad can produce."""
    return core + 2 * pad


# run_tile(x_window, mask, stats, own) -> (y_window, moments)
RunTile = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def run_tiled(run_tile: RunTile, x: np.ndarray, *, latent_hw: tuple[int, int], in_scale: int, out_scale: int,
              out_channels: int, norms: int, groups: int, core: int, pad: int, passes: int) -> np.ndarray:
    """Run a tiled VAE part over x (1, C, h * in_scale, w * in_scale) -> (1, out_channels,
    h * out_scale, w * out_scale) float32; in/out_scale are the x and output pixels per latent
    pixel (encoder: downscale, 1; decoder: 1, downscale)."""
    if x.shape[0] != 1:
        raise ValueError("tiled VAE runs one image at a time")
    h, w = latent_hw
    layout = vae_tiles(h, w, core, pad)
    stats = np.zeros((1, norms, groups, STAT_FIELDS), np.float32)
    stats[..., 1] = 1.0
    single = len(layout) == 1
    total_passes = 1 if single else max(int(passes), 1)
    out = np.empty((1, out_channels, h * out_scale, w * out_scale), np.float32)
    for p in range(total_passes):
        own = np.array([1.0 if p == 0 else 0.0], np.float32)
        last = p == total_passes - 1
        acc = np.zeros((norms, groups, STAT_FIELDS), np.float64)
        for tile in layout:
            wt, wl, wh, ww = tile.window
            xs = x[:, :, wt * in_scale:(wt + wh) * in_scale, wl * in_scale:(wl + ww) * in_scale]
            y, moments = run_tile(np.ascontiguousarray(xs), tile.mask(), stats, own)
            acc += tile.area * moments[0].astype(np.float64)
            if last:
                ct, cl, ch, cw = tile.core
                r = out_scale
                out[:, :, ct * r:(ct + ch) * r, cl * r:(cl + cw) * r] = \
                    y[:, :, (ct - wt) * r:(ct - wt + ch) * r, (cl - wl) * r:(cl - wl + cw) * r]
        if not last:
            stats = next_stats(stats, acc / (h * w))
    return out


def next_stats(stats: np.ndarray, moments: np.ndarray) -> np.ndarray:
    """Statistics from area-weighted mean moments taken relative to `stats`' means."""
    mu = stats[0, ..., 0].astype(np.float64)
    shift, square = moments[..., 0], moments[..., 1]
    new = np.empty_like(stats)
    new[0, ..., 0] = mu + shift
    new[0, ..., 1] = np.maximum(square - shift**2, 0.0)
    return new


@dataclass(frozen=True)
class VaeTiling:
    """The manifest's "vae_tiling" entry, with the core a caller may shrink to save memory."""

    core: int
    pad: int
    passes: dict
    groups: int

    @classmethod
    def from_manifest(cls, manifest) -> "VaeTiling | None":
        """None for an engine directory without the tiled VAE graphs (exported before them)."""
        entry = manifest.data.get("vae_tiling")
        if not entry or not all(g in manifest.graphs for g in (VAE_ENCODER_TILED, VAE_DECODER_TILED)):
            return None
        return cls(int(entry["core"]), int(entry["pad"]), {k: int(v) for k, v in entry["passes"].items()},
                   int(entry["groups"]))

    @property
    def window(self) -> int:
        return max_window(self.core, self.pad)

    def with_core(self, core: int | None) -> "VaeTiling":
        if core is None:
            return self
        if not 1 <= core <= self.core:
            raise ValueError(f"VAE tile must be in 1..{self.core} latent pixels (the exported maximum), got {core}")
        return VaeTiling(core, self.pad, self.passes, self.groups)


def run_vae_graph(backend, manifest, tiling: VaeTiling, graph: str, x: np.ndarray) -> np.ndarray:
    """Encode (graph = vae_encoder_tiled: x4 image in [-1, 1] -> latent) or decode
    (vae_decoder_tiled: latent -> image) one image through a backend, tile by tile."""
    spec = manifest.graphs[graph]
    in_name, out_name = spec.inputs[0].name, spec.outputs[0].name
    norms = int(spec.inputs[2].shape[1])
    down = manifest.image["latent_downscale"]
    if graph == VAE_ENCODER_TILED:
        latent_hw, in_scale, out_scale = (x.shape[2] // down, x.shape[3] // down), down, 1
        channels = manifest.image["latent_channels"]
    else:
        latent_hw, in_scale, out_scale, channels = (x.shape[2], x.shape[3]), 1, down, 3

    def run(xs, mask, stats, own):
        out = backend.run(graph, {in_name: xs, "mask": mask, "stats": stats, "own": own})
        return out[out_name], out["moments"]

    return run_tiled(run, x, latent_hw=latent_hw, in_scale=in_scale, out_scale=out_scale, out_channels=channels,
                     norms=norms, groups=tiling.groups, core=tiling.core, pad=tiling.pad,
                     passes=tiling.passes.get(graph, 1))
