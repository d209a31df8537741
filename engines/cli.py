"""`deedsr-export build-engines ENGINE_DIR`: TensorRT plans for an engine directory, built on the
machine (TensorRT version + GPU) that will run them."""
from __future__ import annotations

import sys

import click

from .modes import MODES


def run_build(engine_dir, suffix: str = "", **options) -> int:
    """Build with BuildOptions(**options); print one-line errors (ending in `suffix`); return the
    exit code."""
    from .build import BuildOptions, build_plans, parse_bytes
    from .errors import BuildError

    try:
        if "workspace" in options:
            options["workspace"] = parse_bytes(options["workspace"])
        build_plans(engine_dir, BuildOptions(**options), echo=lambda msg: click.echo(msg, err=True))
    except BuildError as e:
        click.echo(f"error: {e}{suffix}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("interrupted: plans finished so far are recorded, no partial plan was left", err=True)
        return 130
    except OSError as e:
        click.echo(f"error: cannot write into {engine_dir}: {e.strerror or e}{suffix}", err=True)
        return 1
    return 0


@click.command("build-engines", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("engine_dir", type=click.Path())
@click.option("--graphs", help="Comma-separated graphs to build (default: every graph of ENGINE_DIR).")
@click.option("--mode", type=click.Choice(MODES), default="auto", show_default=True,
              help="auto: strongly typed fp16 graphs on TensorRT >= 10, the FP16 builder flag on the fp32 "
                   "graphs on 8.5-9.x; fp32: fp32 plans (for checks).")
@click.option("--static", is_flag=True,
              help="Fix the per-step plans' tile to the sampler's tile (fixed shapes: CUDA graphs).")
@click.option("--max-batch", type=click.IntRange(1, None), help="Most tiles per per-step call (default: the export's).")
@click.option("--opt-level", type=click.IntRange(0, 5),
              help="Builder optimisation level (TensorRT >= 8.6; default TensorRT's, 3).")
@click.option("--workspace", help="Workspace memory pool limit, e.g. 4G (default: TensorRT's).")
@click.option("--no-timing-cache", is_flag=True, help="Neither read nor write trt/timing-*.cache.")
@click.option("--no-fp32-islands", is_flag=True,
              help="FP16-flag mode: let TensorRT choose every layer's precision (no fp32 pinning).")
@click.option("--force", is_flag=True, help="Rebuild plans that are up to date.")
@click.option("-v", "--verbose", is_flag=True, help="Show polygraphy's and TensorRT's log.")
def build_engines(engine_dir, graphs, mode, static, max_batch, opt_level, workspace, no_timing_cache,
                  no_fp32_islands, force, verbose):
    """Build TensorRT plans for ENGINE_DIR (written by deedsr-export) into ENGINE_DIR/trt/ and
    record them in its manifest.json. Plans run only with this TensorRT version on this GPU."""
    names = tuple(g.strip() for g in graphs.split(",") if g.strip()) if graphs else None
    sys.exit(run_build(engine_dir, graphs=names, mode=mode, static=static, max_batch=max_batch,
                       opt_level=opt_level, workspace=workspace, timing_cache=not no_timing_cache,
                       fp32_islands=not no_fp32_islands, force=force, verbose=verbose))
