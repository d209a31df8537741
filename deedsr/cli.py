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
from .runtime.profiles import PROFILES

BACKENDS = ("auto", "ort", "trt", "torch")
MAX_SEED = 2**64 - 1  # numpy's PCG64 seeds are taken as unsigned 64-bit here
MAX_STEPS = 999  # the most the 1000-step training schedule spaces with steps_offset 1
STEPS_HELP = f"DDIM steps, 1..{MAX_STEPS} (default: the model's, 50)."
PRECISIONS = ("auto", "fp32", "fp16")


UNTRAINED_WARNING = ("warning: untrained weights: the output is noise (export a trained checkpoint, "
                     "e.g. deedsr-export --checkpoint deedsr/assets/demo)")


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
        click.option("--steps", type=click.IntRange(1, MAX_STEPS), help=STEPS_HELP),
        click.option("--eta", type=click.FloatRange(0.0, 1.0), help="DDIM eta (default 1.0)."),
        click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True),
        click.option("--noise-guidance-steps",
                     help="Comma-separated step indices to guide (default '0'; 'none' for off)."),
        click.option("--init", "init", type=click.Choice(["noise", "lr"]), help="Initial latent."),
        click.option("--tile", type=int, help="Latent tile side for aggregation sampling."),
        click.option("--tile-overlap", type=int,
                     help="Latent tile overlap (default: the model's; with --tile alone at most half the tile)."),
        click.option("--color-fix", type=click.Choice(COLOR_FIXES), help="Colour fix against the upsampled LR."),
        click.option("--profile", type=click.Choice(PROFILES),
                     help="Sampling profile (default: the model's): paper, or reference-code for weights "
                          "imported from the public implementation."),
    ]):
        f = decorator(f)
    return f


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", "outdir", required=True, type=click.Path(),
              help="Output folder, or NAME.png when there is one input.")
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
            noise_guidance_steps, init, tile, tile_overlap, color_fix, profile, overwrite, memory_limit):
    """Upscale INPUTS (files, folders or globs) x4 into OUTDIR as PNG."""
    targets, failures = _plan_outputs(inputs, Path(outdir))
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
        tile=tile, tile_overlap=tile_overlap, color_fix=color_fix, profile=profile,
    )
    _check_options(upscaler, options)
    _prepare_output(targets)
    if not upscaler.trained:  # after every usage check: an error stays one line
        click.echo(UNTRAINED_WARNING, err=True)
    failures += _upscale_all(upscaler, targets, options, seed, overwrite)
    if failures:
        sys.exit(1)


def _plan_outputs(inputs, output: Path) -> tuple[dict, int]:
    """Every input file (files, folders, globs) with its output file (deedsr/usage.py), and how
    many patterns matched nothing (one `error:` line each); one line and exit 2 before any work
    when nothing is left or the outputs cannot be planned."""
    paths, unmatched = expand_inputs(list(inputs))
    for pattern in unmatched:
        click.echo(f"error: {pattern}: no file matches", err=True)
    if not paths:
        raise UsageError("no input images")
    from .runtime.memory import env_memory_limit
    from .usage import OutputError, plan_outputs

    try:
        env_memory_limit()
        return plan_outputs(paths, output), len(unmatched)
    except (OutputError, ValueError) as e:
        raise UsageError(str(e)) from None


def _prepare_output(targets: dict) -> None:
    """The output folder exists and takes a file, or one line and exit 2; done after every other
    check so that a usage error leaves no empty folder behind."""
    from .runtime.stale import remove_stale_pngs
    from .usage import OutputError, prepare_folder

    folder = next(iter(targets.values())).parent
    try:
        prepare_folder(folder)
    except OutputError as e:
        raise UsageError(str(e)) from None
    remove_stale_pngs(folder)  # temporaries of killed runs


def _check_options(upscaler, options: dict) -> None:
    """Refuse options that cannot work once, before any image; load every graph now so that a
    graph that does not match manifest.json is refused before the first image too."""
    from .runtime.errors import EngineError
    from .runtime.validate import check_noise_guidance, default_overlap

    try:
        if options["tile"] is not None and options["tile_overlap"] is None:
            options["tile_overlap"] = default_overlap(options["tile"], upscaler.options().tile_overlap)
        opts = upscaler.options(**options)
        check_noise_guidance(opts.steps, opts.noise_guidance_steps)
        if not 0 <= opts.tile_overlap < opts.tile:
            raise ValueError(f"tile overlap ({opts.tile_overlap}) must be in 0..{opts.tile - 1} for tile {opts.tile}")
        upscaler.preload()
    except (ValueError, EngineError) as e:
        raise UsageError(str(e)) from None


