"""`deedsr-export`: a DeeDSR checkpoint (or an untrained preset) -> an engine directory."""
from __future__ import annotations

import sys
import time

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", type=click.Path(), help="DeeDSR checkpoint folder.")
@click.option("--preset", type=click.Choice(["tiny", "sd21-base"]), help="Untrained preset instead of a checkpoint.")
@click.option("--out", required=True, type=click.Path(), help="Engine directory to write.")
@click.option("--precision", default="fp32,fp16", show_default=True, help="Comma-separated: fp32, fp16.")
@click.option("--opset", default=17, show_default=True, type=int, help="ONNX opset (14..17; TensorRT 8.5 parses <= 17).")
@click.option("--tile", type=int, help="Latent tile side the per-step graphs are built for (default: the model's).")
@click.option("--min-size", default=16, show_default=True, type=int, help="Smallest LR side in pixels.")
@click.option("--max-size", default=512, show_default=True, type=int, help="Largest LR side in pixels.")
@click.option("--max-batch", default=4, show_default=True, type=int, help="Most tiles per graph call.")
@click.option("--fuse-denoiser", is_flag=True, help="Also write adapter+UNet as one 'denoiser' graph.")
@click.option("--force", is_flag=True, help="Replace an existing engine directory.")
def main(checkpoint, preset, out, precision, opset, tile, min_size, max_size, max_batch, fuse_denoiser, force):
    """Trace the learner, VAE, adapter and modulated UNet into ONNX graphs with a manifest."""
    if bool(checkpoint) == bool(preset):
        raise click.UsageError("give exactly one of --checkpoint DIR or --preset NAME")
    from tqdm import tqdm

    from deedsr.checkpoints import CheckpointError

    from .engine_dir import ExportError, export_engine_dir

    precisions = tuple(p.strip() for p in precision.split(",") if p.strip())
    start = time.perf_counter()
    try:
        model = _load(checkpoint, preset)
        names = ["degradation_learner", "vae_encoder", "adapter", "unet", "vae_decoder"]
        names += ["denoiser"] if fuse_denoiser else []
        with tqdm(total=len(names), desc="export", unit="graph", file=sys.stderr) as bar:
            def progress(name):
                bar.set_postfix_str(name)
                bar.update(1)

            path = export_engine_dir(
                model, out, precisions=precisions, opset=opset, tile=tile, min_size=min_size,
                max_size=max_size, max_batch=max_batch, fuse_denoiser=fuse_denoiser, force=force,
                progress=progress,
            )
    except (CheckpointError, ExportError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        click.echo(f"error: cannot write {out}: {e.strerror or e}", err=True)
        sys.exit(1)
    click.echo(f"{path} ({time.perf_counter() - start:.1f} s)")


def _load(checkpoint, preset):
    import torch

    from deedsr.checkpoints import load_checkpoint
    from deedsr.config import preset as preset_config
    from deedsr.models import DeeDSR

    if checkpoint:
        return load_checkpoint(checkpoint)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same untrained weights as `deedsr upscale --backend torch --preset`
        return DeeDSR(preset_config(preset))


if __name__ == "__main__":
    main()
