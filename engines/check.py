"""GPU checks of an engine directory's TensorRT plans (run by scripts/gpu_check.sh):

1. every plan against ONNX Runtime's fp32 graph on the same inputs (cosine similarity), plus
   the step path (adapter outputs bound on the device into the UNet) against ONNX Runtime's
   adapter -> UNet;
2. `Upscaler(backend="trt")` end to end against `Upscaler(backend="ort", precision="fp32")`
   with the same seed (PSNR over RGB);
3. per-step and per-image latency of the trt backend.

    python -m deedsr.engines.check ENGINE_DIR [--image LR.png] [--steps 20] [--min-cosine 0.999] [--min-psnr 35]

Needs TensorRT, a GPU, polygraphy and onnxruntime; no torch. Exit code 1 when a threshold fails.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from deedsr.runtime.contract import (
    ADAPTER,
    DENOISER,
    LEARNER,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
)

COSINE_MIN = 0.999
PSNR_MIN = 35.0


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


class _Reference:
    """ONNX Runtime sessions on the fp32 graphs (CPU unless onnxruntime-gpu is there)."""

    def __init__(self, manifest):
        import onnxruntime as ort

        self.ort, self.manifest, self.sessions = ort, manifest, {}

    def run(self, graph: str, feeds: dict) -> dict:
        if graph not in self.sessions:
            entry = self.manifest.graph_file(graph, "fp32")
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                         if p in self.ort.get_available_providers()]
            self.sessions[graph] = self.ort.InferenceSession(str(entry.file), providers=providers)
        names = self.manifest.graphs[graph].output_names
        values = self.sessions[graph].run(names, {k: np.ascontiguousarray(v, np.float32) for k, v in feeds.items()})
        return dict(zip(names, values))


def _opt(record: dict, name: str) -> int:
    return int(record["dims"][name]["opt"])


def make_inputs(manifest, records: dict, reference: _Reference, seed: int = 0, batch: int = 2) -> dict[str, dict]:
    """Inputs per graph at each plan's opt shapes (batch `batch` for the per-step graphs): random
    images/latents, realistic conditions (the learner's) and UNet inputs (the adapter's)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, dict] = {}
    lr_rec = records[LEARNER]
    lr = rng.uniform(0, 1, (1, 3, _opt(lr_rec, "lr_height"), _opt(lr_rec, "lr_width"))).astype(np.float32)
    feeds[LEARNER] = {"lr": lr}
    conditions = {k: v for k, v in reference.run(LEARNER, {"lr": lr}).items()
                  if k in manifest.conditions}
    if VAE_ENCODER in records:
        r = records[VAE_ENCODER]
        feeds[VAE_ENCODER] = {"image": rng.uniform(-1, 1, (1, 3, _opt(r, "image_height"), _opt(r, "image_width")))
                                .astype(np.float32)}
    if VAE_DECODER in records:
        r = records[VAE_DECODER]
        c = manifest.image["latent_channels"]
        feeds[VAE_DECODER] = {"latent": rng.standard_normal((1, c, _opt(r, "latent_height"),
                                                               _opt(r, "latent_width"))).astype(np.float32)}
    step = next((records[g] for g in (ADAPTER, UNET, DENOISER) if g in records), None)
    if step is not None:
        b = max(1, min(batch, int(step["dims"]["batch"]["max"])))
        th, tw = _opt(step, "tile_height"), _opt(step, "tile_width")
        c = manifest.image["latent_channels"]
        x_t = rng.standard_normal((b, c, th, tw)).astype(np.float32)
        z_lr = rng.standard_normal((b, c, th, tw)).astype(np.float32)
        timestep = np.linspace(981, 41, b).astype(np.float32)
        conds = {k: np.repeat(v, b, axis=0) for k, v in conditions.items()}
        feeds[ADAPTER] = {"z_lr": z_lr, "timestep": timestep, **conds}
        feeds[DENOISER] = {"x_t": x_t, "timestep": timestep, "z_lr": z_lr, **conds}
        if UNET in records:
            adapter = reference.run(ADAPTER, feeds[ADAPTER])
            feeds[UNET] = {"x_t": x_t, "timestep": timestep, **adapter}
    return {g: f for g, f in feeds.items() if g in records}


