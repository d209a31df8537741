"""Host-side image maths of the sampler, numpy + Pillow only: reflect padding, bicubic x4,
colour fixes. Each follows the reference (deedsr/pipeline.py, deedsr/color.py) operation by
operation in float32, so that the runtime reproduces its pixels.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

COLOR_FIXES = ("none", "adain", "wavelet")


def check_image(image) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError("expected a uint8 numpy array")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape HxWx3, got {image.shape}")
    if min(image.shape[:2]) < 8:
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}; each side must be at least 8 pixels")


def pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """Reflect-pad the bottom and right of HxWxC so both sides are multiples of `multiple`
    (symmetric where the padding is as long as the side, like the reference)."""
    h, w = image.shape[:2]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return image
    mode = "reflect" if ph < h and pw < w else "symmetric"
    return np.pad(image, ((0, ph), (0, pw), (0, 0)), mode=mode)


def bicubic_upscale(image: np.ndarray, scale: int) -> np.ndarray:
    """float32 HxWx3 in [0, 1] -> (scale*H)x(scale*W)x3 with Pillow's bicubic on each float channel."""
    h, w = image.shape[:2]
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F").resize(
            (w * scale, h * scale), Image.BICUBIC))
        for c in range(image.shape[2])
    ]
    return np.stack(channels, axis=-1).astype(np.float32)


def adain(image: np.ndarray, reference: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """NCHW: per-channel mean and (unbiased) standard deviation of `image` set to `reference`'s."""

    def stats(x):
        x64 = x.astype(np.float64)
        return (x64.mean(axis=(2, 3), keepdims=True).astype(np.float32),
                x64.std(axis=(2, 3), keepdims=True, ddof=1).astype(np.float32) + np.float32(eps))

    mean, std = stats(image)
    ref_mean, ref_std = stats(reference)
    return (image - mean) / std * ref_std + ref_mean


def _wavelet_blur(image: np.ndarray, radius: int) -> np.ndarray:
    """[1 2 1]^T [1 2 1] / 16 with dilation `radius` over an edge-replicated border (NCHW)."""
    r = radius
    padded = np.pad(image, ((0, 0), (0, 0), (r, r), (r, r)), mode="edge").astype(np.float64)
    h, w = image.shape[2:]
    rows = padded[:, :, 0:h, :] + 2 * padded[:, :, r:r + h, :] + padded[:, :, 2 * r:2 * r + h, :]
    out = rows[:, :, :, 0:w] + 2 * rows[:, :, :, r:r + w] + rows[:, :, :, 2 * r:2 * r + w]
    return (out / 16).astype(np.float32)


def _low_frequency(image: np.ndarray, levels: int = 5) -> np.ndarray:
    """One channel at a time: the same numbers, a third of the float64 temporaries at the peak
    (the colour fix is the largest host allocation of an upscale)."""
    out = np.empty_like(image)
    for c in range(image.shape[1]):
        channel = image[:, c:c + 1]
        for i in range(levels):
            channel = _wavelet_blur(channel, 2**i)
        out[:, c:c + 1] = channel
    return out


def wavelet(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """High frequencies of `image` plus low frequencies of `reference` (a-trous wavelet, 5 levels)."""
    return image - _low_frequency(image) + _low_frequency(reference)


def color_fix(image: np.ndarray, reference: np.ndarray, method: str) -> np.ndarray:
    if method == "none":
        return image
    if method == "adain":
        return adain(image, reference)
    if method == "wavelet":
        return wavelet(image, reference)
    raise ValueError(f"unknown colour fix '{method}'; choose one of {', '.join(COLOR_FIXES)}")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float32 HxWx3 in [0, 1] -> uint8, rounding like the reference."""
    return np.round(np.clip(image, 0, 1) * 255.0).astype(np.uint8)
