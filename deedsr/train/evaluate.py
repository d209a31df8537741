"""Held-out evaluation: HR photo -> Table 6 degradation or plain bicubic downscaling -> x4 ->
PSNR / SSIM on Y.

For every photo: the HR image (centre-cropped to `max_side` if set, sides cut to multiples of
4) is brought to LR with each of `levels`: one of the paper's Table 6 levels
(deedsr.degradations.degrade_level, a numpy generator seeded per photo) or "bicubic" (Pillow's
antialiased bicubic), quantised to 8 bits, and upscaled: bicubic (Pillow, as the sampler's own
input), the model with the checkpoint's default sampler (its noise-guided steps and colour fix)
and with eta 0; for the first level also with the paper's noise guidance (first step only) when
the default differs, with noise guidance off and, when the default has a colour fix, without it;
the sampler with every step noise-guided (the model never runs: the decoded z_lr, what a model
has to improve on) and the VAE's reconstruction of the HR photo, colour-fixed against the
bicubic input as the sampler fixes its output, which bounds any model on that VAE. PSNR and SSIM are computed on the BT.601 Y channel with `crop_border`
pixels removed from each side.

`degradation_retrieval` probes the degradation learner on its own: the same random
degradations applied to crops of different photos; does the nearest neighbour of a crop's
vector, among the other photo's crops, carry the same degradation?
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..degradations import degrade_level
from ..metrics import flat_region_ratio, psnr, ssim
from .config import EvalConfig

__all__ = ["evaluate", "vae_bound", "skimage_photo", "format_table", "degradation_retrieval"]

METHODS = ("bicubic", "model", "model_eta0", "model_paper_sampler", "model_no_noise_guidance", "model_no_color_fix",
           "no_model", "vae")
LABELS = {"bicubic": "bicubic", "model": "demo model", "model_eta0": "demo model, eta 0 (deterministic DDIM)",
          "model_paper_sampler": "demo model, the paper's sampler (noise guidance at the first step only)",
          "model_no_noise_guidance": "demo model, noise guidance off",
          "model_no_color_fix": "demo model, colour fix off",
          "no_model": "no model: every step noise-guided (the decoded z_lr, colour-fixed)",
          "vae": "VAE reconstruction of the HR photo, colour-fixed like the model (the bound)"}
# Downscalings besides the paper's Table 6 levels.
PLAIN_LEVELS = {"bicubic": "plain bicubic x4 downscaling (Pillow, antialiased)"}


SCORES = ("psnr", "ssim", "flat")


def scores(img: np.ndarray, hr: np.ndarray, crop_border: int) -> dict[str, float]:
    """PSNR and SSIM on Y, and the flat-region high-pass ratio (deedsr.metrics.flat_region_ratio)."""
    return {"psnr": round(psnr(img, hr, crop_border=crop_border), 3),
            "ssim": round(ssim(img, hr, crop_border=crop_border), 4),
            "flat": round(flat_region_ratio(img, hr, crop_border=crop_border), 3)}


def level_label(level: str) -> str:
    return PLAIN_LEVELS.get(level, f"paper Table 6 '{level}' degradation")


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


def low_resolution(hr: np.ndarray, level: str, scale: int, rng: np.random.Generator) -> np.ndarray:
    """The uint8 LR image of an HR photo: a Table 6 level, or plain bicubic downscaling."""
    if level == "bicubic":
        from PIL import Image

        h, w = hr.shape[:2]
        return np.asarray(Image.fromarray(hr).resize((w // scale, h // scale), Image.Resampling.BICUBIC))
    return np.round(degrade_level(hr, level, rng) * 255.0).astype(np.uint8)


def evaluate(model, photos: dict[str, np.ndarray], cfg: EvalConfig, out_dir: str | Path | None = None,
             device: str = "cpu") -> dict[str, Any]:
    """For each downscaling in cfg.levels and each photo, the scores of bicubic, the model with the
    checkpoint's default sampler and with eta 0; for the first level also the model with the
    paper's noise guidance (where the checkpoint's differs), without noise guidance (/ without
    its colour fix), the sampler without the model (every step noise-guided: z_lr decoded) and
    the VAE's reconstruction of the HR photo (what bounds the model). Means per level, and the
    learner's degradation_retrieval over the photos.
    `model` is a DeeDSR model or a checkpoint folder. With `out_dir`, the LR images and results
    are written there as PNGs (<photo>_<level>_<method>.png)."""
    import torch

    from ..models import load_checkpoint
    from ..pipeline import DeeDSRPipeline

    if isinstance(model, (str, Path)):
        model = load_checkpoint(model)
    pipe = DeeDSRPipeline(model, device)
    levels = {}
    for k, level in enumerate(cfg.levels):
        rows = [_evaluate_photo(pipe, name, photo, level, i, cfg, first=k == 0, out_dir=out_dir)
                for i, (name, photo) in enumerate(photos.items())]
        methods = [m for m in METHODS if m in rows[0]]
        mean = {m: {key: round(float(np.mean([r[m][key] for r in rows])), 4) for key in SCORES} for m in methods}
        levels[level] = {"photos": rows, "mean": mean}
    learner = model.learner.eval()
    param = next(learner.parameters())
    crop = min(256, *(min(p.shape[:2]) for p in photos.values())) // 16 * 16
    retrieval = None
    if len(photos) > 1 and crop >= 64:
        with torch.no_grad():
            retrieval = degradation_retrieval(
                lambda x: learner(torch.from_numpy(x).to(param.device, param.dtype)).float().cpu().numpy(), photos,
                crop_size=crop, seed=cfg.seed)
    return {
        "levels": levels,
        "color_fix": model.config.sampler.color_fix,
        "eta": model.config.sampler.eta,
        "noise_guidance_steps": list(pipe.sampler_config(steps=cfg.steps).noise_guidance_steps),
        "seed": cfg.seed,
        "steps": cfg.steps,
        "crop_border": cfg.crop_border,
        "metric": "PSNR (dB) / SSIM on the BT.601 Y channel",
        "learner_degradation_retrieval": retrieval,
    }


def _evaluate_photo(pipe, name: str, photo: np.ndarray, level: str, index: int, cfg: EvalConfig, *, first: bool,
                    out_dir: str | Path | None) -> dict[str, Any]:
    from PIL import Image

    hr, lr8, upscaled = heldout_inputs(photo, level, index, cfg, pipe.config.upscale)
    t0 = time.monotonic()
    results = {
        "bicubic": np.round(np.clip(upscaled, 0, 1) * 255).astype(np.uint8),
        "model": pipe(lr8, seed=cfg.seed, steps=cfg.steps),
        "model_eta0": pipe(lr8, seed=cfg.seed, steps=cfg.steps, eta=0.0),
    }
    if first:
        if pipe.sampler_config(steps=cfg.steps).noise_guidance_steps != (0,):
            results["model_paper_sampler"] = pipe(lr8, seed=cfg.seed, steps=cfg.steps, noise_guidance_steps=(0,))
        results["model_no_noise_guidance"] = pipe(lr8, seed=cfg.seed, steps=cfg.steps, noise_guidance_steps=())
        if pipe.config.sampler.color_fix != "none":
            results["model_no_color_fix"] = pipe(lr8, seed=cfg.seed, steps=cfg.steps, color_fix="none")
        results["no_model"] = pipe(lr8, seed=cfg.seed, steps=cfg.steps, eta=0.0,
                                   noise_guidance_steps=range(cfg.steps))
        results["vae"] = vae_reconstruction(pipe, hr, upscaled, pipe.config.sampler.color_fix)
    row: dict[str, Any] = {"photo": name, "hr_size": [int(hr.shape[1]), int(hr.shape[0])],
                           "lr_size": [int(lr8.shape[1]), int(lr8.shape[0])], "seconds": round(time.monotonic() - t0, 1)}
    for method, img in results.items():
        row[method] = scores(img, hr, cfg.crop_border)
    if out_dir is not None:
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(lr8).save(folder / f"{name}_{level}_lr.png")
        for method, img in results.items():
            Image.fromarray(img).save(folder / f"{name}_{level}_{method}.png")
    return row


def heldout_inputs(photo: np.ndarray, level: str, index: int, cfg: EvalConfig, scale: int):
    """A held-out photo's HR crop, its uint8 LR at `level` (generator seeded by (seed, index))
    and the LR's bicubic x4 in [0, 1], as every evaluation sees them."""
    from ..runtime.imageops import bicubic_upscale

    hr = prepare_hr(photo, cfg.max_side, scale)
    lr8 = low_resolution(hr, level, scale, np.random.Generator(np.random.PCG64([cfg.seed, index])))
    return hr, lr8, bicubic_upscale(lr8.astype(np.float32) / 255.0, scale)