def _upscale_all(upscaler, targets: dict, options: dict, seed: int, overwrite: bool) -> int:
    from tqdm import tqdm

    steps = options.get("steps") or upscaler.default_steps

    def upscale_one(path: Path, image):
        with tqdm(total=steps, desc=path.name, unit="step", leave=False, file=sys.stderr) as bar:
            return upscaler.upscale(image, seed=seed, callback=lambda info: bar.update(1), **options)

    def check(width: int, height: int) -> None:  # shape ranges and memory, before decoding
        upscaler.check(height, width, options.get("tile"), options.get("profile"))

    return _for_each_image(targets, overwrite, upscale_one, check)


def _for_each_image(targets: dict, overwrite: bool, upscale_one, check=None, fatal=()) -> int:
    """Read each input, `upscale_one(path, image)`, write its target PNG atomically. A bad image
    is one line on stderr and the rest go on; returns how many failed. `check(width, height)`
    refuses an image from its header, before decoding; `fatal` errors stop the batch."""
    from tqdm import tqdm

    from .runtime.errors import BackendError, EngineError

    failures = 0
    for path, target in tqdm(targets.items(), desc="images", unit="img", disable=len(targets) < 2, file=sys.stderr):
        try:
            if target.exists() and not overwrite:
                raise ImageError(f"output {target} exists; pass --overwrite to replace it")
            size = image_size(path)
            if size is not None and check is not None:  # read_image says why when size is None
                check(*size)
            image = read_image(path)
            result = upscale_one(path, image)
            try:
                write_png(result, target)
            except OSError as e:  # the folder went away or filled up during the batch
                raise ImageError(f"cannot write {target} ({e.strerror or e})") from None
            tqdm.write(str(target))
        except (EngineError, *fatal) as e:
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
@click.option("--steps", type=click.IntRange(1, MAX_STEPS), help=STEPS_HELP)
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True)
def demo(outdir, backend, threads, steps, seed):
    """Build the demo engines (once, into the cache) and upscale the bundled astronaut photo.

    Writes OUTDIR/astronaut_x4.png and OUTDIR/astronaut_compare.png (bicubic | DeeDSR)."""
    from tqdm import tqdm

    from .runtime import demo as demo_mod
    from .runtime.errors import EngineError
    from .runtime.upscaler import Upscaler
    from .usage import OutputError, prepare_folder

    try:
        engines = demo_mod.build_demo_engine_dir(echo=lambda msg: click.echo(msg, err=True))
        upscaler = Upscaler.from_engine_dir(engines, backend=backend, threads=threads)
        prepare_folder(Path(outdir))
    except (EngineError, OutputError) as e:
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


@main.command()
@click.option("-o", "--output", "--out", "outdir", required=True, type=click.Path(),
              help="Folder for libdeedsr.so, deedsr.h, deedsr.pc.")
@click.option("--python", "python", type=click.Path(),
              help="Interpreter the library starts (default: this one); same Python version, e.g. a venv's.")
@click.option("--verbose", is_flag=True, help="Show the compiler's commands.")
def capi(outdir, python, verbose):
    """Build libdeedsr, the runtime behind a C ABI (needs deedsr[capi], a C compiler, Python headers)."""
    import os
    import time

    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {outdir}: exists and is not a folder")
    if python is not None and not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise UsageError(f"--python {python}: not an executable file")
    from .runtime.capi.build import BuildError, build_library

    started = time.perf_counter()
    try:
        library = build_library(out, python=python, verbose=verbose)
    except BuildError as e:
        raise click.ClickException(str(e)) from None
    for path in (library, library.with_name("deedsr.h"), library.with_name("deedsr.pc")):
        click.echo(str(path))
    click.echo(f"built in {time.perf_counter() - started:.1f} s", err=True)


