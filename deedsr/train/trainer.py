"""The loop every stage shares: data, resume, steps, logging, checkpoints, time budget.

A stage (stage1.py, stage2.py, vae.py) supplies the model, one optimizer step and what goes
into a checkpoint; `run()` does the rest:

* checks everything that can be checked before training (config, data folder, images, the
  resume checkpoint and its config) and fails with one line;
* iterates optimizer steps; every step's data and noise follow from (seed, step), so a run
  stopped at step k and resumed gives the same weights as an uninterrupted run;
* logs loss and learning rate to <out_dir>/logs/metrics.jsonl (and TensorBoard if asked),
  shows a progress bar on rank 0;
* writes training checkpoints atomically every `save_every` steps and at the end;
* under torchrun, checks at every checkpoint that all ranks hold identical weights.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist

from . import dist as tdist
from .config import ConfigError, config_differences, fingerprint, to_dict
from .data import DegradedImages, StepBatchSampler, list_images
from .state import (
    CheckpointStateError,
    capture_rng,
    latest_checkpoint,
    load_state,
    restore_rng,
    save_state,
)

log = logging.getLogger("deedsr.train")

__all__ = ["Stage", "run", "derive_seed", "autocast", "scheduled_lr"]


def scheduled_lr(base: float, step: int, total: int, schedule: str = "constant", warmup: int = 0) -> float:
    """Linear warm-up over `warmup` steps, then constant or a cosine to 0 at `total` steps."""
    lr = base * min(1.0, (step + 1) / warmup) if warmup else base
    if schedule == "cosine" and total > warmup:
        progress = min(1.0, max(0.0, (step - warmup) / (total - warmup)))
        lr *= 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (independent streams for (seed, step, rank, ...))."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def autocast(device: torch.device, mixed_precision: str):
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Stage:
    """Base class. Subclasses set `name` and implement the hooks below."""

    name = "stage"
    #: dataset mode (see data.DegradedImages)
    data_mode = "pair"

    def __init__(self, cfg, info: tdist.DistInfo):
        self.cfg = cfg
        self.info = info
        self.device = info.device
        self.scaler = None

    # -- sizes -------------------------------------------------------------------------
    @property
    def micro_batch(self) -> int:
        """Samples per rank and forward pass."""
        cfg, world = self.cfg, self.info.world
        micro = getattr(cfg, "micro_batch", 0) or cfg.batch_size // world
        if micro <= 0 or cfg.batch_size % (micro * world):
            raise ConfigError(
                f"{self.name}: batch_size {cfg.batch_size} must be a multiple of micro_batch {micro} x {world} "
                f"rank(s)"
            )
        return micro

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.cfg.max_steps

    # -- hooks -------------------------------------------------------------------------
    def check(self) -> None:
        """Cheap checks of paths and settings, before any model is built."""

    def dataset(self, files) -> DegradedImages:
        return DegradedImages(files, self.cfg.data, self.cfg.seed, self.data_mode)

    def build(self) -> None:
        raise NotImplementedError

    def train_step(self, step: int, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        raise NotImplementedError

    def state_payload(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_payload(self, payload: dict[str, Any]) -> None:
        raise NotImplementedError

    def replica_tensors(self) -> list[torch.Tensor]:
        """Tensors that must be identical on every rank (checked at checkpoints)."""
        return []

    def before_save(self) -> None:
        """Collective work before a checkpoint (all ranks)."""

    def validate(self, step: int, out_dir: Path) -> None:
        """Periodic validation samples (rank 0)."""

    def finalize(self, out_dir: Path) -> Path | None:
        """Write the stage's deliverable (rank 0); returns its path."""
        return None

    # -- helpers -----------------------------------------------------------------------
    def set_lr(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def make_scaler(self) -> None:
        enabled = self.cfg.mixed_precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=enabled)


class MetricsLogger:
    def __init__(self, out_dir: Path, main: bool, tensorboard: bool):
        self.main = main
        self.file = None
        self.tb = None
        if not main:
            return
        logs = out_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.file = open(logs / "metrics.jsonl", "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(logs / "tensorboard"))
            except ImportError as e:
                log.warning("tensorboard = true but TensorBoard is not installed (%s); logging to metrics.jsonl only", e)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.main:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _mean_over_ranks(values: dict[str, float], info: tdist.DistInfo) -> dict[str, float]:
    if not info.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=info.device)
    torch_dist.all_reduce(t)
    t /= info.world
    return dict(zip(keys, t.tolist()))


