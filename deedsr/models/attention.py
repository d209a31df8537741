"""One attention processor for every diffusers `Attention` of the model (UNet, adapter, VAE).

It is diffusers' AttnProcessor2_0 restricted to what SD 2.1 and our adapter use, with one
difference that matters: the softmax scale is passed to `scaled_dot_product_attention`.
Without it the ONNX exporter derives the scale from the query's shape at run time
(Shape -> Cast -> Sqrt), and those casts break the fp16 graphs; diffusers' plain-math
AttnProcessor instead adds an N x N tensor of zeros (baddbmm with beta 0) to every attention
map. With it, an attention exports as Softmax(MatMul(q * s', k^T * s')) @ v, the form TensorRT
fuses, and PyTorch runs its fused SDPA kernels (no N x N map in training memory on a GPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn


class ScaledDotProductAttention:
    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("attention masks are not used by DeeDSR's attention layers")
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(context)), heads(attn.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[3]).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def use_scaled_attention(module: nn.Module) -> None:
    """Give every diffusers Attention under `module` the ScaledDotProductAttention processor."""
    for m in module.modules():
        if isinstance(m, Attention):
            if m.spatial_norm is not None or m.norm_q is not None or m.norm_k is not None:
                raise ValueError(f"{type(module).__name__}: an attention layer uses options DeeDSR does not support")
            m.set_processor(ScaledDotProductAttention())
