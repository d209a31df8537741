"""Degradation-aware adapter: z_lr, t, d -> local feature maps F_L and global tokens F_G."""
from __future__ import annotations

import torch
import torch.utils.checkpoint
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from ..config import AdapterConfig
from .attention import ScaledDotProductAttention
from .degradation_aware import DABlock


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class DegradationAwareAdapter(nn.Module):
    """A ControlNet-style encoder conditioned on the degradation vector.

    `condition(d)` holds all the work that depends only on d (it is the same at every
    denoising step); `forward(z_lr, t, conditions)` does the per-step rest.
    """

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        c = config
        emb = c.time_embed_dim
        self.time_proj = Timesteps(c.base_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(c.base_channels, emb)
        self.conv_in = nn.Conv2d(c.in_channels, c.base_channels, 3, padding=1)

        self.resnets = nn.ModuleList()
        self.da_blocks = nn.ModuleList()
        self.attentions = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        self.local_heads = nn.ModuleList()
        ch = c.base_channels
        for level, out_ch in enumerate(c.level_channels):
            self.resnets.append(self._resnet(ch, out_ch))
            ch = out_ch
            self.da_blocks.append(DABlock(ch, c.degradation_dim, c.da_reduction))
            self.attentions.append(self._attention(ch) if level in c.attention_levels else nn.Identity())
            if level != len(c.level_channels) - 1:
                self.downsamplers.append(self._resnet(ch, ch, down=True))
            self.local_heads.append(self._resnet(ch, c.local_channels))
        self.mid_resnet1 = self._resnet(ch, ch)
        self.mid_attention = self._attention(ch)
        self.mid_resnet2 = self._resnet(ch, ch)
        # Training: recompute each level in the backward pass.
        self.gradient_checkpointing = False

    def _resnet(self, cin: int, cout: int, down: bool = False) -> ResnetBlock2D:
        c = self.config
        block = ResnetBlock2D(
            in_channels=cin,
            out_channels=cout,
            temb_channels=c.time_embed_dim,
            groups=c.norm_groups,
            eps=1e-5,
            dropout=c.dropout,
            down=down,
        )
        _zero(block.conv2)
        return block

    def _attention(self, ch: int) -> Attention:
        c = self.config
        attn = Attention(
            ch,
            heads=c.num_heads,
            dim_head=ch // c.num_heads,
            norm_num_groups=c.norm_groups,
            eps=1e-5,
            residual_connection=True,
            bias=True,
            _from_deprecated_attn_block=True,
        )
        _zero(attn.to_out[0])
        attn.set_processor(ScaledDotProductAttention())
        return attn

    @property
    def num_conditions(self) -> int:
        return len(self.da_blocks) * DABlock.conditions_per_block

    def condition(self, d: torch.Tensor) -> list[torch.Tensor]:
        """Degradation vector (B, D) -> flat list of DA kernels and channel scales."""
        return [tensor for block in self.da_blocks for tensor in block.condition(d)]

    def forward(
        self, z_lr: torch.Tensor, t: torch.Tensor, conditions: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Returns (four local maps at h, h/2, h/4, h/8, tokens (B, h/8 * w/8, token_dim))."""
        if t.dim() == 0:
            t = t[None]
        t = t.expand(z_lr.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(z_lr.dtype))
        per_block = DABlock.conditions_per_block
        h = self.conv_in(z_lr)
        local = []
        for level in range(len(self.resnets)):
            cond = conditions[level * per_block : (level + 1) * per_block]
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h, out = torch.utils.checkpoint.checkpoint(self._level, level, h, emb, *cond, use_reentrant=False)
            else:
                h, out = self._level(level, h, emb, *cond)
            local.append(out)
        h = self.mid_resnet2(self.mid_attention(self.mid_resnet1(h, emb)), emb)
        tokens = h.flatten(2).transpose(1, 2)
        return local, tokens

    def _level(self, level: int, h: torch.Tensor, emb: torch.Tensor, *cond: torch.Tensor):
        """One level: ResBlock, DA block, attention -> (input of the next level, local map)."""
        h = self.resnets[level](h, emb)
        h = self.da_blocks[level](h, list(cond))
        h = self.attentions[level](h)
        out = self.local_heads[level](h, emb)
        if level < len(self.downsamplers):
            h = self.downsamplers[level](h, emb)
        return h, out

    def forward_from_degradation(self, z_lr: torch.Tensor, t: torch.Tensor, d: torch.Tensor):
        return self.forward(z_lr, t, self.condition(d))
