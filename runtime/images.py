"""Reading, checking and atomically writing images (Pillow + numpy)."""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import stat
import struct
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
MIN_SIDE = 8
TMP_SUFFIX = ".png.tmp"


class ImageError(ValueError):
    """An input image that cannot be upscaled; the message says why in one line."""


def read_image(path: str | Path) -> np.ndarray:
    """Read an 8-bit RGB image as uint8 HxWx3, turned upright by its EXIF orientation (as photo
    viewers show it). Refused with one line: alpha, grayscale, 16-bit (PNG, TIFF), animations and
    multi-page files, tiny images, decompression bombs, and anything that is not a regular file
    (a FIFO or device is never opened for reading, so a batch cannot hang on it)."""
    path = Path(path)
    try:
        with _open(path) as im:
            mode = im.mode
            has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
            if has_alpha:
                raise ImageError(f"has an alpha channel ({mode}); flatten it to RGB first")
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F") or mode.startswith("I;") or _deep(im):
                raise ImageError(f"is not 8-bit ({_depth(im, mode)}); only 8-bit RGB images are supported")
            if mode in ("L", "1") or (mode == "P" and _palette_is_gray(im)):
                raise ImageError(f"is grayscale ({mode}); only RGB images are supported")
            if im.format == "PNG":
                _check_png_chunks(im.fp.fileno())
            if getattr(im, "is_animated", False):
                raise ImageError(f"has {getattr(im, 'n_frames', 'several')} frames (an animation or a multi-page "
                                 "file); save the frame to upscale as its own image")
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode != "RGB":
                im = im.convert("RGB")
            array = np.asarray(im, dtype=np.uint8)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("is not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"is too large to read ({_first_sentence(e)})") from None
    except (OSError, ValueError, SyntaxError, EOFError, KeyError, IndexError, TypeError, struct.error,
            zlib.error) as e:
        raise ImageError(f"cannot be read ({_first_sentence(e) or type(e).__name__})") from None
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageError(f"decodes to shape {array.shape}, not RGB")
    if min(array.shape[:2]) < MIN_SIDE:
        raise ImageError(f"is {array.shape[1]}x{array.shape[0]}; each side must be at least {MIN_SIDE} pixels")
    return np.ascontiguousarray(array)


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) as read_image will return it (EXIF orientation applied), from the file's
    header without decoding the pixels; None when the header cannot be read (read_image then says
    why). Raises ImageError for what read_image refuses before opening: a missing file, a FIFO,
    a symlink loop, a decompression bomb."""
    try:
        with _open(Path(path)) as im:
            width, height = im.size
            try:
                orientation = im.getexif().get(ORIENTATION, 1)
            except Exception:  # a broken EXIF block: read_image reports it
                orientation = 1
            return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"is too large to read ({_first_sentence(e)})") from None
    except (OSError, ValueError, SyntaxError, EOFError, KeyError, IndexError, TypeError, struct.error, zlib.error):
        return None


ORIENTATION = 0x0112  # the EXIF tag


@contextlib.contextmanager
def _open(path: Path) -> Iterator[Image.Image]:
    """Pillow image of a regular file; its decompression-bomb warning raised as an error (so
    nothing is printed before the one-line refusal)."""
    _check_regular(path)
    # O_NONBLOCK: should the path become a FIFO after the check, opening it does not wait for a writer.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ImageError(_os_reason(e)) from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise ImageError("is not a regular file (a FIFO, socket or device); not read")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fh) as im:
                yield im


def _check_png_chunks(fd: int) -> None:
    """Every chunk's CRC up to IEND, image data included: Pillow checks only the other chunks'
    CRCs and can decode a damaged IDAT to wrong pixels without an error."""
    offset = 8
    while True:
        head = os.pread(fd, 8, offset)
        if len(head) < 8:
            raise ImageError("is a truncated PNG (no IEND chunk)")
        length, kind = struct.unpack(">I4s", head)
        if length > 0x7FFFFFFF:
            raise ImageError(f"is a corrupt PNG (chunk length {length})")
        crc = zlib.crc32(kind)
        done = 0
        while done < length:
            block = os.pread(fd, min(1 << 20, length - done), offset + 8 + done)
            if not block:
                raise ImageError(f"is a truncated PNG (in a {kind.decode('latin-1')!r} chunk)")
            crc = zlib.crc32(block, crc)
            done += len(block)
        stored = os.pread(fd, 4, offset + 8 + length)
        if len(stored) < 4:
            raise ImageError(f"is a truncated PNG (in a {kind.decode('latin-1')!r} chunk)")
        if struct.unpack(">I", stored)[0] != crc & 0xFFFFFFFF:
            raise ImageError(f"is a corrupt PNG (chunk {kind.decode('latin-1')!r} fails its CRC)")
        if kind == b"IEND":
            return
        offset += 12 + length


def _check_regular(path: Path) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise ImageError(_os_reason(e)) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError("is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("is not a regular file (a FIFO, socket or device); not read")


def _os_reason(e: OSError) -> str:
    if e.errno == errno.ENOENT:
        return "does not exist"
    if e.errno == errno.ELOOP:
        return "is a symlink loop"
    if e.errno == errno.EACCES:
        return "cannot be read (permission denied)"
    return f"cannot be read ({e.strerror or e})"


def _deep(im: Image.Image) -> bool:
    """16 bits per channel decoded into an 8-bit mode (Pillow reads 48-bit RGB PNG as RGB)."""
    for tile in getattr(im, "tile", None) or []:
        args = tile[3] if len(tile) > 3 else None
        rawmode = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else None
        if isinstance(rawmode, str) and re.match(r"RGB[A-Za-z]*;(16|48|64)", rawmode):  # not BMP's 5-6-5 "BGR;16"
            return True
    return False


def _depth(im: Image.Image, mode: str) -> str:
    return f"16 bits per channel, {mode}" if _deep(im) else mode


def _first_sentence(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text.split(". ")[0][:200]


def _palette_is_gray(im: Image.Image) -> bool:
    palette = im.getpalette() or []
    rgb = np.asarray(palette, dtype=np.int32).reshape(-1, 3)
    return bool(len(rgb)) and bool(np.all(rgb[:, 0] == rgb[:, 1]) and np.all(rgb[:, 1] == rgb[:, 2]))


def write_png(array: np.ndarray, path: str | Path) -> None:
    """Write to a temporary file beside `path`, then rename: never a half-written output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The PID in the name lets a later run remove it if this process is killed (runtime/stale.py).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.{os.getpid()}-", suffix=TMP_SUFFIX, dir=path.parent)
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
    seen: set[str] = set()
    unique = []
    for p in paths:
        key = os.path.realpath(p)  # Path.resolve raises on a symlink loop; read_image reports it
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique, unmatched
