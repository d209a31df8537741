"""Tiled VAE (global GroupNorm statistics) against the untiled VAE, the runtime's tile graphs
against the reference's, and the memory model against a measured peak."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from deedsr.runtime.contract import VAE_DECODER_TILED, VAE_ENCODER_TILED
from deedsr.runtime.upscaler import Upscaler
from deedsr.runtime.vae_tiling import VaeTiling, core_starts, run_vae_graph, vae_tiles
from PIL import Image
from skimage import data

from deedsr.models import load_checkpoint
from deedsr.vae_tiling import TiledVae, border_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("h,w,core,pad", [(32, 32, 16, 8), (37, 20, 8, 3), (5, 70, 64, 8), (64, 64, 64, 0)])
def test_cores_partition_the_latent_and_windows_hold_them(h, w, core, pad):
    owner = np.zeros((h, w), int)
    for t in vae_tiles(h, w, core, pad):
        (ct, cl, ch, cw), (wt, wl, wh, ww) = t.core, t.window
        owner[ct:ct + ch, cl:cl + cw] += 1
        assert wt <= ct and wl <= cl and ct + ch <= wt + wh <= h and cl + cw <= wl + ww <= w
        assert wh <= core + 2 * pad and ww <= core + 2 * pad
        assert t.mask().sum() == ch * cw
    assert (owner == 1).all()
    sizes = [s for _, s in core_starts(h, core)]
    assert max(sizes) - min(sizes) <= 1  # balanced


# ------------------------------------------------------------- tiled vs untiled (torch)
@pytest.fixture(scope="module")
def demo_model():
    return load_checkpoint("deedsr/assets/demo")


@pytest.fixture(scope="module")
def photo256():
    return np.asarray(Image.fromarray(data.astronaut()).resize((256, 256), Image.BICUBIC)).astype(np.float32) / 255


def _border_ratio(err: np.ndarray, h: int, w: int, core: int, pad: int, scale: int) -> float:
    """Mean squared error within `scale` pixels of a core border over the mean elsewhere."""
    border = border_mask(h, w, core, pad, scale)
    return float(err[border].mean() / err[~border].mean())


def test_tiled_vae_matches_untiled_without_seams(demo_model, photo256):
    """Demo VAE, 256 px photo (latent 32), 2 x 2 tiles of core 16, pad 8, the default passes:
    measured 57.0 dB (encoder latent) and 43.8 dB (decoder image)."""
    x = torch.from_numpy(photo256.transpose(2, 0, 1))[None] * 2 - 1
    with torch.no_grad():
        z = demo_model.encode(x)
        image = demo_model.decode(z).clamp(-1, 1)
    tiled = TiledVae(demo_model, core=16, pad=8)
    zt = tiled.encode(x)
    it = tiled.decode(z).clamp(-1, 1)
    z_range = float(z.max() - z.min())
    z_err = ((zt - z) ** 2).mean(1)[0].numpy()
    i_err = ((it - image) ** 2).mean(1)[0].numpy()
    assert 10 * np.log10(z_range**2 / z_err.mean()) >= 50
    assert 10 * np.log10(4 / i_err.mean()) >= 40
    assert _border_ratio(z_err, 32, 32, 16, 8, 1) <= 1.2
    assert _border_ratio(i_err, 32, 32, 16, 8, 8) <= 1.2


def test_one_tile_is_the_untiled_vae(demo_model, photo256):
    x = torch.from_numpy(photo256[:64, :64].transpose(2, 0, 1).copy())[None] * 2 - 1
    with torch.no_grad():
        z = demo_model.encode(x)
        image = demo_model.decode(z)
    tiled = TiledVae(demo_model)  # core 64 latent pixels: one tile
    assert torch.allclose(tiled.encode(x), z, atol=1e-5)
    assert torch.allclose(tiled.decode(z), image, atol=1e-4)


def test_runtime_tile_graphs_equal_the_reference(tiny_model, tiny_engine_dir):
    """The exported tile graphs through the runtime's ORT backend against the torch tile
    function, both driven by runtime/vae_tiling.py: 3 x 2 tiles of core 8."""
    up = Upscaler.from_engine_dir(tiny_engine_dir, backend="ort", precision="fp32")
    tiling = up.vae_tiling.with_core(8)
    reference = TiledVae(tiny_model, core=8, pad=tiling.pad,
                         passes=(tiling.passes[VAE_ENCODER_TILED], tiling.passes[VAE_DECODER_TILED]))
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, 3, 24 * 8, 16 * 8)).astype(np.float32)
    z = run_vae_graph(up.backend, up.manifest, tiling, VAE_ENCODER_TILED, image)
    z_ref = reference.encode(torch.from_numpy(image)).numpy()
    assert z.shape == (1, 4, 24, 16)
    np.testing.assert_allclose(z, z_ref, atol=2e-4)
    decoded = run_vae_graph(up.backend, up.manifest, tiling, VAE_DECODER_TILED, z_ref)
    np.testing.assert_allclose(decoded, reference.decode(torch.from_numpy(z_ref)).numpy(), atol=2e-4)
    assert VaeTiling.from_manifest(up.manifest).core == up.manifest.data["vae_tiling"]["core"]


# ---------------------------------------------------------------------- memory model
@pytest.fixture(scope="module")
def measured_engine_dir(tiny_engine_dir, tmp_path_factory):
    """The session's tiny engines plus the export's memory figures (fresh processes)."""
    from deedsr.export.memory import measure

    out = tmp_path_factory.mktemp("measured") / "tiny"
    shutil.copytree(tiny_engine_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["memory"] = measure(out, ["fp32"], use_denoiser=True, threads=1)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


CHILD = r"""
import json, sys
import numpy as np
from PIL import Image
from skimage import data
from deedsr.runtime.upscaler import Upscaler
up = Upscaler.from_engine_dir(sys.argv[1], backend="ort", precision="fp32", threads=1)
lr = np.asarray(Image.fromarray(data.astronaut()).resize((96, 80), Image.BICUBIC))
estimate = up.estimate_memory(80, 96)
up.upscale(lr, steps=2)
with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print(json.dumps({"estimate": estimate, "peak": peak}))
"""


def test_estimate_within_25_percent_of_the_measured_peak(measured_engine_dir):
    done = subprocess.run([sys.executable, "-c", CHILD, str(measured_engine_dir)], capture_output=True, text=True,
                          check=True)
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.75 <= r["estimate"] / r["peak"] <= 1.25, r


def test_refusal_names_what_fits_and_the_rest_of_the_batch_is_done(measured_engine_dir, tmp_path):
    from deedsr.cli import main

    up = Upscaler.from_engine_dir(measured_engine_dir, backend="ort", precision="fp32")
    small = up.estimate_memory(32, 32)
    large = up.plan(128, 128, vae_tile=8, limit=1 << 50).bytes  # with the smallest VAE tiles
    assert large > small
    limit = (small + large) // 2
    folder = tmp_path / "in"
    folder.mkdir()
    photo = Image.fromarray(data.astronaut())
    photo.resize((32, 32)).save(folder / "a_small.png")
    photo.resize((128, 128)).save(folder / "b_large.png")
    result = CliRunner().invoke(main, ["upscale", str(folder), "-o", str(tmp_path / "out"), "--engines",
                                       str(measured_engine_dir), "--backend", "ort", "--steps", "1",
                                       "--memory-limit", str(limit)])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "b_large.png: image is 128x128: upscaling to 512x512 needs about" in errors[0]
    assert "the largest 128:128 image that fits is about" in errors[0]
    assert (tmp_path / "out" / "a_small.png").exists() and not (tmp_path / "out" / "b_large.png").exists()


def test_per_step_graphs_add_up_the_others_overlap(measured_engine_dir):
    """The adapter's outputs are alive while the UNet runs, and the shared arena keeps both
    working sets (sd21-base, LR 256: 9.76 GiB measured, 9.80 modelled, 7.53 with a plain max)."""
    from deedsr.runtime.contract import ADAPTER, LEARNER, UNET, VAE_DECODER_TILED, VAE_ENCODER_TILED
    from deedsr.runtime.manifest import Manifest
    from deedsr.runtime.memory_model import HOST_BYTES_PER_LR_PIXEL, HOST_FIXED_BYTES, MemoryModel

    manifest = Manifest.load(measured_engine_dir)
    entry = manifest.data["memory"]["fp32"]
    mib = 2**20

    def model(**working):
        entry["graphs"] = {g: {"size": "batch_tile_pixels", "points": [[1, w * mib], [2, w * mib]]}
                           for g, w in working.items()}
        m = MemoryModel(manifest, "fp32", use_denoiser=False)
        plan = m.plan(64, 64, 16, 16, 1)
        host = HOST_FIXED_BYTES + HOST_BYTES_PER_LR_PIXEL * 64 * 64
        return (plan.bytes - max(entry["resident"], entry["load_peak"]) - host) / mib

    graphs = (LEARNER, VAE_ENCODER_TILED, ADAPTER, UNET, VAE_DECODER_TILED)
    assert model(**dict(zip(graphs, (10, 300, 100, 200, 250)))) == 300  # the encoder's alone
    assert model(**dict(zip(graphs, (10, 200, 150, 200, 250)))) == 350  # adapter + UNet
