"""`deedsr` command line: upscale images with a chosen backend, build and run the demo, train.

It sits above the four stages and imports downward. The runtime backends (ort, trt) read an
engine directory and never import torch; the torch backend (the PyTorch reference, for
comparison) and the training commands are imported only when asked for.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .runtime.imageops import COLOR_FIXES
from .runtime.images import ImageError, expand_inputs, image_size, read_image, write_png

BACKENDS = ("auto", "ort", "trt", "torch")
PRECISIONS = ("auto", "fp32", "fp16")


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


def open_torch(checkpoint: str | None, preset: str | None, threads: int | None):
    # The PyTorch reference is an optional backend for comparison; it is loaded only here,
    # so the runtime itself stays free of torch.
    try:
        import torch

        from .upscaler import TorchUpscaler
    except ImportError as e:
        raise UsageError(f"--backend torch needs the reference model: pip install 'deedsr[torch]' ({e})")
    if threads:
        torch.set_num_threads(threads)
    try:
        if not checkpoint and not preset:
            from .runtime.demo import demo_checkpoint

            checkpoint = demo_checkpoint()  # the embedded default: the trained tiny demo weights
        if checkpoint:
            return TorchUpscaler.from_checkpoint(checkpoint)
        return TorchUpscaler.from_preset(preset or "tiny")
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None


def open_runtime(backend: str, engines: str | None, precision: str, threads: int | None,
                 memory_limit: int | None = None):
    from .runtime.demo import built_demo_engine_dir
    from .runtime.errors import EngineError
    from .runtime.upscaler import Upscaler

    if engines is None:
        demo = built_demo_engine_dir()
        if demo is None:
            raise UsageError("no engine directory: pass --engines DIR (written by deedsr-export), run "
                             "`deedsr demo` once to build the demo engines, or use --backend torch")
        engines = str(demo)
    try:
        return Upscaler.from_engine_dir(engines, backend=backend, precision=precision, threads=threads,
                                        memory_limit=memory_limit)
    except EngineError as e:
        raise UsageError(str(e)) from None


def open_backend(backend: str, engines: str | None, checkpoint: str | None, preset: str | None,
                 precision: str = "auto", threads: int | None = None, memory_limit: int | None = None):
    if backend == "auto" and engines is None and (checkpoint or preset):
        backend = "torch"  # a checkpoint or preset names the reference model
    if backend == "torch":
        if engines:
            raise UsageError("--engines is read by the ort/trt backends; --backend torch takes --checkpoint or --preset")
        if precision != "auto":
            raise UsageError("--precision applies to the ort/trt backends")
        if memory_limit is not None:
            raise UsageError("--memory-limit applies to the ort/trt backends")
        return open_torch(checkpoint, preset, threads)
    if checkpoint or preset:
        raise UsageError(f"--checkpoint/--preset choose the torch backend's model; the {backend} backend reads "
                         "--engines DIR (deedsr-export turns a checkpoint into one)")
    return open_runtime(backend, engines, precision, threads, memory_limit)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what the runtime does.")
def main(verbose: bool) -> None:
    """DeeDSR x4 super-resolution."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


