"""Modulated UNet: SD 2.1-base (diffusers UNet2DConditionModel) whose every ResNet block
is modulated by the adapter's local features: h <- h * (1 + gamma) + beta after the
block's second convolution and before its residual add."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from .attention import use_scaled_attention


class Modulation(nn.Module):
    """SPADE-like: gamma, beta = conv3x3(ReLU(conv3x3(F_L))); zero-initialised, so identity."""

    def __init__(self, channels: int, local_channels: int, hidden: int):
        super().__init__()
        self.shared = nn.Conv2d(local_channels, hidden, 3, padding=1)
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)
        for conv in (self.gamma, self.beta):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, h: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        actv = F.relu(self.shared(local))
        return h * (1 + self.gamma(actv)) + self.beta(actv)


def _resnets_in_order(unet: UNet2DConditionModel) -> list[tuple[ResnetBlock2D, int]]:
    """Every ResNet block with the resolution level (0 = full latent size) it runs at."""
    levels = len(unet.down_blocks)
    out = [(r, i) for i, block in enumerate(unet.down_blocks) for r in block.resnets]
    out += [(r, levels - 1) for r in unet.mid_block.resnets]
    out += [(r, levels - 1 - i) for i, block in enumerate(unet.up_blocks) for r in block.resnets]
    return out


class ModulatedUNet(nn.Module):
    """(x_t, t, tokens, local maps) -> epsilon. `self.unet` keeps diffusers' key names, so
    SD 2.1-base weights load into it as they are; `self.modulation` holds our layers."""

    def __init__(self, unet_config: dict[str, Any], local_channels: int, hidden: int):
        super().__init__()
        self.unet = UNet2DConditionModel(**unet_config)
        use_scaled_attention(self.unet)
        resnets = _resnets_in_order(self.unet)
        self.modulation = nn.ModuleList(
            Modulation(r.conv2.out_channels, local_channels, hidden) for r, _ in resnets
        )
        self._levels = [level for _, level in resnets]
        # Training: recompute each ResNet block and transformer in the backward pass.
        self.gradient_checkpointing = False

    def backbone_parameters(self):
        return self.unet.parameters()

    def _resnet(self, index: int, block: ResnetBlock2D, h, temb, local_maps):
        # ResnetBlock2D.forward for SD's configuration ("default" time-embedding norm, no
        # resampling inside the block), with the modulation placed before the residual add.
        x = h
        h = block.conv1(block.nonlinearity(block.norm1(h)))
        h = h + block.time_emb_proj(block.nonlinearity(temb))[:, :, None, None]
        h = block.conv2(block.dropout(block.nonlinearity(block.norm2(h))))
        h = self.modulation[index](h, local_maps[self._levels[index]])
        if block.conv_shortcut is not None:
            x = block.conv_shortcut(x)
        return (x + h) / block.output_scale_factor

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        tokens: torch.Tensor,
        local_maps: list[torch.Tensor],
    ) -> torch.Tensor:
        unet = self.unet
        if t.dim() == 0:
            t = t[None]
        t = t.expand(x_t.shape[0])
        temb = unet.time_embedding(unet.time_proj(t).to(x_t.dtype))
        index = 0

        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()

        def resnet(block, h):
            nonlocal index
            if checkpointing:
                out = torch.utils.checkpoint.checkpoint(
                    self._resnet, index, block, h, temb, local_maps, use_reentrant=False
                )
            else:
                out = self._resnet(index, block, h, temb, local_maps)
            index += 1
            return out

        def attend(attn, h):
            if checkpointing:
                return torch.utils.checkpoint.checkpoint(
                    lambda x, c: attn(x, encoder_hidden_states=c, return_dict=False)[0], h, tokens,
                    use_reentrant=False,
                )
            return attn(h, encoder_hidden_states=tokens, return_dict=False)[0]

        h = unet.conv_in(x_t)
        skips = [h]
        for block in unet.down_blocks:
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for r, attn in zip(block.resnets, attentions):
                h = resnet(r, h)
                if attn is not None:
                    h = attend(attn, h)
                skips.append(h)
            for down in block.downsamplers or []:
                h = down(h)
                skips.append(h)

        mid = unet.mid_block
        h = resnet(mid.resnets[0], h)
        for attn, r in zip(mid.attentions, mid.resnets[1:]):
            h = resnet(r, attend(attn, h))

        for block in unet.up_blocks:
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for r, attn in zip(block.resnets, attentions):
                h = resnet(r, torch.cat([h, skips.pop()], dim=1))
                if attn is not None:
                    h = attend(attn, h)
            for up in block.upsamplers or []:
                h = up(h)

        h = unet.conv_act(unet.conv_norm_out(h))
        return unet.conv_out(h)
