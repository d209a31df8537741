"""Full-reference image metrics as computed in the super-resolution literature.

Inputs are HxWx3 RGB arrays, either uint8 or float in [0, 1]; both are brought to
the 0..255 scale (floats are multiplied by 255, not quantised). With `y_channel`
the metrics are computed on the ITU-R BT.601 luma
Y = 16 + 65.481 R + 128.553 G + 24.966 B (R, G, B in [0, 1]; Y in [16, 235]),
otherwise on all three channels. `crop_border` pixels are removed from every side
first. SSIM is Wang et al.'s with an 11x11 Gaussian window (sigma 1.5), averaged
over the valid region and, for RGB, over channels.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["psnr", "rgb_to_y", "ssim", "flat_region_ratio"]

_Y_WEIGHTS = np.array([65.481, 128.553, 24.966])
_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5  # 11x11 window


def _to_255(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img.astype(np.float64)
    if np.issubdtype(img.dtype, np.floating):
        return img.astype(np.float64) * 255.0
    raise TypeError(f"expected a uint8 or floating-point image, got {img.dtype}")


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma of an HxWx3 RGB image (uint8 or float [0, 1]) as float64 in [16, 235]."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {img.shape}")
    return 16.0 + (_to_255(img) / 255.0) @ _Y_WEIGHTS


def _prepare(
    a: np.ndarray, b: np.ndarray, y_channel: bool, crop_border: int
) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    if a.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or HxWxC image, got shape {a.shape}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if y_channel:
        a, b = rgb_to_y(a), rgb_to_y(b)
    else:
        a, b = _to_255(a), _to_255(b)
    if crop_border:
        if min(a.shape[:2]) <= 2 * crop_border:
            raise ValueError(f"crop_border {crop_border} leaves nothing of a {a.shape[:2]} image")
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    return a, b


def psnr(a: np.ndarray, b: np.ndarray, *, y_channel: bool = True, crop_border: int = 0) -> float:
    """Peak signal-to-noise ratio in dB with peak 255; inf for identical images."""
    a, b = _prepare(a, b, y_channel, crop_border)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(255.0**2 / mse)


def _gaussian_window() -> np.ndarray:
    x = np.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=np.float64)
    w = np.exp(-(x**2) / (2.0 * _SSIM_SIGMA**2))
    return w / w.sum()


def _ssim_2d(x: np.ndarray, y: np.ndarray) -> float:
    c1 = (0.01 * 255.0) ** 2
    c2 = (0.03 * 255.0) ** 2
    window = _gaussian_window()
    r = _SSIM_RADIUS

    def local_mean(z: np.ndarray) -> np.ndarray:
        z = ndimage.correlate1d(z, window, axis=0, mode="reflect")
        z = ndimage.correlate1d(z, window, axis=1, mode="reflect")
        return z[r:-r, r:-r]  # only windows lying fully inside the image

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return float(ssim_map.mean())


def ssim(a: np.ndarray, b: np.ndarray, *, y_channel: bool = True, crop_border: int = 0) -> float:
    """Structural similarity (Wang et al. 2004), Gaussian window 11 / sigma 1.5, peak 255."""
    a, b = _prepare(a, b, y_channel, crop_border)
    if min(a.shape[:2]) < 2 * _SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs at least 11x11 pixels, got {a.shape[:2]}")
    if a.ndim == 2:
        return _ssim_2d(a, b)
    return float(np.mean([_ssim_2d(a[..., c], b[..., c]) for c in range(a.shape[2])]))


def flat_region_ratio(img: np.ndarray, ref: np.ndarray, block: int = 16, share: float = 0.25,
                      sigma: float = 2.0, crop_border: int = 0) -> float:
    """Mottle where there should be none: the high-pass energy (Y minus its Gaussian blur of
    `sigma`) of `img` over the `share` of `block` x `block` blocks in which `ref` has the least of
    it, divided by `ref`'s own there. 1 means as smooth as the reference; grain or blotches in
    flat areas raise it."""
    a, b = _prepare(img, ref, True, crop_border)
    energy = []
    for y in (a, b):
        high = y - ndimage.gaussian_filter(y, sigma, mode="reflect")
        h, w = high.shape[0] // block * block, high.shape[1] // block * block
        if not h or not w:
            raise ValueError(f"images of {a.shape[1]}x{a.shape[0]} hold no {block}x{block} block")
        blocks = (high[:h, :w] ** 2).reshape(h // block, block, w // block, block).sum(axis=(1, 3)).ravel()
        energy.append(blocks)
    flat = np.argsort(energy[1], kind="stable")[: max(1, int(len(energy[1]) * share))]
    ref_energy = float(energy[1][flat].sum())
    return float(energy[0][flat].sum()) / max(ref_energy, 1e-12)

