"""The VAE's encoder and decoder as tile graphs with global GroupNorm statistics (torch side).

The layout and the host procedure are the runtime's (deedsr.runtime.vae_tiling, documented
there); this module supplies the torch tile function: a copy of the VAE whose GroupNorms
normalise with given statistics and report their input's moments over the tile's core.
`TiledVae.encode/decode` are the reference's tiled `DeeDSR.encode/decode`; the export traces
`TiledVaePart` as the graphs `vae_encoder_tiled` / `vae_decoder_tiled`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .runtime.contract import VAE_DECODER_TILED, VAE_ENCODER_TILED
from .runtime.vae_tiling import (
    DEFAULT_CORE,
    DEFAULT_PAD,
    DEFAULT_PASSES,
    run_tiled,
    vae_tiles,
)


class _TileContext:
    """What the GroupNorms of one tile call share: the mask, the statistics, the moments."""

    def __init__(self):
        self.mask = self.stats = self.own = None
        self.moments: list[torch.Tensor] = []


class StatsGroupNorm(nn.Module):
    def __init__(self, norm: nn.GroupNorm, index: int, context: _TileContext):
        super().__init__()
        self.groups, self.eps, self.index = norm.num_groups, norm.eps, index
        self.weight, self.bias = norm.weight, norm.bias
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        b, c = x.shape[0], x.shape[1]
        if x.ndim == 4:
            mask = F.interpolate(ctx.mask, size=(x.shape[2], x.shape[3]), mode="nearest")
        else:  # (B, C, tokens) inside the mid-block attention, at latent resolution
            mask = ctx.mask.flatten(2)
        mask = mask.reshape(mask.shape[0], 1, 1, -1)
        xg = x.reshape(b, self.groups, c // self.groups, -1)
        stats = ctx.stats[:, self.index]  # (B, G, 2)
        mu = stats[..., 0:1].unsqueeze(-1)
        d = xg - mu
        frac = mask.mean(dim=(2, 3))  # (B, 1): share of the tile that is core
        shift = (d * mask).mean(dim=(2, 3)) / frac
        square = (d * d * mask).mean(dim=(2, 3)) / frac
        ctx.moments.append(torch.stack([shift, square], dim=-1))
        own = ctx.own.reshape(1, 1)
        mean_shift = own * shift  # mean - mu
        var = own * (square - shift * shift) + (1 - own) * stats[..., 1]
        y = (d - mean_shift[..., None, None]) * torch.rsqrt(var + self.eps)[..., None, None]
        y = y.reshape(x.shape)
        shape = (1, c) + (1,) * (x.ndim - 2)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)


class TiledVaePart(nn.Module):
    """One half of the VAE as a tile graph: (x, mask, stats, own) -> (y, moments).

    It shares the model's modules and weights (no copy: sd21-base's VAE is 335 MB): the
    GroupNorms are swapped for StatsGroupNorms only for the duration of a call."""

    def __init__(self, model, part: str):
        super().__init__()
        if part not in ("encoder", "decoder"):
            raise ValueError(part)
        self.part = part
        self.scaling_factor = model.scaling_factor
        self.down = 2 ** (len(model.config.vae["block_out_channels"]) - 1)
        vae = model.vae
        self.context = _TileContext()
        if part == "encoder":
            self.body, self.conv = vae.encoder, vae.quant_conv
        else:
            self.body, self.conv = vae.decoder, vae.post_quant_conv
        self._swaps = self._find_norms(vae.config.latent_channels)
        self.norms = len(self._swaps)
        self.groups = int(model.config.vae.get("norm_num_groups", 32))
        self.latent_channels = int(model.config.vae["latent_channels"])

    def _find_norms(self, latent_channels: int) -> list[tuple[nn.Module, str, nn.Module, nn.Module]]:
        """(parent, attribute, GroupNorm, StatsGroupNorm) in forward-call order (declaration
        order differs from call order in diffusers' blocks)."""
        norms = [(name, m) for name, m in self.body.named_modules() if isinstance(m, nn.GroupNorm)]
        seen: list[nn.Module] = []
        hooks = [m.register_forward_hook(lambda m, i, o: seen.append(m)) for _, m in norms]
        probe = (torch.zeros(1, 3, self.down * 2, self.down * 2) if self.part == "encoder"
                 else torch.zeros(1, latent_channels, 2, 2))
        try:
            with torch.no_grad():
                self.body(probe.to(next(self.body.parameters()).device))
        finally:
            for h in hooks:
                h.remove()
        if len(seen) != len(norms) or len(set(map(id, seen))) != len(seen):
            raise ValueError(f"VAE {self.part}: every GroupNorm must run exactly once per forward")
        names = {id(m): name for name, m in norms}
        swaps = []
        for index, norm in enumerate(seen):
            name = names[id(norm)]
            parent = self.body.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self.body
            swaps.append((parent, name.rsplit(".", 1)[-1], norm, StatsGroupNorm(norm, index, self.context)))
        return swaps

    def _swap(self, tiled: bool) -> None:
        for parent, attr, norm, stats_norm in self._swaps:
            parent._modules[attr] = stats_norm if tiled else norm

    def forward(self, x, mask, stats, own):
        ctx = self.context
        ctx.mask, ctx.stats, ctx.own, ctx.moments = mask, stats, own, []
        self._swap(True)
        try:
            if self.part == "encoder":
                h = self.conv(self.body(x))
                y = h[:, : self.latent_channels] * self.scaling_factor  # posterior mean
            else:
                y = self.body(self.conv(x / self.scaling_factor))
            return y, torch.stack(ctx.moments, dim=1)
        finally:
            self._swap(False)
            ctx.mask = ctx.stats = ctx.own = None
            ctx.moments = []


class TiledVae:
    """The reference's tiled encode/decode over numpy-layout tiles (runtime/vae_tiling.py)."""

    def __init__(self, model, core: int = DEFAULT_CORE, pad: int = DEFAULT_PAD,
                 passes: tuple[int, int] = (DEFAULT_PASSES[VAE_ENCODER_TILED], DEFAULT_PASSES[VAE_DECODER_TILED])):
        self.encoder = TiledVaePart(model, "encoder").eval()
        self.decoder = TiledVaePart(model, "decoder").eval()
        self.down = self.encoder.down
        self.core, self.pad = core, pad
        self.passes = {self.encoder: passes[0], self.decoder: passes[1]}

    def _runner(self, part: TiledVaePart, device):
        def run(x, mask, stats, own):
            with torch.no_grad():
                y, moments = part(*(torch.from_numpy(a).to(device) for a in (x, mask, stats, own)))
            return y.cpu().numpy(), moments.cpu().numpy()
        return run

    def _run(self, part: TiledVaePart, x: torch.Tensor, latent_hw, in_scale, out_scale, channels):
        out = run_tiled(self._runner(part, x.device), x.detach().cpu().numpy().astype(np.float32),
                        latent_hw=latent_hw, in_scale=in_scale, out_scale=out_scale, out_channels=channels,
                        norms=part.norms, groups=part.groups, core=self.core, pad=self.pad,
                         passes=self.passes[part])
        return torch.from_numpy(out).to(x.device)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] (1, 3, H, W), H and W multiples of the VAE's downscale -> scaled latent."""
        h, w = image.shape[2] // self.down, image.shape[3] // self.down
        return self._run(self.encoder, image, (h, w), self.down, 1, self.encoder.latent_channels)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        h, w = latent.shape[2], latent.shape[3]
        return self._run(self.decoder, latent, (h, w), 1, self.down, 3)


def border_mask(h: int, w: int, core: int, pad: int, scale: int) -> np.ndarray:
    """Pixels within `scale` of a tile core's border, for an h x w latent shown at x`scale`: where
    a seam would show (the tiling benchmark and tests compare the error there with elsewhere)."""
    border = np.zeros((h * scale, w * scale), bool)
    for t in vae_tiles(h, w, core, pad):
        ct, cl, ch, cw = t.core
        for r in (ct, ct + ch):
            if 0 < r < h:
                border[max(r * scale - scale, 0):r * scale + scale, :] = True
        for c in (cl, cl + cw):
            if 0 < c < w:
                border[:, max(c * scale - scale, 0):c * scale + scale] = True
    return border
