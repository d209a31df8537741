"""The tiled-VAE settings an export records in manifest.json ("vae_tiling")."""
from __future__ import annotations

from dataclasses import dataclass

from deedsr.runtime.contract import VAE_DECODER_TILED, VAE_ENCODER_TILED
from deedsr.runtime.vae_tiling import (
    DEFAULT_CORE,
    DEFAULT_PAD,
    DEFAULT_PASSES,
    max_window,
)


@dataclass
class VaeTiling:
    """core/pad in latent pixels (x8 image pixels); passes: see runtime/vae_tiling.py.

    Defaults: runtime/vae_tiling.py (measured there)."""

    core: int = DEFAULT_CORE
    pad: int = DEFAULT_PAD
    encoder_passes: int = DEFAULT_PASSES[VAE_ENCODER_TILED]
    decoder_passes: int = DEFAULT_PASSES[VAE_DECODER_TILED]

    @property
    def window(self) -> int:
        return max_window(self.core, self.pad)

    def check(self) -> None:
        from .engine_dir import ExportError

        if self.core < 8 or self.pad < 0 or self.pad > self.core:
            raise ExportError(f"VAE tiles need core >= 8 and 0 <= pad <= core latent pixels, "
                              f"got core {self.core}, pad {self.pad}")
        if self.encoder_passes < 1 or self.decoder_passes < 1:
            raise ExportError("the tiled VAE needs at least one pass")

    def manifest_entry(self, model) -> dict:
        return {
            "layout": "deedsr.runtime.vae_tiling",
            "core": self.core,
            "pad": self.pad,
            "passes": {VAE_ENCODER_TILED: self.encoder_passes, VAE_DECODER_TILED: self.decoder_passes},
            "groups": int(model.config.vae.get("norm_num_groups", 32)),
        }