def _sampling_options(f):
    for decorator in reversed([
        click.option("--steps", type=click.IntRange(1, 1000), help="DDIM steps (default: the model's, 50)."),
        click.option("--eta", type=click.FloatRange(0.0, 1.0), help="DDIM eta (default 1.0)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--noise-guidance-steps",
                     help="Comma-separated step indices to guide (default '0'; 'none' for off)."),
        click.option("--init", "init", type=click.Choice(["noise", "lr"]), help="Initial latent."),
        click.option("--tile", type=int, help="Latent tile side for aggregation sampling."),
        click.option("--tile-overlap", type=int, help="Latent tile overlap."),
        click.option("--color-fix", type=click.Choice(COLOR_FIXES), help="Colour fix against the upsampled LR."),
    ]):
        f = decorator(f)
    return f


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--engines", type=click.Path(), help="Engine directory written by deedsr-export (default: the demo's).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Graph precision (auto: fp16 on a GPU, fp32 on the CPU).")
@click.option("--threads", type=click.IntRange(1, 1024), help="Compute threads (default: one per core).")
@click.option("--checkpoint", type=click.Path(), help="DeeDSR checkpoint folder (torch backend).")
@click.option("--preset", type=click.Choice(["tiny", "sd21-base"]), help="Untrained preset (torch backend).")
@_sampling_options
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--memory-limit", help="Most memory an image may use, e.g. 6G (default: $DEEDSR_MEMORY_LIMIT, else "
                                     "the available memory); VAE tiles are chosen to fit it.")
def upscale(inputs, outdir, engines, backend, precision, threads, checkpoint, preset, steps, eta, seed,
            noise_guidance_steps, init, tile, tile_overlap, color_fix, overwrite, memory_limit):
    """Upscale INPUTS (files, folders or globs) x4 into OUTDIR as PNG."""
    paths, unmatched = expand_inputs(list(inputs))
    failures = 0
    for pattern in unmatched:
        click.echo(f"error: {pattern}: no file matches", err=True)
        failures += 1
    if not paths:
        raise UsageError("no input images")
    limit = None
    if memory_limit is not None:
        from .runtime.memory import parse_bytes

        try:
            limit = parse_bytes(memory_limit)
        except ValueError as e:
            raise UsageError(f"--memory-limit: {e}") from None
    upscaler = open_backend(backend, engines, checkpoint, preset, precision, threads, limit)
    options = dict(
        steps=steps, eta=eta, noise_guidance_steps=_steps_list(noise_guidance_steps), init=init,
        tile=tile, tile_overlap=tile_overlap, color_fix=color_fix,
    )
    try:  # refuse bad options once, before any image
        upscaler.options(**options)
    except ValueError as e:
        raise UsageError(str(e)) from None
    failures += _upscale_all(upscaler, paths, Path(outdir), options, seed, overwrite)
    if failures:
        sys.exit(1)


def _upscale_all(upscaler, paths, outdir: Path, options: dict, seed: int, overwrite: bool) -> int:
    from tqdm import tqdm

    from .runtime.errors import BackendError, EngineError

    failures = 0
    steps = options.get("steps") or upscaler.default_steps
    for path in tqdm(paths, desc="images", unit="img", disable=len(paths) < 2, file=sys.stderr):
        target = outdir / f"{path.stem}.png"
        try:
            if target.exists() and not overwrite:
                raise ImageError(f"output {target} exists; pass --overwrite to replace it")
            size = image_size(path)
            if size is not None:  # shape ranges and memory, before decoding (read_image says why not)
                upscaler.check(size[1], size[0], options.get("tile"))
            image = read_image(path)
            with tqdm(total=steps, desc=path.name, unit="step", leave=False, file=sys.stderr) as bar:
                result = upscaler.upscale(image, seed=seed, callback=lambda info: bar.update(1), **options)
            write_png(result, target)
            tqdm.write(str(target))
        except EngineError as e:
            raise UsageError(str(e)) from None
        except (ImageError, ValueError, MemoryError, BackendError) as e:
            tqdm.write(f"error: {path}: {e}", file=sys.stderr)
            failures += 1
    return failures


@main.command()
@click.option("-o", "--output", "outdir", default="deedsr-demo", show_default=True,
              type=click.Path(file_okay=False), help="Output folder.")
@click.option("--backend", type=click.Choice(BACKENDS[:3]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(1, 1024), help="Compute threads (default: one per core).")
@click.option("--steps", type=click.IntRange(1, 1000), help="DDIM steps (default: the model's, 50).")
@click.option("--seed", type=int, default=0, show_default=True)
def demo(outdir, backend, threads, steps, seed):
    """Build the demo engines (once, into the cache) and upscale the bundled astronaut photo.

    Writes OUTDIR/astronaut_x4.png and OUTDIR/astronaut_compare.png (bicubic | DeeDSR)."""
    from tqdm import tqdm

    from .runtime import demo as demo_mod
    from .runtime.errors import EngineError
    from .runtime.upscaler import Upscaler

    try:
        engines = demo_mod.build_demo_engine_dir(echo=lambda msg: click.echo(msg, err=True))
        upscaler = Upscaler.from_engine_dir(engines, backend=backend, threads=threads)
    except EngineError as e:
        raise UsageError(str(e)) from None
    image = read_image(demo_mod.ASSET)
    total = steps or upscaler.default_steps
    with tqdm(total=total, desc=demo_mod.ASSET.name, unit="step", leave=False, file=sys.stderr) as bar:
        result = upscaler.upscale(image, seed=seed, steps=steps, callback=lambda info: bar.update(1))
    outdir = Path(outdir)
    write_png(result, outdir / "astronaut_x4.png")
    label = "DeeDSR" if demo_mod.demo_checkpoint() else "DeeDSR (untrained tiny preset)"
    write_png(demo_mod.side_by_side(demo_mod.bicubic_x4(image, upscaler.scale), result, ("bicubic", label)),
              outdir / "astronaut_compare.png")
    click.echo(str(outdir / "astronaut_x4.png"))
    click.echo(str(outdir / "astronaut_compare.png"))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train(args):
    """Train DeeDSR: vae, stage1, stage2, demo, evaluate (needs deedsr[torch]).
    `deedsr train --help` lists them."""
    # Loaded only here: the runtime itself never imports the training code or torch.
    try:
        from .train.cli import train as train_commands
    except ImportError as e:
        raise UsageError(f"deedsr train needs the reference model: pip install 'deedsr[torch]' ({e})")
    train_commands.main(args=list(args), prog_name="deedsr train")


if __name__ == "__main__":
    main()
