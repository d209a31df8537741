"""How far apart the two sampling profiles put a model's output: the same LR, seed and
sampler settings under `paper` and `reference-code`, PSNR between the two results and each
one's PSNR / SSIM (Y, border 4) against the HR photo. For scale, the PSNR between two seeds
under `paper`: reference-code draws the posterior noise first, so it also samples with other
noise than paper does from the same seed.

    python benchmarks/profile_difference.py                       # the demo weights, 50 steps
    python benchmarks/profile_difference.py --checkpoint DIR --side 280 --steps 20

The LR is made as `deedsr train evaluate` makes it (an HR centre crop of --side, the paper's
Table 6 degradation at --level, seeded per photo, quantised to 8 bits). The default side, 280,
gives a 70x70 LR: its x4 image (280) is padded to 320 under reference-code and the LR to 80
under paper, so the padding rules take part.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="DeeDSR checkpoint folder (default: the bundled demo weights)")
    parser.add_argument("--photos", nargs="+", default=["astronaut", "chelsea"], help="scikit-image photo names")
    parser.add_argument("--side", type=int, default=280, help="HR centre crop side (a multiple of 4)")
    parser.add_argument("--level", default="medium")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (the tiny model gains nothing from more; a busy machine loses)")
    args = parser.parse_args()

    import torch
    from deedsr.runtime.demo import demo_checkpoint
    from deedsr.runtime.profiles import PROFILES
    from skimage import data

    from deedsr.degradations import degrade_level
    from deedsr.metrics import psnr, ssim
    from deedsr.models import load_checkpoint
    from deedsr.pipeline import DeeDSRPipeline
    from deedsr.train.evaluate import prepare_hr

    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or demo_checkpoint()
    model = load_checkpoint(checkpoint)
    pipe = DeeDSRPipeline(model)
    sampler = model.config.sampler
    print(f"checkpoint {checkpoint} (trained under '{sampler.profile}'); {args.steps} steps, eta {sampler.eta}, "
          f"colour fix {sampler.color_fix}, seed {args.seed}, {args.level} degradation, HR side {args.side}")
    def rgb_psnr(a, b):
        a, b = a.astype(np.float64), b.astype(np.float64)
        return 10 * np.log10(255.0**2 / np.mean((a - b) ** 2)), np.abs(a - b)

    between, seeds = [], []
    for i, name in enumerate(args.photos):
        hr = prepare_hr(getattr(data, name)(), args.side, model.config.upscale)
        lr = degrade_level(hr, args.level, np.random.Generator(np.random.PCG64([args.seed, i])))
        lr8 = np.round(lr * 255.0).astype(np.uint8)
        results = {}
        for profile in PROFILES:
            started = time.monotonic()
            results[profile] = pipe(lr8, seed=args.seed, steps=args.steps, profile=profile)
            seconds = time.monotonic() - started
            print(f"  {name} {lr8.shape[1]}x{lr8.shape[0]} -> {hr.shape[1]}x{hr.shape[0]}, {profile:>14}: "
                  f"PSNR(Y) vs HR {psnr(results[profile], hr, crop_border=4):.2f} dB, "
                  f"SSIM(Y) {ssim(results[profile], hr, crop_border=4):.4f} ({seconds:.1f} s)")
        value, diff = rgb_psnr(*(results[p] for p in PROFILES))
        between.append(value)
        print(f"  {name}: paper vs reference-code, RGB PSNR {value:.2f} dB, max abs diff {int(diff.max())}, "
              f"mean abs diff {diff.mean():.2f} grey levels")
        other_seed = pipe(lr8, seed=args.seed + 1, steps=args.steps, profile=PROFILES[0])
        value, diff = rgb_psnr(results[PROFILES[0]], other_seed)
        seeds.append(value)
        print(f"  {name}: paper seed {args.seed} vs seed {args.seed + 1}, RGB PSNR {value:.2f} dB, "
              f"mean abs diff {diff.mean():.2f} grey levels")
    print(f"mean RGB PSNR between the profiles: {np.mean(between):.2f} dB; between two seeds under paper: "
          f"{np.mean(seeds):.2f} dB")


if __name__ == "__main__":
    main()
