"""Training data: folders of HR images -> random crops, flips and on-the-fly Real-ESRGAN
second-order degradation.

Reproducibility does not depend on workers: the sampler yields keys (epoch, index) and every
random choice for a sample (crop, flip, degradation, patch cells) comes from a numpy
Generator seeded with SeedSequence([seed, epoch, index]). The same keys give the same
samples with 0 or 16 workers, on one rank or many, before or after a resume.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..degradations import DegradationConfig, degrade
from ..runtime.imageops import bicubic_upscale
from ..runtime.profiles import get_profile
from .config import DataConfig, degradation_config

__all__ = ["DataError", "DegradedImages", "StepBatchSampler", "list_images", "load_rgb"]

MODES = ("pair", "moco", "hr")


class DataError(ValueError):
    """Training data that cannot be used; str() is one line naming the file or folder."""


def load_rgb(path: str | Path) -> np.ndarray:
    """HxWx3 uint8 RGB; grayscale is replicated, alpha dropped, 16-bit scaled to 8 bits."""
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
                arr = np.round(np.clip(arr / hi, 0, 1) * 255).astype(np.uint8)
                return np.ascontiguousarray(np.repeat(arr[..., None], 3, axis=2))
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{path}: unreadable image ({e})") from None


def list_images(data: DataConfig, min_side: int) -> list[Path]:
    """Every image file under data.folders (sorted, recursive), each checked to open and to be
    at least min_side x min_side. Raises DataError (one line) before any training starts."""
    if not data.folders:
        raise DataError("data.folders: no data folder given")
    extensions = {e.lower() if e.startswith(".") else "." + e.lower() for e in data.extensions}
    files: list[Path] = []
    for folder in data.folders:
        path = Path(folder).expanduser()
        if path.is_file():
            files.append(path)
            continue
        if not path.exists():
            raise DataError(f"{path}: data folder not found")
        if not path.is_dir():
            raise DataError(f"{path}: not a folder or an image file")
        try:
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in extensions and p.is_file())
        except OSError as e:
            raise DataError(f"{path}: unreadable data folder ({e.strerror or e})") from None
        if not found:
            raise DataError(f"{path}: no images ({', '.join(sorted(extensions))}) in this data folder")
        files.extend(found)
    small: list[tuple[Path, tuple[int, int]]] = []
    for file in files:
        try:
            with Image.open(file) as im:
                size = im.size
                im.verify()
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise DataError(f"{file}: unreadable image ({e})") from None
        if min(size) < min_side:
            small.append((file, size))
    if small:
        file, (w, h) = small[0]
        more = f" ({len(small)} of {len(files)} images are)" if len(small) > 1 else ""
        raise DataError(
            f"{file}: {w}x{h} is smaller than the {min_side}x{min_side} training crop{more}; "
            f"lower data.gt_size or remove such images"
        )
    return files


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, index])))


class DegradedImages:
    """Map-style dataset over keys (epoch, index), index in [0, len(files) * repeat).

    mode "pair": {"hr": 3xSxS, "lr": 3x(S/4)x(S/4), "lr_up": bicubic x4 of lr}, floats in [0, 1]
                 (the bicubic of sampling profile `profile`: Pillow's for paper, torch's for
                 reference-code)
    mode "moco": {"q", "k"}: two different patch_size cells of one degraded LR image
    mode "hr":   {"hr"}: the crop (or, with `degraded_fraction`, sometimes a bicubic-upsampled
                 degraded version of it) for autoencoder training
    """

    def __init__(
        self,
        files: list[Path],
        data: DataConfig,
        seed: int,
        mode: str = "pair",
        *,
        scale: int = 4,
        patch_size: int = 0,
        degraded_fraction: float = 0.0,
        profile: str = "paper",
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.files = list(files)
        self.data = data
        self.seed = int(seed)
        self.mode = mode
        self.degradation: DegradationConfig = dataclasses.replace(degradation_config(data), scale=scale)
        self.scale = scale
        self.gt = data.gt_size
        if self.gt % scale:
            raise DataError(f"data.gt_size ({self.gt}) must be divisible by the scale {scale}")
        self.lr_size = self.gt // scale
        self.patch_size = patch_size
        if mode == "moco":
            cells = (self.lr_size // max(patch_size, 1)) ** 2
            if patch_size <= 0 or cells < 2:
                raise DataError(
                    f"patch_size {patch_size} leaves fewer than two patches in a {self.lr_size}x{self.lr_size} "
                    f"LR image (data.gt_size {self.gt} / {scale}); raise data.gt_size to at least "
                    f"{2 * patch_size * scale} or lower patch_size"
                )
        self.degraded_fraction = degraded_fraction
        self.profile = get_profile(profile)
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.files) * self.data.repeat

    def image(self, i: int) -> np.ndarray:
        if self.data.cache_images and i in self._cache:
            return self._cache[i]
        img = load_rgb(self.files[i])
        if self.data.cache_images:
            self._cache[i] = img
        return img

    def crop(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = img.shape[:2]
        if min(h, w) < self.gt:  # list_images checks this; a file changed since?
            raise DataError(f"image of {w}x{h} is smaller than the {self.gt}x{self.gt} training crop")
        top = int(rng.integers(0, h - self.gt + 1))
        left = int(rng.integers(0, w - self.gt + 1))
        out = img[top : top + self.gt, left : left + self.gt]
        if self.data.hflip and rng.uniform() < 0.5:
            out = out[:, ::-1]
        if self.data.rot90:
            out = np.rot90(out, int(rng.integers(4)))
        return np.ascontiguousarray(out).astype(np.float32) / np.float32(255.0)

    def __getitem__(self, key) -> dict[str, np.ndarray]:
        epoch, index = (0, key) if isinstance(key, (int, np.integer)) else key
        rng = sample_rng(self.seed, int(epoch), int(index))
        hr = self.crop(self.image(int(index) % len(self.files)), rng)
        if self.mode == "hr":
            if self.degraded_fraction > 0 and rng.uniform() < self.degraded_fraction:
                hr = np.clip(bicubic_upscale(degrade(hr, rng, self.degradation), self.scale), 0, 1)
            return {"hr": _chw(hr)}
        lr = degrade(hr, rng, self.degradation)
        if self.mode == "pair":
            # the crop side as the multiple: neither profile pads a training crop
            up = self.profile.upscale(lr, self.scale, self.lr_size)
            return {"hr": _chw(hr), "lr": _chw(lr), "lr_up": _chw(up)}
        p = self.patch_size
        per_row = self.lr_size // p
        a, b = rng.choice(per_row * per_row, size=2, replace=False)
        cells = []
        for c in (a, b):
            r, col = divmod(int(c), per_row)
            cells.append(_chw(lr[r * p : (r + 1) * p, col * p : (col + 1) * p]))
        return {"q": cells[0], "k": cells[1]}


def _chw(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)


class StepBatchSampler:
    """Batch sampler over optimizer steps: from `start_step` on, yields this rank's
    micro-batches of keys (epoch, index), `accum` of them per step.

    Epoch e is a permutation of range(n) seeded with (seed, e); step j of the epoch takes its
    slice j of `global_batch` keys (the rest of an epoch that does not fill a batch is dropped)
    and splits it into accum x world micro-batches: micro-batch a of rank r is
    slice[(a * world + r) * micro : ... + micro]. So a global batch holds the same samples
    whatever the number of ranks and the accumulation, and a resume at step s continues with
    exactly the keys the uninterrupted run would have used.
    """

    def __init__(self, n: int, global_batch: int, micro_batch: int, world: int, rank: int, seed: int,
                 start_step: int = 0, shuffle: bool = True):
        if global_batch % (micro_batch * world):
            raise ValueError(
                f"batch_size {global_batch} is not a multiple of micro_batch {micro_batch} x {world} ranks"
            )
        if n < global_batch:
            raise DataError(
                f"the data holds {n} samples per epoch, fewer than one batch of {global_batch}; "
                f"add images, raise data.repeat or lower batch_size"
            )
        self.n, self.global_batch, self.micro, self.world, self.rank = n, global_batch, micro_batch, world, rank
        self.accum = global_batch // (micro_batch * world)
        self.seed, self.start_step, self.shuffle = seed, start_step, shuffle
        self.steps_per_epoch = n // global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 0x5EED, epoch])))
        return rng.permutation(self.n)

    def step_keys(self, step: int) -> list[list[tuple[int, int]]]:
        """This rank's micro-batches of optimizer step `step`."""
        epoch, j = divmod(step, self.steps_per_epoch)
        chunk = self.permutation(epoch)[j * self.global_batch : (j + 1) * self.global_batch]
        out = []
        for a in range(self.accum):
            start = (a * self.world + self.rank) * self.micro
            out.append([(epoch, int(i)) for i in chunk[start : start + self.micro]])
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        perm_epoch, perm = -1, None
        while True:
            epoch, j = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm_epoch, perm = epoch, self.permutation(epoch)
            chunk = perm[j * self.global_batch : (j + 1) * self.global_batch]
            for a in range(self.accum):
                start = (a * self.world + self.rank) * self.micro
                yield [(epoch, int(i)) for i in chunk[start : start + self.micro]]
            step += 1
