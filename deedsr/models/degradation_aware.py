"""Degradation-aware (DA) blocks of the adapter.

A DA convolution filters a feature map with a 3x3 depthwise kernel predicted per
sample from the degradation vector, plus a channel attention predicted the same way.
Everything that depends only on the degradation is computed by `condition()`, so a
sampler (or an exported graph) computes it once per image instead of once per step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def per_sample_depthwise3x3(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise 3x3 convolution (zero padding) with a different kernel for every sample.

    x: (B, C, H, W); kernel: (B, C, 3, 3). Written as nine shifted multiply-adds rather
    than a convolution with groups = B * C, so it is exact, independent of the batch
    size, and made only of Pad/Slice/Mul/Add when exported.
    """
    height, width = x.shape[-2], x.shape[-1]
    padded = F.pad(x, (1, 1, 1, 1))
    out = None
    for i in range(3):
        for j in range(3):
            term = padded[:, :, i : i + height, j : j + width] * kernel[:, :, i, j, None, None]
            out = term if out is None else out + term
    return out


class DAConv(nn.Module):
    """conv1x1(SiLU(depthwise3x3(x, k(d_c)))) + x * 2 * sigmoid(ca(d_c))."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.channels = channels
        self.kernel = nn.Sequential(
            nn.Linear(channels, channels, bias=False),
            nn.SiLU(),
            nn.Linear(channels, channels * 9, bias=False),
        )
        self.conv = nn.Conv2d(channels, channels, 1)
        self.channel_attention = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1, bias=False),
            nn.SiLU(),
            nn.Conv2d(channels // reduction, channels, 1, bias=False),
        )

    def condition(self, d_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """d_c (B, C) -> (kernel (B, C, 3, 3), channel scale (B, C))."""
        kernel = self.kernel(d_c).reshape(-1, self.channels, 3, 3)
        scale = 2 * torch.sigmoid(self.channel_attention(d_c[:, :, None, None]))[:, :, 0, 0]
        return kernel, scale

    def forward(self, x: torch.Tensor, kernel: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        out = self.conv(F.silu(per_sample_depthwise3x3(x, kernel)))
        return out + x * scale[:, :, None, None]


class DABlock(nn.Module):
    """x + conv3x3(DAB(x, d_c)) with d_c = SiLU(Linear(d)) and
    DAB = SiLU(DAconv1) -> SiLU(conv3x3) -> SiLU(DAconv2) -> conv3x3."""

    conditions_per_block = 4

    def __init__(self, channels: int, degradation_dim: int, reduction: int):
        super().__init__()
        self.compress = nn.Linear(degradation_dim, channels, bias=False)
        self.da_conv1 = DAConv(channels, reduction)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.da_conv2 = DAConv(channels, reduction)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_out = nn.Conv2d(channels, channels, 3, padding=1)

    def condition(self, d: torch.Tensor) -> list[torch.Tensor]:
        """Degradation vector -> [kernel1, scale1, kernel2, scale2] (no dependence on t)."""
        d_c = F.silu(self.compress(d))
        return [*self.da_conv1.condition(d_c), *self.da_conv2.condition(d_c)]

    def forward(self, x: torch.Tensor, conditions: list[torch.Tensor]) -> torch.Tensor:
        k1, s1, k2, s2 = conditions
        out = F.silu(self.da_conv1(x, k1, s1))
        out = F.silu(self.conv1(out))
        out = F.silu(self.da_conv2(out, k2, s2))
        out = self.conv2(out)
        return x + self.conv_out(out)
