"""`deedsr train ...` (also `python -m deedsr.train ...`).

    deedsr train vae    --config FILE [--resume [CHECKPOINT]]
    deedsr train stage1 --config FILE [--resume [CHECKPOINT]]
    deedsr train stage2 --config FILE [--resume [CHECKPOINT]]
    deedsr train demo   [--config configs/demo-lownoise.toml] [--out deedsr/assets/demo] [--restart]
    deedsr train evaluate CHECKPOINT [--photos astronaut,chelsea] [--level medium --level bicubic] [--steps 50]

Many GPUs: `torchrun --nproc_per_node N -m deedsr.train stage2 --config FILE`.
Bad configs, data or checkpoints stop with one line `error: ...` and exit code 2 before any
training starts.
"""
from __future__ import annotations

import logging
import os
import shlex
import sys

import click

__all__ = ["train", "main"]


class TrainUsageError(click.ClickException):
    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", force=True)


def _user_errors():
    from .config import ConfigError
    from .data import DataError
    from .state import CheckpointStateError

    return (ConfigError, DataError, CheckpointStateError)


def _run_stage(stage: str, config: str, resume) -> None:
    _setup_logging()
    from .config import load_stage_config

    try:
        cfg = load_stage_config(config, stage)
        from . import dist as tdist
        from .trainer import run

        if stage == "stage1":
            from .stage1 import Stage1 as cls
        elif stage == "stage2":
            from .stage2 import Stage2 as cls
        else:
            from .vae import VaeStage as cls
        info = tdist.setup(cfg.device)
        try:
            result = run(cls(cfg, info), resume=resume)
        finally:
            tdist.cleanup()
    except _user_errors() as e:
        raise TrainUsageError(str(e)) from None
    if result is not None:
        click.echo(f"{stage}: wrote {result}")


def _resume_option(f):
    return click.option(
        "--resume", "resume", is_flag=False, flag_value="latest", default=None, metavar="[CHECKPOINT]",
        help="Continue the run in out_dir from its latest checkpoint (or from CHECKPOINT).",
    )(f)


def _resume_value(value):
    if value is None:
        return False
    return True if value == "latest" else value


@click.group(name="train", help="Train DeeDSR: vae (tiny preset), stage1 (degradation learner), stage2 (adapter).")
def train() -> None:
    pass


@train.command("stage1")
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False), help="TOML file with a [stage1] table.")
@_resume_option
def stage1_cmd(config, resume) -> None:
    """Stage I: MoCo contrastive training of the degradation learner."""
    _run_stage("stage1", config, _resume_value(resume))


@train.command("stage2")
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False), help="TOML file with a [stage2] table.")
@_resume_option
def stage2_cmd(config, resume) -> None:
    """Stage II: diffusion training of adapter, modulation and cross-attention."""
    _run_stage("stage2", config, _resume_value(resume))


@train.command("vae")
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False), help="TOML file with a [vae] table.")
@_resume_option
def vae_cmd(config, resume) -> None:
    """Autoencoder (reconstruction + KL) for models without SD weights."""
    _run_stage("vae", config, _resume_value(resume))


@train.command("demo")
@click.option("--config", "config", default="configs/demo-lownoise.toml", show_default=True,
              type=click.Path(dir_okay=False), help="Demo config (TOML: [demo], [vae], [stage1], [stage2], [eval]).")
@click.option("-o", "--output", "--out", "out", default="deedsr/assets/demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the trained checkpoint folder goes.")
@click.option("--restart", is_flag=True, help="Discard earlier runs in the work folder instead of reusing them.")
@click.option("--until", type=click.Choice(["vae"]),
              help="Stop after this stage: 'vae' trains (or resumes) the autoencoder and reports its held-out "
                   "bound against bicubic (the demo.vae_gate_db gate), before any diffusion training.")
def demo_cmd(config, out, restart, until) -> None:
    """Train the demo weights (tiny preset, scikit-image photos) and evaluate them."""
    _setup_logging()
    command = "deedsr train demo " + " ".join(shlex.quote(a) for a in ["--config", config, "--out", out]
                                                   + (["--restart"] if restart else []))
    from .demo import GateFailed

    try:
        from .demo import run_demo

        result = run_demo(config, out, command=command, restart=restart, until=until)
    except _user_errors() as e:
        raise TrainUsageError(str(e)) from None
    except GateFailed as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    if result["out"] is not None:
        click.echo(f"demo: wrote {result['out']} ({result['train_minutes']:.1f} min of training)")
    click.echo(result["table"])


@train.command("evaluate")
@click.argument("checkpoint", type=click.Path(file_okay=False, exists=True))
@click.option("--photos", default="astronaut,chelsea", show_default=True, help="scikit-image photo names.")
@click.option("--level", "levels", multiple=True, type=click.Choice(["light", "medium", "heavy", "bicubic"]),
              help="Downscaling (repeatable): a Table 6 level or plain bicubic. [default: medium, bicubic]")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--crop-border", default=4, show_default=True, type=click.IntRange(0))
@click.option("--max-side", default=0, show_default=True, type=click.IntRange(0), help="HR centre crop (0 = whole photo).")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Also write the report here.")
@click.option("--images", "images_out", default=None, type=click.Path(file_okay=False), help="Write LR and results here.")
def evaluate_cmd(checkpoint, photos, levels, steps, seed, crop_border, max_side, json_out, images_out) -> None:
    """PSNR/SSIM (Y) of bicubic, the model (eta as configured and 0), its ablations and its VAE's
    reconstruction on held-out photos, and the degradation learner's cross-photo degradation retrieval."""
    _setup_logging()
    from ..checkpoints import CheckpointError
    from .config import EvalConfig
    from .evaluate import evaluate, format_table, skimage_photo, write_report

    try:
        cfg = EvalConfig(levels=list(levels) or ["medium", "bicubic"], seed=seed, steps=steps, crop_border=crop_border, max_side=max_side)
        images = {name: skimage_photo(name) for name in photos.split(",") if name}
        report = evaluate(checkpoint, images, cfg, out_dir=images_out)
    except (CheckpointError, ValueError) as e:
        raise TrainUsageError(str(e)) from None
    if json_out:
        write_report(report, json_out)
    click.echo(format_table(report))


def main(argv=None) -> None:
    train.main(args=argv, prog_name="python -m deedsr.train")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