def vae_bound(pipe, photos: dict[str, np.ndarray], cfg: EvalConfig, fix: str) -> dict[str, Any]:
    """What a VAE allows before any diffusion training: per held-out photo, PSNR / SSIM on Y of
    bicubic and of the VAE's colour-fixed reconstruction of the HR photo (the bound), under the
    first of cfg.levels; with the means and the margin bound - bicubic (dB)."""
    level = cfg.levels[0]
    rows = []
    for index, (name, photo) in enumerate(photos.items()):
        hr, lr8, upscaled = heldout_inputs(photo, level, index, cfg, pipe.config.upscale)
        bicubic = np.round(np.clip(upscaled, 0, 1) * 255).astype(np.uint8)
        row = {"photo": name}
        for method, img in (("bicubic", bicubic), ("vae", vae_reconstruction(pipe, hr, upscaled, fix))):
            row[method] = scores(img, hr, cfg.crop_border)
        rows.append(row)
    mean = {m: {k: round(float(np.mean([r[m][k] for r in rows])), 4) for k in SCORES} for m in ("bicubic", "vae")}
    return {"level": level, "color_fix": fix, "photos": rows, "mean": mean,
            "margin_db": round(mean["vae"]["psnr"] - mean["bicubic"]["psnr"], 3)}


