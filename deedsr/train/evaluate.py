"""Held-out evaluation: HR photo -> Table 6 degradation -> x4 -> PSNR / SSIM on Y.

For every photo: the HR image (centre-cropped to `max_side` if set, sides cut to multiples of
4) is degraded with one of the paper's Table 6 levels (deedsr.degradations.degrade_level, a
numpy generator seeded per photo), quantised to 8 bits, and upscaled three ways: bicubic
(Pillow, as the sampler's own input), the model with the default sampler (noise guidance at
the first step), and the model with noise guidance off. PSNR and SSIM are computed on the
BT.601 Y channel with `crop_border` pixels removed from each side.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..degradations import degrade_level
from ..metrics import psnr, ssim
from .config import EvalConfig

__all__ = ["evaluate", "skimage_photo", "format_table"]

METHODS = ("bicubic", "model", "model_no_noise_guidance")


def skimage_photo(name: str) -> np.ndarray:
    """A photo shipped with scikit-image as HxWx3 uint8 RGB (grayscale replicated, alpha dropped)."""
    from skimage import data

    fn = getattr(data, name, None)
    if callable(fn) and not name.startswith("_") and name not in ("download_all", "data_dir"):
        img = np.asarray(fn())
    else:  # a file of skimage's data folder, e.g. motorcycle_left (half of stereo_motorcycle)
        folder = Path(data.__file__).parent
        files = [folder / f"{name}{ext}" for ext in (".png", ".jpg")]
        found = next((f for f in files if f.is_file()), None)
        if found is None:
            raise ValueError(f"scikit-image has no data image '{name}'")
        from PIL import Image

        with Image.open(found) as im:
            img = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
    if img.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name} is {img.dtype}, not an 8-bit photo")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"skimage.data.{name} has shape {img.shape}, not an RGB photo")
    return np.ascontiguousarray(img[..., :3])


def prepare_hr(img: np.ndarray, max_side: int, scale: int) -> np.ndarray:
    h, w = img.shape[:2]
    ch, cw = (min(h, max_side), min(w, max_side)) if max_side else (h, w)
    ch, cw = ch // scale * scale, cw // scale * scale
    top, left = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(img[top : top + ch, left : left + cw])


def evaluate(model, photos: dict[str, np.ndarray], cfg: EvalConfig, out_dir: str | Path | None = None,
             device: str = "cpu") -> dict[str, Any]:
    """Scores of bicubic / model / model without noise guidance on each photo, and their means.
    `model` is a DeeDSR model or a checkpoint folder. With `out_dir`, the LR and the three
    results of each photo are written there as PNGs."""
    from PIL import Image

    from ..checkpoints import load_checkpoint
    from ..pipeline import DeeDSRPipeline, bicubic_upscale

    if isinstance(model, (str, Path)):
        model = load_checkpoint(model)
    scale = model.config.upscale
    pipe = DeeDSRPipeline(model, device)
    rows = []
    for i, (name, photo) in enumerate(photos.items()):
        hr = prepare_hr(photo, cfg.max_side, scale)
        lr = degrade_level(hr, cfg.level, np.random.Generator(np.random.PCG64([cfg.seed, i])))
        lr8 = np.round(lr * 255.0).astype(np.uint8)
        t0 = time.monotonic()
        results = {
            "bicubic": np.round(np.clip(bicubic_upscale(lr8.astype(np.float32) / 255.0, scale), 0, 1) * 255).astype(np.uint8),
            "model": pipe(lr8, seed=cfg.seed, steps=cfg.steps),
            "model_no_noise_guidance": pipe(lr8, seed=cfg.seed, steps=cfg.steps, noise_guidance_steps=()),
        }
        seconds = time.monotonic() - t0
        row: dict[str, Any] = {"photo": name, "hr_size": [int(hr.shape[1]), int(hr.shape[0])],
                               "lr_size": [int(lr8.shape[1]), int(lr8.shape[0])], "seconds": round(seconds, 1)}
        for method, img in results.items():
            row[method] = {
                "psnr": round(psnr(img, hr, crop_border=cfg.crop_border), 3),
                "ssim": round(ssim(img, hr, crop_border=cfg.crop_border), 4),
            }
        rows.append(row)
        if out_dir is not None:
            folder = Path(out_dir)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(lr8).save(folder / f"{name}_lr.png")
            for method, img in results.items():
                Image.fromarray(img).save(folder / f"{name}_{method}.png")
    mean = {m: {k: round(float(np.mean([r[m][k] for r in rows])), 4) for k in ("psnr", "ssim")} for m in METHODS}
    return {
        "level": cfg.level,
        "seed": cfg.seed,
        "steps": cfg.steps,
        "crop_border": cfg.crop_border,
        "metric": "PSNR (dB) / SSIM on the BT.601 Y channel",
        "photos": rows,
        "mean": mean,
    }


def format_table(report: dict[str, Any]) -> str:
    """Markdown table of an evaluate() report."""
    names = [r["photo"] for r in report["photos"]]
    head = "| method | " + " | ".join(f"{n} PSNR / SSIM" for n in names) + " | mean PSNR / SSIM |"
    sep = "|---" * (len(names) + 2) + "|"
    lines = [head, sep]
    labels = {"bicubic": "bicubic", "model": "demo model", "model_no_noise_guidance": "demo model, noise guidance off"}
    for m in METHODS:
        cells = [f"{r[m]['psnr']:.2f} / {r[m]['ssim']:.4f}" for r in report["photos"]]
        mean = report["mean"][m]
        lines.append(f"| {labels[m]} | " + " | ".join(cells) + f" | {mean['psnr']:.2f} / {mean['ssim']:.4f} |")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
