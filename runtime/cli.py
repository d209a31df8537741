"""`deedsr` command line: upscale images with a chosen backend."""
from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import click

from .images import ImageError, expand_inputs, read_image, write_png

BACKENDS = ("auto", "ort", "trt", "torch")
COLOR_FIXES = ("none", "adain", "wavelet")


class UsageError(click.ClickException):
    """A user mistake: printed as one line, exit code 2."""

    exit_code = 2


def _steps_list(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated step indices, got '{text}'") from None


def open_backend(backend: str, engines: str | None, checkpoint: str | None, preset: str | None):
    if backend == "torch":
        # The PyTorch reference is an optional backend for comparison; it is loaded only here,
        # so the runtime itself stays free of torch.
        try:
            reference = importlib.import_module("deedsr.upscaler")
        except ImportError as e:
            raise UsageError(f"--backend torch needs the reference model: pip install 'deedsr[torch]' ({e})")
        try:
            if checkpoint:
                return reference.TorchUpscaler.from_checkpoint(checkpoint)
            return reference.TorchUpscaler.from_preset(preset or "tiny")
        except (OSError, ValueError) as e:
            raise UsageError(str(e)) from None
    raise UsageError(f"backend '{backend}' is not available in this build; use --backend torch")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what the runtime does.")
def main(verbose: bool) -> None:
    """DeeDSR x4 super-resolution."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--engines", type=click.Path(), help="Engine directory written by deedsr-export.")
@click.option("--checkpoint", type=click.Path(), help="DeeDSR checkpoint folder (torch backend).")
@click.option("--preset", type=click.Choice(["tiny", "sd21-base"]), help="Untrained preset (torch backend).")
@click.option("--steps", type=click.IntRange(1, 1000), help="DDIM steps (default: the model's, 50).")
@click.option("--eta", type=click.FloatRange(0.0, 1.0), help="DDIM eta (default 1.0).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--noise-guidance-steps", help="Comma-separated step indices to guide (default '0'; 'none' for off).")
@click.option("--init", "init", type=click.Choice(["noise", "lr"]), help="Initial latent.")
@click.option("--tile", type=int, help="Latent tile side for aggregation sampling.")
@click.option("--tile-overlap", type=int, help="Latent tile overlap.")
@click.option("--color-fix", type=click.Choice(COLOR_FIXES), help="Colour fix against the upsampled LR.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def upscale(inputs, outdir, backend, engines, checkpoint, preset, steps, eta, seed, noise_guidance_steps,
            init, tile, tile_overlap, color_fix, overwrite):
    """Upscale INPUTS (files, folders or globs) x4 into OUTDIR as PNG."""
    from tqdm import tqdm

    paths, unmatched = expand_inputs(list(inputs))
    failures = 0
    for pattern in unmatched:
        click.echo(f"error: {pattern}: no file matches", err=True)
        failures += 1
    if not paths:
        raise UsageError("no input images")
    if backend == "auto":
        backend = "torch"
    upscaler = open_backend(backend, engines, checkpoint, preset)
    options = dict(
        steps=steps, eta=eta, noise_guidance_steps=_steps_list(noise_guidance_steps), init=init,
        tile=tile, tile_overlap=tile_overlap, color_fix=color_fix,
    )
    outdir = Path(outdir)
    for path in tqdm(paths, desc="images", unit="img", disable=len(paths) < 2, file=sys.stderr):
        target = outdir / f"{path.stem}.png"
        try:
            if target.exists() and not overwrite:
                raise ImageError(f"output {target} exists; pass --overwrite to replace it")
            image = read_image(path)
            with tqdm(total=steps or upscaler.default_steps, desc=path.name, unit="step", leave=False,
                      file=sys.stderr) as bar:
                result = upscaler.upscale(image, seed=seed, callback=lambda info: bar.update(1), **options)
            write_png(result, target)
            tqdm.write(str(target))
        except (ImageError, ValueError, MemoryError) as e:
            tqdm.write(f"error: {path}: {e}", file=sys.stderr)
            failures += 1
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
