"""Tile layouts over a latent (aggregation sampling) and their Gaussian blend weights.

Shared by the runtime's sampler and the PyTorch reference (deedsr/pipeline.py), so that both
cut and blend the latent the same way."""
from __future__ import annotations

import numpy as np


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side `tile` covering [0, length); the last tile ends at `length`."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"tile overlap ({overlap}) must be smaller than the tile ({tile})")
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def tiles(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(top, left, tile height, tile width) of every tile, row-major."""
    th, tw = min(tile, height), min(tile, width)
    return [(top, left, th, tw) for top in tile_starts(height, tile, overlap)
            for left in tile_starts(width, tile, overlap)]


def gaussian_weights(height: int, width: int, variance: float = 0.01) -> np.ndarray:
    """(height, width) float32 weights peaking at the tile centre."""

    def axis(n: int) -> np.ndarray:
        x = (np.arange(n, dtype=np.float64) - (n - 1) / 2) / n
        return np.exp(-(x**2) / (2 * variance))

    return np.outer(axis(height), axis(width)).astype(np.float32)
