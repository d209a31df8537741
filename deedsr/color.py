"""Colour fixes that pull the SR image's colours toward the bicubic-upsampled LR."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .runtime.imageops import COLOR_FIXES


def adain(image: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel mean and standard deviation of `image` set to those of `reference`."""
    dims = (2, 3)
    mean, std = image.mean(dims, keepdim=True), image.std(dims, keepdim=True) + eps
    ref_mean, ref_std = reference.mean(dims, keepdim=True), reference.std(dims, keepdim=True) + eps
    return (image - mean) / std * ref_std + ref_mean


def _wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    kernel = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=image.dtype, device=image.device) / 16
    channels = image.shape[1]
    kernel = kernel[None, None].repeat(channels, 1, 1, 1)
    padded = F.pad(image, (radius,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=radius)


def _low_frequency(image: torch.Tensor, levels: int = 5) -> torch.Tensor:
    for i in range(levels):
        image = _wavelet_blur(image, 2**i)
    return image


def wavelet(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """High frequencies of `image` plus low frequencies of `reference` (a-trous wavelet, 5 levels)."""
    return image - _low_frequency(image) + _low_frequency(reference)


def color_fix(image: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    if method == "none":
        return image
    if method == "adain":
        return adain(image, reference)
    if method == "wavelet":
        return wavelet(image, reference)
    raise ValueError(f"unknown colour fix '{method}'; choose one of {', '.join(COLOR_FIXES)}")
