"""The lean runtime against the PyTorch reference on this machine: time per image, time per
step and the part of a step spent outside graph calls, cold start of `deedsr upscale`, and the
peak RSS of each.

    python benchmarks/bench_runtime.py --preset tiny --size 128 --steps 10 --threads 2
    python benchmarks/bench_runtime.py --preset sd21-base --size 64 --steps 2 --engines /tmp/deedsr-sd21

Both run in this process on the same model weights (seeded; modulation given small random
weights as benchmarks/bench_export.py does, so an engine directory it wrote matches), the same
image (the bundled astronaut, resized to --size), seed, steps and thread count. Engines are
exported (once, cached under $DEEDSR_CACHE/bench/) unless --engines names a directory. Peak
RSS is measured in child processes (RUSAGE_CHILDREN of a wrapper per measurement) so that
the two do not mix.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ASSET = ROOT / "runtime" / "assets" / "astronaut_lr.png"


# ------------------------------------------------------------------------------ setup
def build_model(preset: str, modulation_std: float):
    import torch

    from deedsr.config import preset as preset_config
    from deedsr.models import DeeDSR

    torch.manual_seed(0)
    model = DeeDSR(preset_config(preset)).eval()
    if modulation_std:
        with torch.no_grad():
            for m in model.unet.modulation:
                m.gamma.weight.normal_(0, modulation_std)
                m.beta.weight.normal_(0, modulation_std)
    return model


def weights_hash(model) -> str:
    from deedsr.export.onnx_io import weights_sha256

    return weights_sha256(model)


def engine_dir(args, model) -> tuple[Path, bool]:
    """(engine directory, whether its weights are the benchmarked model's)."""
    digest = weights_hash(model)
    if args.engines:
        path = Path(args.engines)
        manifest = json.loads((path / "manifest.json").read_text())
        return path, manifest.get("model", {}).get("weights_sha256") == digest
    from deedsr.export.engine_dir import export_engine_dir

    cache = Path(os.environ.get("DEEDSR_CACHE") or Path.home() / ".cache" / "deedsr") / "bench"
    path = cache / f"{args.preset}-{digest[:12]}-t{args.tile or 'default'}-{args.precision}"
    if not (path / "manifest.json").is_file():
        print(f"exporting {args.preset} to {path} ...", file=sys.stderr)
        export_engine_dir(model, path, precisions=(args.precision,), tile=args.tile,
                          max_size=max(512, args.size), force=True)
    return path, True


def test_image(size: int) -> np.ndarray:
    image = Image.open(ASSET).convert("RGB")
    return np.asarray(image.resize((size, size), Image.BICUBIC))


# ---------------------------------------------------------------------------- timing
def time_reference(model, image, args, tile):
    import torch

    from deedsr.pipeline import DeeDSRPipeline

    torch.set_num_threads(args.threads)
    pipe = DeeDSRPipeline(model)
    options = dict(steps=args.steps, tile=tile)
    pipe(image, seed=args.seed, steps=1, noise_guidance_steps=(), tile=tile)  # warm-up
    per_image, steps, result = [], [], None
    for _ in range(args.runs):
        marks = []
        start = time.perf_counter()
        result = pipe(image, seed=args.seed, callback=lambda info: marks.append((time.perf_counter(), info.guided)),
                      **options)
        per_image.append(time.perf_counter() - start)
        steps += [b[0] - a[0] for a, b in zip(marks, marks[1:]) if not b[1]]
    return {"image_s": min(per_image), "step_s": statistics.median(steps) if steps else float("nan")}, result


def time_runtime(engines, image, args, tile):
    from deedsr.runtime.upscaler import Upscaler

    upscaler = Upscaler.from_engine_dir(engines, backend="ort", precision=args.precision, threads=args.threads)
    backend = upscaler.backend
    inner = backend.run_raw
    graph_time = [0.0]
    sampling_start = (0.0, 0.0)

    def timed_run(graph, feeds, outputs=None):
        nonlocal sampling_start
        t0 = time.perf_counter()
        try:
            return inner(graph, feeds, outputs)
        finally:
            t1 = time.perf_counter()
            graph_time[0] += t1 - t0
            if graph == "vae_encoder":
                sampling_start = (t1, graph_time[0])  # the last per-image graph before the first step

    backend.run_raw = timed_run
    t0 = time.perf_counter()
    backend.preload()
    load_s = time.perf_counter() - t0
    upscaler.upscale(image, seed=args.seed, steps=1, noise_guidance_steps=(), tile=tile)  # warm-up
    per_image, walls, graphs, guided_walls, result = [], [], [], [], None
    for _ in range(args.runs):
        marks = []
        start = time.perf_counter()
        result = upscaler.upscale(image, seed=args.seed, steps=args.steps, tile=tile,
                                  callback=lambda info: marks.append((time.perf_counter(), graph_time[0], info.guided)))
        per_image.append(time.perf_counter() - start)
        previous = sampling_start  # (time, graph time) when the encoder returned
        for now, graph, guided in marks:
            wall = now - previous[0]
            if guided:
                guided_walls.append(wall)
            else:
                walls.append(wall)
                graphs.append(graph - previous[1])
            previous = (now, graph)
    overhead = [w - g for w, g in zip(walls, graphs)]
    return {
        "image_s": min(per_image),
        "step_s": statistics.median(walls) if walls else float("nan"),
        "graph_s": statistics.median(graphs) if graphs else float("nan"),
        "overhead_s": statistics.median(overhead) if overhead else float("nan"),
        "guided_step_s": statistics.median(guided_walls) if guided_walls else float("nan"),
        "load_s": load_s,
        "backend": backend.describe(),
    }, result


def cold_start(engines, args, tile):
    """Fresh interpreters: import + open (sessions are created lazily), and the CLI to its output."""
    code = ("import time; t = time.perf_counter(); from deedsr.runtime import Upscaler; "
            f"u = Upscaler.from_engine_dir({str(engines)!r}, backend='ort', precision={args.precision!r}, "
            f"threads={args.threads}); print(time.perf_counter() - t)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    open_process_s = time.perf_counter() - t0
    open_s = float(out.stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.png"
        Image.fromarray(test_image(args.size)).save(src)
        cmd = [sys.executable, "-m", "deedsr.cli", "upscale", str(src), "-o", str(Path(tmp) / "out"),
               "--engines", str(engines), "--backend", "ort", "--precision", args.precision,
               "--threads", str(args.threads), "--steps", str(args.steps), "--seed", str(args.seed)]
        if tile:
            cmd += ["--tile", str(tile)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        cli_s = time.perf_counter() - t0
    return {"open_s": open_s, "open_process_s": open_process_s, "cli_s": cli_s}


def peak_rss(mode: str, args, engines) -> float:
    """GiB; the child runs one upscale (after loading) and exits; a wrapper reads RUSAGE_CHILDREN."""
    child = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--engines", str(engines),
             "--preset", args.preset, "--size", str(args.size), "--steps", str(args.steps),
             "--threads", str(args.threads), "--precision", args.precision, "--seed", str(args.seed),
             "--modulation-std", str(args.modulation_std)] + (["--tile", str(args.tile)] if args.tile else [])
    wrapper = ("import resource, subprocess, sys; "
               "r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if r.returncode == 0 else -1)")
    out = subprocess.run([sys.executable, "-c", wrapper, *child], capture_output=True, text=True, check=True)
    kib = int(out.stdout.strip().splitlines()[-1])
    return kib / 2**20 if kib >= 0 else float("nan")


def run_child(args) -> None:
    image = test_image(args.size)
    if args.child == "reference":
        import torch

        from deedsr.pipeline import DeeDSRPipeline

        torch.set_num_threads(args.threads)
        DeeDSRPipeline(build_model(args.preset, args.modulation_std))(image, seed=args.seed, steps=args.steps,
                                                                     tile=args.tile)
    else:
        from deedsr.runtime.upscaler import Upscaler

        Upscaler.from_engine_dir(args.engines, backend="ort", precision=args.precision,
                                 threads=args.threads).upscale(image, seed=args.seed, steps=args.steps, tile=args.tile)


# ------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["tiny", "sd21-base"], default="tiny")
    parser.add_argument("--size", type=int, default=128, help="LR side in pixels (the output is 4x)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--tile", type=int, help="latent tile (default: the engines')")
    parser.add_argument("--engines", help="engine directory to use instead of exporting one")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modulation-std", type=float, default=0.01)
    parser.add_argument("--skip-rss", action="store_true", help="skip the peak-RSS child processes")
    parser.add_argument("--child", choices=["reference", "runtime"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args)

    model = build_model(args.preset, args.modulation_std)
    engines, same_weights = engine_dir(args, model)
    manifest = json.loads((Path(engines) / "manifest.json").read_text())
    tile = args.tile or manifest["sampler"]["tile"]
    args.tile = tile
    image = test_image(args.size)

    runtime_stats, runtime_out = time_runtime(engines, image, args, tile)
    reference_stats, reference_out = time_reference(model, image, args, tile)
    del model
    cold = cold_start(engines, args, tile)
    rss = {} if args.skip_rss else {m: peak_rss(m, args, engines) for m in ("reference", "runtime")}

    diff = int(np.abs(runtime_out.astype(int) - reference_out.astype(int)).max()) if same_weights else None
    r, t = reference_stats, runtime_stats
    rows = [
        ("preset / LR size / steps / threads", f"{args.preset} / {args.size}x{args.size} / {args.steps} / {args.threads}"),
        ("runtime backend", t["backend"]),
        ("reference s/image", f"{r['image_s']:.3f}"),
        ("runtime s/image", f"{t['image_s']:.3f}"),
        ("runtime / reference (target <= 0.8)", f"{t['image_s'] / r['image_s']:.3f}"),
        ("reference s/step (model steps)", f"{r['step_s']:.4f}"),
        ("runtime s/step (model steps)", f"{t['step_s']:.4f}"),
        ("runtime graph calls s/step", f"{t['graph_s']:.4f}"),
        ("runtime outside graph calls s/step", f"{t['overhead_s']:.5f}"),
        ("runtime Python overhead % of step (target < 1)", f"{100 * t['overhead_s'] / t['step_s']:.2f}"),
        ("runtime noise-guided step s", f"{t['guided_step_s']:.5f}"),
        ("runtime session load s (all graphs)", f"{t['load_s']:.3f}"),
        ("import + open Upscaler s (in process; target < 0.5)", f"{cold['open_s']:.3f}"),
        ("python -c import + open s (with interpreter)", f"{cold['open_process_s']:.3f}"),
        ("`deedsr upscale` cold start to output s", f"{cold['cli_s']:.3f}"),
    ]
    if rss:
        rows += [("reference peak RSS GiB", f"{rss['reference']:.2f}"), ("runtime peak RSS GiB", f"{rss['runtime']:.2f}")]
    rows.append(("max abs pixel diff runtime vs reference", "n/a (other weights)" if diff is None else str(diff)))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


if __name__ == "__main__":
    main()
