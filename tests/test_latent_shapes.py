"""Latents other than SD's /8 x 4: the latent channel count and the image-to-latent factor are
model config fields (deedsr.config.with_latent) that the export writes into the manifest and
the runtime reads (padding, tiles, the tiled VAE, the memory model), never constants."""
import numpy as np
import pytest
import torch

from deedsr.config import preset, with_latent
from deedsr.models import DeeDSR
from deedsr.pipeline import DeeDSRPipeline
from deedsr.runtime.manifest import Manifest
from deedsr.runtime.upscaler import Upscaler

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 3


def _model(channels, downscale):
    torch.manual_seed(1)
    model = DeeDSR(with_latent(preset("tiny"), channels, downscale)).eval()
    with torch.no_grad():
        for m in model.unet.modulation:
            m.gamma.weight.normal_(0, 0.02)
            m.beta.weight.normal_(0, 0.02)
    return model


def test_with_latent_sets_every_part_and_checks_them():
    cfg = with_latent(preset("tiny"), 16, 4)
    assert (cfg.latent_channels, cfg.latent_downscale) == (16, 4)
    assert cfg.adapter.in_channels == cfg.unet["in_channels"] == cfg.unet["out_channels"] == 16
    assert cfg.vae["block_out_channels"] == [16, 32, 32]
    assert with_latent(preset("tiny"), None, 16).vae["block_out_channels"] == [16, 32, 32, 32, 32]
    assert preset("sd21-base").latent_channels == 4 and preset("sd21-base").latent_downscale == 8
    with pytest.raises(ValueError, match="power of two"):
        with_latent(preset("tiny"), None, 6)
    data = cfg.to_dict()
    data["unet"]["in_channels"] = 4
    with pytest.raises(ValueError, match=r"unet.in_channels \(4\) must equal vae.latent_channels \(16\)"):
        type(cfg).from_dict(data)


@pytest.mark.parametrize("channels,downscale", [(16, 8), (4, 4)])
def test_runtime_matches_the_reference_with_another_latent(channels, downscale, photo, tmp_path):
    from deedsr.export.engine_dir import export_engine_dir

    model = _model(channels, downscale)
    tile = 16  # the 48x40 photo's latent (20x24 at /8, 40x48 at /4) is blended from several tiles
    out = export_engine_dir(model, tmp_path / "engines", precisions=("fp32",), tile=tile, max_size=64)
    manifest = Manifest.load(out)
    assert manifest.image["latent_channels"] == channels
    assert manifest.image["latent_downscale"] == downscale
    up = Upscaler.from_engine_dir(out, backend="ort", precision="fp32")
    lh, lw = manifest.latent_size(*photo.shape[:2])
    multiple = manifest.image["pixel_multiple"]  # LR sides pad to whole UNet levels of the latent
    assert multiple == 8 * downscale // 4
    assert (lh, lw) == (-(-40 // multiple) * multiple * 4 // downscale, -(-48 // multiple) * multiple * 4 // downscale)
    got = up.upscale(photo, seed=5, steps=STEPS, tile=tile, tile_overlap=tile // 2)
    want = DeeDSRPipeline(model)(photo, seed=5, steps=STEPS, tile=tile, tile_overlap=tile // 2)
    assert got.shape == want.shape == (160, 192, 3)
    assert int(np.abs(got.astype(int) - want.astype(int)).max()) <= 1
