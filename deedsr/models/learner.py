"""Degradation learner: a ResNet of BasicBlocks that maps an LR image to a degradation vector."""
from __future__ import annotations

import torch
from torch import nn

from ..config import LearnerConfig


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class DegradationLearner(nn.Module):
    """LR image in [0, 1] (B, 3, H, W) -> degradation vector d (B, widths[-1])."""

    def __init__(self, config: LearnerConfig):
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv2d(3, config.stem_channels, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(config.stem_channels)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers = []
        in_channels = config.stem_channels
        for i, (width, count) in enumerate(zip(config.widths, config.blocks)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_channels, width, stride)]
            blocks += [BasicBlock(width, width) for _ in range(count - 1)]
            layers.append(nn.Sequential(*blocks))
            in_channels = width
        self.layers = nn.ModuleList(layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(lr))))
        for layer in self.layers:
            x = layer(x)
        return x.mean(dim=(2, 3))
