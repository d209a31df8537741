"""`deedsr demo`: the embedded default model as an engine directory in a cache folder, built
once by running `deedsr-export` in a subprocess (so the runtime's process never imports torch).

The model is the checkpoint folder deedsr/assets/demo/ when the installation ships one
(config.json + safetensors), else the untrained `tiny` preset (seeded, so always the same).
The cache folder is $DEEDSR_CACHE (default ~/.cache/deedsr) / demo-<hash>, the hash covering
the model files, the package version and the manifest schema version.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import __version__
from .contract import MANIFEST, SCHEMA_VERSION
from .errors import EngineError
from .memory import cache_root

log = logging.getLogger(__name__)

ASSET = Path(__file__).parent / "assets" / "astronaut_lr.png"
DEMO_PRESET = "tiny"


def demo_checkpoint() -> Path | None:
    """deedsr/assets/demo/ when it holds a checkpoint (found without importing deedsr)."""
    try:
        spec = importlib.util.find_spec("deedsr")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "assets" / "demo"
        if (folder / "config.json").is_file():
            return folder
    return None


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("deedsr")
    except Exception:  # not installed as a distribution
        return __version__


def demo_engine_dir() -> Path:
    """Where the demo engine directory lives (whether or not it is built)."""
    digest = hashlib.sha256(f"{_package_version()}|schema{SCHEMA_VERSION}|".encode())
    checkpoint = demo_checkpoint()
    if checkpoint is None:
        digest.update(f"preset:{DEMO_PRESET}".encode())
    else:
        for f in sorted(checkpoint.iterdir()):
            if f.is_file():
                st = f.stat()
                digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}|".encode())
    return cache_root() / f"demo-{digest.hexdigest()[:12]}"


def built_demo_engine_dir() -> Path | None:
    path = demo_engine_dir()
    return path if (path / MANIFEST).is_file() else None


def export_command(out: Path) -> list[str]:
    checkpoint = demo_checkpoint()
    model = ["--checkpoint", str(checkpoint)] if checkpoint else ["--preset", DEMO_PRESET]
    return [sys.executable, "-c", "from deedsr.export.cli import main; main(prog_name='deedsr-export')",
            *model, "--out", str(out), "--precision", "fp32"]


def build_demo_engine_dir(echo=print) -> Path:
    """The demo engine directory, exported now if it is not in the cache yet."""
    out = demo_engine_dir()
    if (out / MANIFEST).is_file():
        return out
    if importlib.util.find_spec("deedsr.export") is None or importlib.util.find_spec("torch") is None:
        raise EngineError("building the demo engines needs the exporter: pip install 'deedsr[export]' "
                          "(or pass --engines DIR)")
    out.parent.mkdir(parents=True, exist_ok=True)
    echo(f"building the demo engine directory (once) in {out} ...")
    cmd = export_command(out)
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (out / MANIFEST).is_file():
        lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
        raise EngineError(f"deedsr-export failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}")
    return out


def bicubic_x4(image: np.ndarray, scale: int = 4) -> np.ndarray:
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w * scale, h * scale), Image.BICUBIC))


def side_by_side(left: np.ndarray, right: np.ndarray, labels=("bicubic", "DeeDSR"), gap: int = 8) -> np.ndarray:
    """Two equal-size uint8 images next to each other on white, each with a caption above."""
    h, w = left.shape[:2]
    header = 22
    canvas = Image.new("RGB", (2 * w + gap, h + header), "white")
    canvas.paste(Image.fromarray(left), (0, header))
    canvas.paste(Image.fromarray(right), (w + gap, header))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(labels):
        draw.text((i * (w + gap) + 4, 5), label, fill="black")
    return np.asarray(canvas)