def _any_rank(flag: bool, info: tdist.DistInfo) -> bool:
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _resume_payload(stage: Stage, resume: bool | str, ckpt_root: Path, files: list[Path]) -> tuple[int, dict | None]:
    """Find and check the checkpoint to resume from; (0, None) for a fresh run."""
    if not resume:
        if latest_checkpoint(ckpt_root) is not None:
            raise ConfigError(
                f"{ckpt_root}: holds checkpoints of an earlier run; pass --resume to continue it, or use another out_dir"
            )
        return 0, None
    path = ckpt_root if resume is True else Path(resume)
    if resume is True and latest_checkpoint(ckpt_root) is None:
        raise ConfigError(f"{ckpt_root}: no checkpoint to resume from")
    try:
        step, payload = load_state(path)
    except CheckpointStateError as e:
        raise ConfigError(str(e)) from None
    meta = payload.get("meta", {})
    if meta.get("stage") != stage.name:
        raise ConfigError(f"{path}: a checkpoint of '{meta.get('stage')}', not of {stage.name}")
    diffs = config_differences(meta.get("config", {}), to_dict(stage.cfg))
    if diffs:
        key = diffs[0]
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise ConfigError(f"{path}: written with another config: '{key}' differs{more}; resume with the config that wrote it")
    if meta.get("data") != _data_fingerprint(files):
        raise ConfigError(f"{path}: written with other training images (the data folders' files differ)")
    return step, payload


def _data_fingerprint(files: list[Path]) -> str:
    return fingerprint({"files": [p.name for p in files], "n": len(files)})


def run(stage: Stage, resume: bool | str = False) -> Path | None:
    """Train `stage` to its end (or budget); returns the deliverable's path on rank 0."""
    cfg, info = stage.cfg, stage.info
    if not cfg.out_dir:
        raise ConfigError(f"{stage.name}.out_dir: required")
    out_dir = Path(cfg.out_dir)
    ckpt_root = out_dir / "checkpoints"

    # Everything that can fail cheaply, before any model is built.
    stage.check()
    files = list_images(cfg.data, cfg.data.gt_size)
    dataset = stage.dataset(files)
    micro = stage.micro_batch
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, micro, info.world, info.rank, cfg.seed)
    total = stage.total_steps(sampler.steps_per_epoch)
    start, payload = _resume_payload(stage, resume, ckpt_root, files)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    stage.build()
    if payload is not None:
        stage.load_payload(payload["stage"])
        restore_rng(payload["rng"])
        log.info("%s: resumed from step %d", stage.name, start)
    if info.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps({"stage": stage.name, **to_dict(cfg)}, indent=2) + "\n")

    sampler.start_step = start
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=info.device.type == "cuda",
        worker_init_fn=_seed_worker,
        prefetch_factor=2 if cfg.data.num_workers else None,
    )
    logger = MetricsLogger(out_dir, info.main, cfg.tensorboard)
    bar = None
    if info.main and cfg.progress and start < total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc=stage.name, unit="step", dynamic_ncols=True)

    def save(step: int) -> None:
        stage.before_save()
        if info.distributed and cfg.replica_check:
            digests = tdist.gather_strings(tdist.digest(stage.replica_tensors()))
            if info.main:
                (out_dir / "replicas.json").write_text(json.dumps({"step": step, "digests": digests}) + "\n")
            if len(set(digests)) != 1:
                raise RuntimeError(f"{stage.name}: ranks disagree on the weights at step {step}: {digests}")
        if info.main:
            meta = {"stage": stage.name, "config": to_dict(cfg), "data": _data_fingerprint(files), "world": info.world}
            save_state(ckpt_root, step, {"meta": meta, "stage": stage.state_payload(), "rng": capture_rng()}, cfg.keep_last)
        tdist.barrier()

    t0 = time.monotonic()
    step = start
    window: list[dict[str, float]] = []
    try:
        iterator = iter(loader) if start < total else None
        while step < total:
            micro_batches = [stage.to_device(next(iterator)) for _ in range(sampler.accum)]
            metrics = stage.train_step(step, micro_batches)
            if not all(math.isfinite(v) for v in metrics.values()):
                raise FloatingPointError(f"{stage.name}: non-finite metrics at step {step}: {metrics}")
            window.append(metrics)
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
            out_of_time = cfg.max_minutes > 0 and _any_rank(time.monotonic() - t0 > cfg.max_minutes * 60, info)
            last = step == total or out_of_time
            if step % cfg.log_every == 0 or last:
                mean = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
                mean = _mean_over_ranks(mean, info)
                mean["elapsed_s"] = round(time.monotonic() - t0, 2)
                logger.write(step, mean)
                if bar is None and info.main:
                    log.info("%s step %d/%d %s", stage.name, step, total,
                             " ".join(f"{k}={v:.4g}" for k, v in mean.items()))
                window = []
            if step % cfg.save_every == 0 or last:
                save(step)
            if getattr(cfg, "val_every", 0) and step % cfg.val_every == 0 and not last:
                if info.main:
                    stage.validate(step, out_dir)
                tdist.barrier()
            if out_of_time:
                log.warning("%s: max_minutes = %g reached at step %d of %d; stopping with a checkpoint",
                            stage.name, cfg.max_minutes, step, total)
                break
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    result = None
    if info.main:
        if getattr(cfg, "val_images", None):
            stage.validate(step, out_dir)
        result = stage.finalize(out_dir)
        (out_dir / "done.json").write_text(json.dumps({"step": step, "total": total, "deliverable": str(result)}) + "\n")
    tdist.barrier()
    return result


def _seed_worker(worker_id: int) -> None:
    # Samples draw from their own (seed, epoch, index) generators; this only keeps any other
    # library randomness in workers from depending on the process's fork order.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    import random

    random.seed(seed)
    try:  # one OpenCV thread per worker: workers are the parallelism
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass
