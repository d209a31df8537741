"""`deedsr train demo`: the embedded default weights, trained on this machine's CPU.

vae -> stage1 -> stage2 on the real photos that ship with scikit-image (two held out), then
the checkpoint is written to --out (deedsr/assets/demo by default) with training.json (the
command, the config, steps and times of each stage) and eval.json / EVAL.md (bicubic, the
model and the model without noise guidance on the held-out photos, Table 6 degradation,
PSNR/SSIM on Y).

Each stage runs in <work_dir>/<stage>; a stage that has done all its planned steps is reused, one
that was interrupted or stopped at its max_minutes is resumed, so training a stage over several
runs is running the same command again (and so is recovering from a crash).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .config import (
    ConfigError,
    DemoConfig,
    EvalConfig,
    Stage1Config,
    Stage2Config,
    VaeConfig,
    config_from_dict,
    load_config,
    photo_name,
    to_dict,
)

log = logging.getLogger("deedsr.train")

__all__ = ["DemoPlan", "load_demo", "run_demo", "default_train_photos"]

DEFAULT_TRAIN_PHOTOS = [
    "coffee", "rocket", "motorcycle_left", "hubble_deep_field", "retina", "immunohistochemistry",
    "camera", "brick", "grass", "gravel", "moon", "coins",
]


def default_train_photos() -> list[str]:
    return list(DEFAULT_TRAIN_PHOTOS)


class DemoPlan:
    """The demo config resolved into three stage configs and an evaluation config."""

    def __init__(self, path: Path, demo: DemoConfig, vae: VaeConfig, stage1: Stage1Config, stage2: Stage2Config,
                 evaluation: EvalConfig):
        self.path, self.demo, self.vae, self.stage1, self.stage2, self.eval = path, demo, vae, stage1, stage2, evaluation

    @property
    def work(self) -> Path:
        return Path(self.demo.work_dir)

    @property
    def train_dir(self) -> Path:
        return self.work / "data" / "train"

    @property
    def heldout_dir(self) -> Path:
        return self.work / "data" / "heldout"


def load_demo(path: str | Path) -> DemoPlan:
    path = Path(path)
    raw = load_config(path)
    demo = config_from_dict(DemoConfig, raw.get("demo", {}), f"{path}: demo")
    if not demo.train_photos:
        demo.train_photos = default_train_photos()
        config_from_dict(DemoConfig, to_dict(demo), f"{path}: demo")  # re-check overlaps
    work = Path(demo.work_dir)
    train = str(work / "data" / "train")
    if demo.latent_channels or demo.latent_downscale:
        demo.model = _model_with_latent(path, demo, work)

    def stage(cls, key: str, **fixed: Any):
        table = dict(raw.get(key, {}))
        for k in fixed:
            if k in table:
                raise ConfigError(f"{path}: {key}.{k}: set by the demo itself, remove it")
        data = dict(table.get("data", {}))
        if "folders" in data:
            raise ConfigError(f"{path}: {key}.data.folders: set by the demo itself (the scikit-image photos), remove it")
        data["folders"] = [train]
        table["data"] = data
        table.update(fixed)
        table.setdefault("model", demo.model)
        table.setdefault("seed", demo.seed)
        return config_from_dict(cls, table, f"{path}: {key}")

    vae = stage(VaeConfig, "vae", out_dir=str(work / "vae"))
    stage1 = stage(Stage1Config, "stage1", out_dir=str(work / "stage1"))
    stage2 = stage(
        Stage2Config, "stage2", out_dir=str(work / "stage2"),
        vae=demo.vae_checkpoint or str(work / "vae" / "vae"), learner=str(work / "stage1" / "learner"),
    )
    evaluation = config_from_dict(EvalConfig, raw.get("eval", {}), f"{path}: eval")
    return DemoPlan(path, demo, vae, stage1, stage2, evaluation)


def _model_with_latent(path: Path, demo: DemoConfig, work: Path) -> str:
    """demo.model with demo's latent written to <work_dir>/model.json, which the stages then read."""
    from ..config import with_latent
    from .artifacts import resolve_model_config

    try:
        config = with_latent(resolve_model_config(demo.model, f"{path}: demo.model"),
                             demo.latent_channels or None, demo.latent_downscale or None)
    except ValueError as e:
        raise ConfigError(f"{path}: demo: {e}") from None
    work.mkdir(parents=True, exist_ok=True)
    target = work / "model.json"
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    if not target.is_file() or target.read_text() != text:
        tmp = target.with_name(".model.json.tmp")
        tmp.write_text(text)
        tmp.replace(target)
    return str(target)


def prepare_photos(plan: DemoPlan) -> None:
    """Write the scikit-image photos and the photo files as PNG files into the work folder
    (train / held out); a file's photo is resized so its shorter side is at most
    demo.photo_short_side."""
    from .evaluate import skimage_photo

    groups = (
        (plan.train_dir, plan.demo.train_photos, plan.demo.photo_files),
        (plan.heldout_dir, plan.demo.heldout_photos, plan.demo.heldout_files),
    )
    for folder, names, files in groups:
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            if not (folder / f"{name}.png").exists():
                try:
                    _write_png(folder / f"{name}.png", skimage_photo(name))
                except ValueError as e:
                    raise ConfigError(f"{plan.path}: demo: {e}") from None
        for file in map(Path, files):
            if not (folder / f"{photo_name(file)}.png").exists():
                _write_png(folder / f"{photo_name(file)}.png", _photo_file(plan, file))


def _photo_file(plan: DemoPlan, file: Path):
    import numpy as np
    from PIL import Image

    from .data import DataError, load_rgb

    if not file.is_file():
        raise ConfigError(f"{plan.path}: demo: photo file {file} not found (the demo config names Debian wallpaper "
                          "packages to install for it)")
    try:
        im = Image.fromarray(load_rgb(file))
    except DataError as e:
        raise ConfigError(f"{plan.path}: demo: {e}") from None
    short = min(im.size)
    if short > plan.demo.photo_short_side:
        f = plan.demo.photo_short_side / short
        im = im.resize((round(im.width * f), round(im.height * f)), Image.Resampling.LANCZOS)
    return np.asarray(im)


def _write_png(target: Path, img) -> None:
    from PIL import Image

    tmp = target.with_name(f".{target.name}.tmp")
    Image.fromarray(img).save(tmp, format="PNG")
    tmp.replace(target)


def _stage_done(out_dir: Path) -> dict | None:
    """What a finished stage wrote (finished: all its steps, or stopped at max_minutes)."""
    done = out_dir / "done.json"
    return json.loads(done.read_text()) if done.is_file() else None


def _run_stage(stage_cls, cfg, info) -> dict[str, Any]:
    from .trainer import run

    out = Path(cfg.out_dir)
    done = _stage_done(out)
    resume = (out / "checkpoints" / "latest").is_file()
    if done is not None and (done["step"] >= done["total"] or not resume):
        log.info("demo: %s already trained (%s), reusing it", stage_cls.name, done["deliverable"])
        return {"steps": done["step"], "planned_steps": done["total"], "reused": True}
    if done is not None:  # stopped at max_minutes in an earlier run: this run continues it
        log.info("demo: %s stopped at step %d of %d in an earlier run; continuing", stage_cls.name, done["step"],
                 done["total"])
        (out / "done.json").unlink()
    t0 = time.monotonic()
    started = _checkpoint_step(out) if resume else 0
    run(stage_cls(cfg, info), resume=resume)
    done = json.loads((out / "done.json").read_text())
    _log_run(out.parent, {"stage": stage_cls.name, "from_step": started, "to_step": done["step"],
                          "planned_steps": done["total"], "minutes": round((time.monotonic() - t0) / 60, 1)})
    return {"steps": done["step"], "planned_steps": done["total"], "minutes": round((time.monotonic() - t0) / 60, 2),
            "resumed": resume}


def _checkpoint_step(out_dir: Path) -> int:
    try:
        return json.loads((out_dir / "checkpoints" / (out_dir / "checkpoints" / "latest").read_text().strip()
                           / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def _log_run(work: Path, entry: dict[str, Any]) -> None:
    """One line per stage run in <work_dir>/runs.jsonl (EVAL.md lists them): training that spans
    several runs says what each run did."""
    import datetime

    entry = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **entry}
    with open(work / "runs.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def run_log(work: Path) -> list[dict[str, Any]]:
    path = work / "runs.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_history(out_dir: Path) -> dict[str, Any]:
    """Steps, wall minutes (all runs of a resumed stage) and the logged loss at the first and
    last log lines, from <stage>/logs/metrics.jsonl."""
    path = out_dir / "logs" / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return {}
    seconds, last = 0.0, 0.0
    for row in rows:  # elapsed_s restarts with every resumed run
        t = float(row.get("elapsed_s", 0.0))
        if t < last:
            seconds += last
        last = t
    seconds += last
    return {"wall_minutes": round(seconds / 60, 1), "loss_first": [rows[0]["step"], round(rows[0]["loss"], 4)],
            "loss_last": [rows[-1]["step"], round(rows[-1]["loss"], 4)]}


def eval_markdown(plan: DemoPlan, command: str, provenance: dict[str, Any], report: dict[str, Any], table: str) -> str:
    demo = plan.demo
    stage_lines = []
    for name, st in provenance["stages"].items():
        if "reused_from" in st:
            stage_lines.append(f"- {name}: not trained in this run; taken from `{st['reused_from']}` (demo.vae_checkpoint)")
            continue
        loss = (f"; logged loss {st['loss_first'][1]:.4g} at step {st['loss_first'][0]} -> {st['loss_last'][1]:.4g} "
                f"at step {st['loss_last'][0]}") if "loss_first" in st else ""
        minutes = st.get("wall_minutes", st.get("minutes", "?"))
        stage_lines.append(f"- {name}: {st['steps']} of {st['planned_steps']} planned steps, {minutes} min{loss}")
    runs = [f"- {r['date']}: {r['stage']} steps {r['from_step']} -> {r['to_step']} of {r['planned_steps']}, "
            f"{r['minutes']} min" for r in run_log(plan.work)]
    if runs:
        stage_lines += ["", "Runs (one line per stage run; a stage stopped at max_minutes continues in the next):", "",
                        *runs]
    gate = provenance.get("vae_gate")
    if gate:
        stage_lines += ["", f"VAE gate before stage I / II ({gate['level']}, the held-out photos): the VAE's "
                        f"colour-fixed reconstruction {gate['mean']['vae']['psnr']:.2f} dB against bicubic "
                        f"{gate['mean']['bicubic']['psnr']:.2f} ({gate['margin_db']:+.2f} dB; asked "
                        f"+{gate['gate_db']:g}).", "", gate_table(gate)]
    files = [f"{photo_name(f)} (`{f}`)" for f in demo.photo_files]
    heldout_files = [f"{photo_name(f)} (`{f}`)" for f in demo.heldout_files]
    return (
        "# Demo weights\n\n"
        f"Trained with `{command}` ({sum(st.get('wall_minutes', 0) for st in provenance['stages'].values()):.1f} "
        "min of training, "
        f"{provenance['machine']['cpu_threads']} torch CPU thread(s)); config: `{plan.path}` (copied into "
        f"training.json); model: `{demo.model}`; weights stored as {demo.weights_dtype}.\n\n"
        "Stages (wall time over every run of the stage; a stage stops at its planned steps or at max_minutes):\n\n"
        + "\n".join(stage_lines) + "\n\n"
        f"Training photos ({len(demo.train_photos) + len(files)}): scikit-image {', '.join(demo.train_photos)}"
        + (f"; photo files, shorter side at most {demo.photo_short_side} px: " + ", ".join(files) if files else "")
        + ".\n\n"
        f"Held-out photos ({len(demo.heldout_photos) + len(heldout_files)}, never seen in training): scikit-image "
        f"{', '.join(demo.heldout_photos)}" + ("; " + ", ".join(heldout_files) if heldout_files else "") + ".\n\n"
        f"Evaluation ({provenance['eval_minutes']:.1f} min): HR centre crops of at most {plan.eval.max_side or 'any'} px, "
        f"x4, {plan.eval.steps} DDIM steps (by default eta {report['eta']}, "
        f"{_guided_text(report.get('noise_guidance_steps', [0]))}), seed {plan.eval.seed}, "
        f"PSNR (dB) / SSIM on Y, border {plan.eval.crop_border}:\n\n" + table
    )


def _guided_text(steps: list[int]) -> str:
    if steps == [0]:
        return "noise guidance at the first step"
    if steps and steps == list(range(len(steps))):
        return f"noise guidance at steps 0-{len(steps) - 1}: the model runs from step {len(steps)} on"
    return "noise guidance at steps " + ", ".join(map(str, steps)) if steps else "no noise guidance"


class GateFailed(RuntimeError):
    """The VAE does not leave a model room to beat bicubic (demo.vae_gate_db)."""


def heldout_photos(plan: DemoPlan) -> dict[str, Any]:
    from .data import load_rgb
    from .evaluate import skimage_photo

    photos = {name: skimage_photo(name) for name in plan.demo.heldout_photos}
    photos.update({photo_name(f): load_rgb(plan.heldout_dir / f"{photo_name(f)}.png") for f in plan.demo.heldout_files})
    return photos


def vae_gate(plan: DemoPlan, vae_dir: str | Path) -> dict[str, Any]:
    """The trained VAE's bound on the held-out photos (deedsr.train.evaluate.vae_bound), written
    to <work_dir>/vae_gate.json; GateFailed when demo.vae_gate_db is set and not met."""
    from ..models import DeeDSR
    from ..pipeline import DeeDSRPipeline
    from .artifacts import load_component, resolve_model_config
    from .evaluate import vae_bound

    vae_config = resolve_model_config(str(vae_dir), "demo: the VAE")  # the whole model's config, as trained
    model = DeeDSR(vae_config)
    load_component(vae_dir, "vae", model.vae, "demo: the VAE")
    t0 = time.monotonic()
    report = vae_bound(DeeDSRPipeline(model.eval()), heldout_photos(plan), plan.eval, plan.demo.color_fix)
    report.update(vae=str(vae_dir), gate_db=plan.demo.vae_gate_db, minutes=round((time.monotonic() - t0) / 60, 2),
                  latent={"channels": vae_config.latent_channels, "downscale": vae_config.latent_downscale})
    report["passed"] = report["margin_db"] >= plan.demo.vae_gate_db
    (plan.work / "vae_gate.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("demo: VAE bound %s\n%s", vae_dir, gate_table(report))
    if plan.demo.vae_gate_db and not report["passed"]:
        raise GateFailed(
            f"the VAE's colour-fixed reconstruction scores {report['mean']['vae']['psnr']:.2f} dB on the held-out "
            f"photos ({report['level']}), {report['margin_db']:+.2f} dB against bicubic; demo.vae_gate_db asks for "
            f"+{plan.demo.vae_gate_db:g} dB before stage I / II are trained on it ({plan.work / 'vae_gate.json'}; a VAE "
            "stopped at vae.max_minutes continues when the command is run again)")
    return report


def gate_table(report: dict[str, Any]) -> str:
    lines = [f"| photo | bicubic | VAE bound (colour fix {report['color_fix']}) | margin |", "|---|---|---|---|"]
    for row in [*report["photos"], {"photo": "**mean**", **report["mean"]}]:
        b, v = row["bicubic"], row["vae"]
        lines.append(f"| {row['photo']} | {b['psnr']:.2f} / {b['ssim']:.3f} | {v['psnr']:.2f} / {v['ssim']:.3f} | "
                     f"{v['psnr'] - b['psnr']:+.2f} |")
    return "\n".join(lines)


def run_demo(config_path: str | Path, out: str | Path, command: str = "", restart: bool = False,
             until: str | None = None) -> dict[str, Any]:
    """Train the demo model and write it, its provenance and its evaluation to `out`; with
    until="vae", stop after the VAE and its gate (nothing is written to `out`)."""
    from ..checkpoints import save_checkpoint
    from .dist import setup
    from .evaluate import evaluate, format_table, write_report
    from .stage1 import Stage1
    from .stage2 import Stage2
    from .vae import VaeStage

    plan = load_demo(config_path)
    info = setup(plan.stage2.device)
    if info.distributed:
        raise ConfigError("deedsr train demo runs in one process (it is sized for a CPU); run the stages under torchrun instead")
    vae = plan.demo.vae_checkpoint
    if vae and not (Path(vae) / "vae.safetensors").is_file():
        raise ConfigError(f"{plan.path}: demo.vae_checkpoint: {vae} holds no trained VAE (vae.safetensors); train it "
                          "first (runs/demo-tiny/vae/vae: deedsr train demo --config configs/demo-tiny.toml)")
    if restart and plan.work.exists():
        shutil.rmtree(plan.work)
    prepare_photos(plan)
    t0 = time.monotonic()
    stages = {}
    gate = None
    for cls, cfg in ((VaeStage, plan.vae), (Stage1, plan.stage1), (Stage2, plan.stage2)):
        if cls is VaeStage and plan.demo.vae_checkpoint:
            log.info("demo: vae from %s", plan.demo.vae_checkpoint)
            stages[cls.name] = {"reused_from": plan.demo.vae_checkpoint}
        else:
            log.info("demo: %s", cls.name)
            stages[cls.name] = _run_stage(cls, cfg, info)
        if cls is VaeStage:
            gate = vae_gate(plan, plan.stage2.vae)
            if until == "vae":
                return {"out": None, "stages": stages, "gate": gate, "table": gate_table(gate),
                        "train_minutes": (time.monotonic() - t0) / 60}
    train_minutes = (time.monotonic() - t0) / 60

    from ..models import load_checkpoint

    model = load_checkpoint(Path(plan.stage2.out_dir) / "model")
    sampler = {"color_fix": plan.demo.color_fix}
    if plan.demo.noise_guidance_steps:
        sampler["noise_guidance_steps"] = tuple(plan.demo.noise_guidance_steps)
    model.config.sampler = dataclasses.replace(model.config.sampler, **sampler)
    dtype = torch.float16 if plan.demo.weights_dtype == "float16" else None
    out = Path(out)
    save_checkpoint(model, out, dtype=dtype)

    t1 = time.monotonic()
    photos = heldout_photos(plan)
    log.info("demo: evaluating on the held-out photos %s", ", ".join(photos))
    report = evaluate(out, photos, plan.eval, out_dir=plan.work / "eval")
    eval_minutes = (time.monotonic() - t1) / 60
    write_report(report, out / "eval.json")
    provenance = {
        "command": command,
        "config_file": str(plan.path),
        "config_toml": Path(plan.path).read_text(),
        "stages": stages,
        "vae_gate": gate,
        "train_minutes": round(train_minutes, 2),
        "eval_minutes": round(eval_minutes, 2),
        "train_photos": plan.demo.train_photos,
        "heldout_photos": plan.demo.heldout_photos,
        "weights_dtype": plan.demo.weights_dtype,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                    "platform": platform.platform()},
    }
    for name in stages:
        if "reused_from" not in stages[name]:
            stages[name].update(stage_history(plan.work / name))
    provenance["stages"] = stages
    (out / "training.json").write_text(json.dumps(provenance, indent=2) + "\n")
    table = format_table(report)
    (out / "EVAL.md").write_text(eval_markdown(plan, command, provenance, report, table))
    log.info("demo: wrote %s\n%s", out, table)
    return {"out": str(out), "stages": stages, "eval": report, "table": table, "train_minutes": train_minutes}
