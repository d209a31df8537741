"""`deedsr-export`: a DeeDSR checkpoint (or an untrained preset) -> an engine directory."""
from __future__ import annotations

import sys
import time

import click


class _ExportCommand(click.Command):
    """`deedsr-export build-engines DIR ...` is the engines stage's command (engines/cli.py);
    anything else is the export below."""

    def main(self, args=None, prog_name=None, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        if argv and argv[0] == "build-engines":
            from deedsr.engines.cli import build_engines

            name = f"{prog_name or 'deedsr-export'} build-engines"
            return build_engines.main(argv[1:], prog_name=name, **extra)
        return super().main(argv, prog_name=prog_name, **extra)

    def format_epilog(self, ctx, formatter):
        super().format_epilog(ctx, formatter)
        formatter.write_paragraph()
        formatter.write_text("TensorRT plans for an engine directory, on the machine that runs them: "
                             "deedsr-export build-engines DIR [--help]")


@click.command(cls=_ExportCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", type=click.Path(), help="DeeDSR checkpoint folder.")
@click.option("--preset", type=click.Choice(["tiny", "sd21-base"]), help="Untrained preset instead of a checkpoint.")
@click.option("-o", "--output", "--out", "out", required=True, type=click.Path(), help="Engine directory to write.")
@click.option("--trt", "trt_target", type=click.Choice(["8.5", "8.6", "10", "11"]),
              help="The TensorRT the plans will be built with (JetPack 5.1: 8.5, JetPack 6.0: 8.6, JetPack 6.1/6.2: "
                   "10): picks the opset and the graph precisions its build mode needs.")
@click.option("--precision", default=None, help="Comma-separated: fp32, fp16 (default fp32,fp16, or --trt's).")
@click.option("--opset", default=None, type=int, help="ONNX opset, 14..17 (default 17, or --trt's: 16 for 8.5).")
@click.option("--tile", type=int, help="Latent tile side the per-step graphs are built for (default: the model's).")
@click.option("--min-size", default=16, show_default=True, type=int, help="Smallest LR side in pixels.")
@click.option("--max-size", default=2048, show_default=True, type=int,
              help="Largest LR side in pixels (the learner sees the whole LR; the VAE and UNet see tiles).")
@click.option("--max-batch", default=4, show_default=True, type=int, help="Most tiles per graph call.")
@click.option("--fuse-denoiser", is_flag=True, help="Also write adapter+UNet as one 'denoiser' graph.")
@click.option("--vae-tile", type=int,
              help="Largest tiled-VAE core in latent pixels (x8 image pixels; default 64); the runtime may use "
                   "smaller ones to fit memory.")
@click.option("--vae-tile-pad", type=int, help="Context around each VAE tile core, latent pixels (default 8).")
@click.option("--measure-memory/--no-measure-memory", default=True, show_default=True,
              help="Measure each graph's working memory (fresh processes) for the runtime's memory model.")
@click.option("--force", is_flag=True, help="Replace an existing engine directory.")
@click.option("--build-engines", "build_engines", is_flag=True,
              help="Then build TensorRT plans into OUT/trt (default settings; see build-engines --help).")
def main(checkpoint, preset, out, trt_target, precision, opset, tile, min_size, max_size, max_batch, fuse_denoiser,
         vae_tile, vae_tile_pad, measure_memory, force, build_engines=False):
    """Trace the learner, VAE, adapter and modulated UNet into ONNX graphs with a manifest."""
    if bool(checkpoint) == bool(preset):
        raise click.UsageError("give exactly one of --checkpoint DIR or --preset NAME")
    precisions = tuple(p.strip() for p in precision.split(",") if p.strip()) if precision else None
    if trt_target:
        from .trt_ops import target_settings

        try:
            opset, precisions = target_settings(trt_target, opset, precisions)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    opset = 17 if opset is None else opset
    precisions = precisions or ("fp32", "fp16")
    from deedsr.runtime.contract import DENOISER, OPTIONAL_GRAPHS, REQUIRED_GRAPHS
    from tqdm import tqdm

    from deedsr.checkpoints import CheckpointError

    from .engine_dir import ExportError, export_engine_dir
    from .vae_tiling import VaeTiling

    start = time.perf_counter()
    try:
        names = [*REQUIRED_GRAPHS, *(g for g in OPTIONAL_GRAPHS if fuse_denoiser or g != DENOISER)]
        with tqdm(total=len(names), desc="export", unit="graph", file=sys.stderr) as bar:
            def progress(name):
                bar.set_postfix_str(name)
                if not name.startswith("memory"):
                    bar.update(1)

            path = export_engine_dir(
                lambda: _load(checkpoint, preset), out, precisions=precisions, opset=opset, tile=tile, min_size=min_size,
                max_size=max_size, max_batch=max_batch, fuse_denoiser=fuse_denoiser, force=force,
                vae_tiling=VaeTiling(**{k: v for k, v in (("core", vae_tile), ("pad", vae_tile_pad)) if v is not None}),
                measure_memory=measure_memory,
                progress=progress,
            )
    except (CheckpointError, ExportError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        click.echo(f"error: cannot write {out}: {e.strerror or e}", err=True)
        sys.exit(1)
    click.echo(f"{path} ({time.perf_counter() - start:.1f} s)")
    if build_engines:
        from deedsr.engines.cli import run_build

        code = run_build(path, suffix=f" (the ONNX graphs in {path} are complete: build the plans later with "
                                      f"deedsr-export build-engines {path})")
        if code:
            sys.exit(code)


def _load(checkpoint, preset):
    import torch

    from deedsr.config import preset as preset_config
    from deedsr.models import DeeDSR, load_checkpoint

    if checkpoint:
        return load_checkpoint(checkpoint)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same untrained weights as `deedsr upscale --backend torch --preset`
        return DeeDSR(preset_config(preset))


if __name__ == "__main__":
    main()