def vae_reconstruction(pipe, hr: np.ndarray, reference: np.ndarray | None = None, fix: str = "none") -> np.ndarray:
    """HR uint8 -> the pipeline's (tiled) VAE encode + decode -> uint8 (edge-padded to whole
    latents); with a colour fix, fixed against `reference` (the bicubic input, HxWx3 in [0, 1])
    as the sampler fixes the model's output, so that it bounds what the sampler can return."""
    import torch

    from ..color import color_fix

    h, w = hr.shape[:2]
    down = pipe.config.latent_downscale
    padded = np.pad(hr, ((0, -h % down), (0, -w % down), (0, 0)), mode="edge")
    with torch.no_grad():
        x = torch.from_numpy(padded.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)[None].to(pipe.device)
        rec = (pipe.vae.decode(pipe.vae.encode(x)).clamp(-1, 1)[..., :h, :w] + 1) / 2
        if fix != "none":
            ref = torch.from_numpy(np.ascontiguousarray(reference.transpose(2, 0, 1)))[None].to(rec)
            rec = color_fix(rec, ref, fix)
    return np.round(rec[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).astype(np.uint8)


def format_table(report: dict[str, Any]) -> str:
    """Markdown tables of an evaluate() report, one per downscaling."""
    lines: list[str] = []
    for level, result in report["levels"].items():
        names = [r["photo"] for r in result["photos"]]
        lines += [f"{level_label(level).capitalize()}:", "",
                  "| method | " + " | ".join(names) + " | mean |", "|---" * (len(names) + 2) + "|"]
        for m in (m for m in METHODS if m in result["mean"]):
            cells = [f"{r[m]['psnr']:.2f} / {r[m]['ssim']:.3f}" for r in result["photos"]]
            mean = result["mean"][m]
            lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + f" | **{mean['psnr']:.2f} / {mean['ssim']:.3f}** |")
        lines.append("")
        flat = [m for m in METHODS if m in result["mean"] and "flat" in result["mean"][m]]
        if flat:
            lines += ["Flat-region high-pass energy against the HR photo's (the quarter of 16x16 blocks where the HR "
                      "is flattest; 1 = as smooth as the HR, mottle raises it):", "",
                      "| method | " + " | ".join(names) + " | mean |", "|---" * (len(names) + 2) + "|"]
            for m in flat:
                cells = [f"{r[m]['flat']:.2f}" for r in result["photos"]]
                lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + f" | **{result['mean'][m]['flat']:.2f}** |")
            lines.append("")
    probe = report.get("learner_degradation_retrieval")
    if probe:
        lines.append(f"Degradation learner, cross-photo degradation retrieval: {probe['accuracy']:.3f} "
                     f"(chance {probe['chance']:.3f}, {probe['samples']} degraded crops; see degradation_retrieval).")
    return "\n".join(lines).rstrip() + "\n"


def write_report(report: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def degradation_retrieval(encode, photos: dict[str, np.ndarray], *, degradations: int = 16, crops: int = 8,
                          crop_size: int = 256, seed: int = 0) -> dict[str, float]:
    """How well `encode` ((N, 3, h, w) float32 LR in [0, 1] -> (N, D)) separates degradations
    regardless of content.

    Every photo gives `crops` random crops; every crop is degraded `degradations` times with the
    training distribution (deedsr.degradations), degradation j drawn from the same seed for all
    crops, so every photo sees the same kernels, noise and JPEG qualities. Each vector is taken
    relative to the mean over its crop's degradations (removing the content), and its nearest
    neighbour by cosine among the other photos' crops is a hit when it has the same degradation.
    Chance is 1 / degradations.
    """
    from ..degradations import DegradationConfig, degrade

    if len(photos) < 2:
        raise ValueError("degradation_retrieval needs at least two photos")
    keys, images = [], []
    for p, (name, photo) in enumerate(photos.items()):
        h, w = photo.shape[:2]
        if min(h, w) < crop_size:
            raise ValueError(f"{name}: {w}x{h} is smaller than the {crop_size} crop")
        rng = np.random.default_rng([seed, p])
        for c in range(crops):
            top, left = int(rng.integers(0, h - crop_size + 1)), int(rng.integers(0, w - crop_size + 1))
            crop = photo[top : top + crop_size, left : left + crop_size].astype(np.float32) / 255.0
            for j in range(degradations):
                images.append(degrade(crop, np.random.default_rng([seed, 1000 + j]), DegradationConfig()))
                keys.append((p, c, j))
    feats = np.asarray(encode(np.stack(images).transpose(0, 3, 1, 2).astype(np.float32)), dtype=np.float64)
    feats = feats.reshape(len(photos) * crops, degradations, -1)
    feats = feats - feats.mean(axis=1, keepdims=True)
    feats = feats.reshape(len(keys), -1)
    feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    sim = feats @ feats.T
    photo_of = np.array([k[0] for k in keys])
    degr_of = np.array([k[2] for k in keys])
    sim[photo_of[:, None] == photo_of[None, :]] = -np.inf
    hits = degr_of[sim.argmax(axis=1)] == degr_of
    return {"accuracy": float(hits.mean()), "chance": 1.0 / degradations, "samples": len(keys)}