def compare(engine_dir, min_cosine: float = COSINE_MIN, seed: int = 0, echo=print) -> list[dict]:
    """Each plan (and the device-bound step path) vs ONNX Runtime fp32; rows of results."""
    from deedsr.runtime.backends.trt import TrtBackend
    from deedsr.runtime.errors import EngineError
    from deedsr.runtime.manifest import Manifest
    from deedsr.runtime.plans import plan_records

    manifest = Manifest.load(engine_dir)
    records = plan_records(manifest.data)
    missing = [g for g in (LEARNER, VAE_ENCODER, VAE_DECODER) if g not in records]
    if missing:
        raise EngineError(f"{manifest.root}: no TensorRT plan for {', '.join(missing)}; build them on this machine: "
                          f"deedsr-export build-engines {manifest.root}")
    reference = _Reference(manifest)
    inputs = make_inputs(manifest, records, reference, seed)
    rows, done = [], set()
    paths = [False, True] if DENOISER in records and {ADAPTER, UNET} <= set(records) else [None]
    for use_denoiser in paths:
        backend = TrtBackend(manifest, "fp16", use_denoiser=use_denoiser, cuda_graphs=False)
        try:
            graphs = [g for g in inputs if g in backend._plans and g not in done]
            done.update(graphs)
            for graph in graphs:
                ref = reference.run(graph, inputs[graph])
                got = backend.run(graph, inputs[graph])
                for name in manifest.graphs[graph].output_names:
                    rows.append(_row(graph, name, ref[name], got[name], min_cosine))
            f = inputs.get(DENOISER) or {}
            if f:
                conds = {k: f[k] for k in manifest.conditions}
                got = backend.denoise(f["x_t"], f["timestep"], f["z_lr"], conds)
                ref = reference.run(UNET, {"x_t": f["x_t"], "timestep": f["timestep"],
                                             **reference.run(ADAPTER, {"z_lr": f["z_lr"], "timestep": f["timestep"],
                                                                         **conds})})["eps"]
                rows.append(_row("step:" + ("denoiser" if backend.use_denoiser else "adapter->unet"), "eps", ref, got,
                                 min_cosine))
        finally:
            backend.close()
    for r in rows:
        echo(f"{'ok  ' if r['ok'] else 'FAIL'} {r['graph']:>22}.{r['output']:<12} cosine {r['cosine']:.6f}  "
             f"max abs err {r['max_abs']:.3e}  (|ref| max {r['ref_max']:.3e})")
    return rows


def _row(graph, name, ref, got, min_cosine) -> dict:
    ok_shape = ref.shape == got.shape
    cos = cosine(ref, got) if ok_shape else float("nan")
    ok = bool(ok_shape and np.isfinite(got).all() and cos >= min_cosine)
    return {"graph": graph, "output": name, "cosine": cos, "ok": ok,
            "max_abs": float(np.abs(ref - got).max()) if ok_shape else float("nan"),
            "ref_max": float(np.abs(ref).max())}


def _load_image(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def end_to_end(engine_dir, image: np.ndarray, steps: int, seed: int = 0, min_psnr: float = PSNR_MIN,
               echo=print) -> dict:
    """trt backend vs ort fp32 (the fp32 reference) on one image, same seed; and latency."""
    from deedsr.runtime.upscaler import Upscaler

    ref_up = Upscaler.from_engine_dir(engine_dir, backend="ort", precision="fp32")
    started = time.perf_counter()
    reference = ref_up.upscale(image, seed=seed, steps=steps)
    ref_seconds = time.perf_counter() - started
    ref_up.close()
    trt_up = Upscaler.from_engine_dir(engine_dir, backend="trt")
    try:
        trt_up.upscale(image, seed=seed, steps=min(steps, 3))  # warm-up (allocations, CUDA graph capture)
        stamps: list[tuple[float, bool]] = []
        started = time.perf_counter()
        result = trt_up.upscale(image, seed=seed, steps=steps,
                                callback=lambda info: stamps.append((time.perf_counter(), info.guided)))
        image_seconds = time.perf_counter() - started
        step_times = [t - p for (p, _), (t, guided) in zip([(started, False)] + stamps[:-1], stamps) if not guided]
        describe = trt_up.describe()
    finally:
        trt_up.close()
    value = psnr(reference, result)
    out = {"psnr": value, "ok": value >= min_psnr, "image_seconds": image_seconds, "ort_fp32_seconds": ref_seconds,
           "step_ms_median": 1000 * statistics.median(step_times) if step_times else float("nan"),
           "step_ms_mean": 1000 * statistics.fmean(step_times) if step_times else float("nan"),
           "steps": steps, "size": f"{image.shape[1]}x{image.shape[0]}", "backend": describe}
    echo(f"{'ok  ' if out['ok'] else 'FAIL'} end to end {out['size']} -> x4, {steps} steps: PSNR {value:.2f} dB vs "
         f"ort fp32 (threshold {min_psnr} dB)")
    echo(f"latency ({describe}): per step {out['step_ms_median']:.2f} ms median / {out['step_ms_mean']:.2f} ms "
         f"mean (model steps only), per image {image_seconds:.3f} s; ort fp32 per image {ref_seconds:.3f} s")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deedsr.engines.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("engine_dir")
    parser.add_argument("--image", help="LR image for the end-to-end check (default: the bundled astronaut)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-cosine", type=float, default=COSINE_MIN)
    parser.add_argument("--min-psnr", type=float, default=PSNR_MIN)
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--skip-end-to-end", action="store_true")
    args = parser.parse_args(argv)
    from deedsr.runtime.errors import EngineError

    ok = True
    try:
        if not args.skip_compare:
            rows = compare(args.engine_dir, args.min_cosine, args.seed)
            ok &= all(r["ok"] for r in rows)
        if not args.skip_end_to_end:
            from deedsr.runtime.demo import ASSET

            image = _load_image(args.image or ASSET)
            ok &= end_to_end(args.engine_dir, image, args.steps, args.seed, args.min_psnr)["ok"]
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("all checks passed" if ok else "some checks FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