@main.command()
@click.option("--engines", type=click.Path(), help="Engine directory written by deedsr-export (default: the demo's).")
@click.option("--backend", type=click.Choice(BACKENDS[:3]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Graph precision (auto: fp16 on a GPU, fp32 on the CPU).")
@click.option("--threads", type=click.IntRange(1, 1024), help="Compute threads per instance (default: one per core).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the HTTP, gRPC and metrics listeners bind (0.0.0.0: every interface).")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--max-batch", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Most requests (of any sizes) Triton batches into one call.")
@click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Model instances (one Upscaler each), run concurrently.")
@click.option("--queue-delay-us", type=click.IntRange(0, 10_000_000), default=0, show_default=True,
              help="How long Triton holds a request waiting for others to batch with (every lone request pays it).")
@click.option("--drain-timeout", type=click.IntRange(0, 28), default=25, show_default=True,
              help="Seconds SIGTERM waits for open connections to close and requests in flight to finish.")
def serve(engines, backend, precision, threads, host, http_port, grpc_port, metrics_port, max_batch, instances,
          queue_delay_us, drain_timeout):
    """Serve the engines on Triton Inference Server (model 'deedsr'; KServe v2 HTTP/gRPC,
    Prometheus metrics) until SIGTERM or Ctrl-C, which finish the requests in flight."""
    from .runtime.serve import INSTALL_HINT, ServeConfig, Server

    try:
        import pytriton.triton  # noqa: F401
    except ImportError as e:
        raise UsageError(f"deedsr serve needs PyTriton: {INSTALL_HINT} ({e})") from None
    ports = (http_port, grpc_port, metrics_port)
    if len(set(ports)) != len(ports):
        raise UsageError(f"--http-port, --grpc-port and --metrics-port must differ, got {ports}")
    upscalers = [open_runtime(backend, engines, precision, threads) for _ in range(instances)]
    config = ServeConfig(host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                         max_batch=max_batch, queue_delay_us=queue_delay_us, exit_timeout_s=drain_timeout)
    server = Server(upscalers, config)
    try:
        server.start()
    except Exception as e:  # a busy port, a server that never got ready: one line, not PyTriton's traceback
        raise click.ClickException(f"Triton did not start: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
    click.echo(f"serving model 'deedsr' ({upscalers[0].describe()}; {instances} instance(s), max batch {max_batch}) "
               f"on {server.url}, grpc port {grpc_port}, metrics http://{host}:{metrics_port}/metrics; "
               "SIGTERM or Ctrl-C stops", err=True)
    server.wait_for_signal()
    click.echo("stopped", err=True)


@main.command()
@click.argument("url")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", "outdir", required=True, type=click.Path(),
              help="Output folder (or, for one input, a .png file).")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True)
@click.option("--steps", type=click.IntRange(1, 1000), help="DDIM steps (default: the server's engines', 50).")
@click.option("--timeout", type=click.FloatRange(1, None), default=600, show_default=True,
              help="Seconds one image may take on the server, queueing included.")
@click.option("--connect-timeout", type=click.FloatRange(0.1, None), default=30, show_default=True,
              help="Seconds to wait for the server and its model to be ready.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def remote(url, inputs, outdir, seed, steps, timeout, connect_timeout, overwrite):
    """Upscale INPUTS (files, folders or globs) x4 on a `deedsr serve` server at URL
    (http://HOST:8000 or grpc://HOST:8001) into OUTDIR as PNG."""
    from .runtime.remote import RemoteUpscaler, Unreachable
    from .runtime.serve import INSTALL_HINT

    try:
        import pytriton.client  # noqa: F401
    except ImportError as e:
        raise UsageError(f"deedsr remote needs the Triton client: {INSTALL_HINT} ({e})") from None
    targets, failures = _plan_outputs(inputs, Path(outdir))
    try:
        client = RemoteUpscaler(url, timeout_s=timeout, init_timeout_s=connect_timeout)
    except Unreachable as e:
        raise UsageError(str(e)) from None
    with client:
        _prepare_output(targets)
        failures += _for_each_image(targets, overwrite,
                                    lambda path, image: client.upscale(image, seed=seed, steps=steps),
                                    fatal=(Unreachable,))
    if failures:
        sys.exit(1)


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
