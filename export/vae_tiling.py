"""The tiled-VAE settings an export records in manifest.json ("vae_tiling")."""
from __future__ import annotations

from dataclasses import dataclass

from deedsr.runtime.contract import VAE_DECODER_TILED, VAE_ENCODER_TILED
from deedsr.runtime.vae_tiling import max_window


@dataclass
class VaeTiling:
    """core/pad in latent pixels (x8 image pixels); passes: see runtime/vae_tiling.py.

    Defaults measured on the demo VAE (benchmarks/bench_vae_tiling.py, 256 px astronaut, core 16,
    pad 8): tiled vs untiled PSNR of the encoder's latent 47.8 / 57.0 / 64.2 dB after 2 / 3 / 4
    passes; of the decoder's image 33.5 / 39.6 / 43.8 / 42.8 dB after 2 / 3 / 4 / 5 (the floor
    is the mid-block attention seeing only its tile)."""

    core: int = 64
    pad: int = 8
    encoder_passes: int = 3
    decoder_passes: int = 4

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
