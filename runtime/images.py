"""Reading, checking and atomically writing images (Pillow + numpy)."""
from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
MIN_SIDE = 8


class ImageError(ValueError):
    """An input image that cannot be upscaled; the message says why in one line."""


def read_image(path: str | Path) -> np.ndarray:
    """Read an 8-bit RGB image as uint8 HxWx3; refuse alpha, grayscale, 16-bit and tiny images."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
            if has_alpha:
                raise ImageError(f"has an alpha channel ({mode}); flatten it to RGB first")
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F") or mode.startswith("I;"):
                raise ImageError(f"is not 8-bit ({mode}); only 8-bit RGB images are supported")
            if mode in ("L", "1") or (mode == "P" and _palette_is_gray(im)):
                raise ImageError(f"is grayscale ({mode}); only RGB images are supported")
            if mode != "RGB":
                im = im.convert("RGB")
            array = np.asarray(im, dtype=np.uint8)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("does not exist") from None
    except IsADirectoryError:
        raise ImageError("is a directory") from None
    except UnidentifiedImageError:
        raise ImageError("is not an image Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"is too large to read ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"cannot be read ({e})") from None
    if min(array.shape[:2]) < MIN_SIDE:
        raise ImageError(f"is {array.shape[1]}x{array.shape[0]}; each side must be at least {MIN_SIDE} pixels")
    return np.ascontiguousarray(array)


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from the file's header without decoding the pixels; None when the file
    cannot be opened (read_image then says why). Raises ImageError for decompression bombs."""
    try:
        with Image.open(path) as im:
            return im.size
    except Image.DecompressionBombError as e:
        raise ImageError(f"is too large to read ({e})") from None
    except (OSError, ValueError, SyntaxError):
        return None


def _palette_is_gray(im: Image.Image) -> bool:
    palette = im.getpalette() or []
    rgb = np.asarray(palette, dtype=np.int32).reshape(-1, 3)
    return bool(len(rgb)) and bool(np.all(rgb[:, 0] == rgb[:, 1]) and np.all(rgb[:, 1] == rgb[:, 2]))


def write_png(array: np.ndarray, path: str | Path) -> None:
    """Write to a temporary file beside `path`, then rename: never a half-written output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(array).save(f, format="PNG")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask without changing it (os.umask would race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files, folders (their images, sorted) and globs -> (paths, patterns that matched nothing)."""
    paths: list[Path] = []
    unmatched: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            paths.append(p)
        elif glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item) if Path(m).is_file())
            if matches:
                paths += matches
            else:
                unmatched.append(item)
        else:
            paths.append(p)  # reported as missing when read, with the rest of the batch
    seen: set[Path] = set()
    unique = []
    for p in paths:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique, unmatched
