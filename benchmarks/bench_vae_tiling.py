"""Tiled vs untiled VAE (PyTorch reference, demo weights): PSNR and seams per setting.

    python benchmarks/bench_vae_tiling.py [--side 256] [--settings 16,8,3,4 32,8,3,4 ...]

A setting is core,pad,encoder passes,decoder passes (latent pixels). The photo is scikit-image's
astronaut resized to side x side px; the untiled VAE is `DeeDSR.encode/decode`. For the encoder
the PSNR is over the latent's range, for the decoder over [-1, 1] (clamped, as the sampler
does). "border/else" is the mean squared error within one latent pixel (8 image pixels) of a
core border over the mean elsewhere: 1 means the borders are no worse than anywhere else.
Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from deedsr.runtime.vae_tiling import vae_tiles
from PIL import Image
from skimage import data

from deedsr.models import load_checkpoint
from deedsr.vae_tiling import TiledVae, border_mask


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default="deedsr/assets/demo")
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--settings", nargs="+", default=["16,8,2,2", "16,8,3,3", "16,8,3,4", "16,8,4,5",
                                                          "16,4,3,4", "16,16,3,4"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_checkpoint(args.checkpoint)
    photo = np.asarray(Image.fromarray(data.astronaut()).resize((args.side, args.side), Image.BICUBIC))
    x = torch.from_numpy(photo.astype(np.float32).transpose(2, 0, 1) / 255)[None] * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        image = model.decode(z).clamp(-1, 1)
    h, w = z.shape[2:]
    z_range = float(z.max() - z.min())
    print(f"{args.side} px photo, latent {h}x{w}, latent range {z_range:.2f}")
    print(f"{'core':>4} {'pad':>3} {'passes':>6} {'tiles':>5} | {'enc PSNR':>8} {'border/else':>11} | "
          f"{'dec PSNR':>8} {'border/else':>11} | {'time':>6}")
    for setting in args.settings:
        core, pad, enc, dec = (int(v) for v in setting.split(","))
        tiled = TiledVae(model, core, pad, (enc, dec))
        start = time.perf_counter()
        zt = tiled.encode(x)
        it = tiled.decode(z).clamp(-1, 1)
        elapsed = time.perf_counter() - start
        z_err = ((zt - z) ** 2).mean(1)[0].numpy()
        i_err = ((it - image) ** 2).mean(1)[0].numpy()
        zb, ib = border_mask(h, w, core, pad, 1), border_mask(h, w, core, pad, 8)
        tiles = len(vae_tiles(h, w, core, pad))
        ratio = (lambda e, b: e[b].mean() / e[~b].mean() if b.any() else float("nan"))
        print(f"{core:>4} {pad:>3} {enc:>3},{dec:<2} {tiles:>5} | {10 * np.log10(z_range**2 / z_err.mean()):>6.1f} dB "
              f"{ratio(z_err, zb):>11.2f} | {10 * np.log10(4 / i_err.mean()):>6.1f} dB {ratio(i_err, ib):>11.2f} | "
              f"{elapsed:>5.1f}s", flush=True)


if __name__ == "__main__":
    main()
