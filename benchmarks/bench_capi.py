"""libdeedsr on this machine: the build time, the time to the first open (interpreter start,
imports, graph loading) and images/s when 1, 2 and 4 host threads share one upscaler, against
the Python API in this process on the same engine directory, image, seed and steps.

    python benchmarks/bench_capi.py --engines DIR [--size 32x24] [--steps 3] [--images 4]

The C side is examples/cpp/upscale.cpp (the RAII wrapper over deedsr.h) run with a clean
environment; each thread upscales --images images after one untimed warm-up image. --engines
defaults to the demo engine directory (exported once into the cache when missing).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ASSET = ROOT / "runtime" / "assets" / "astronaut_lr.png"


def python_images_per_second(engines: Path, image: np.ndarray, steps: int, threads: int, images: int) -> float:
    from deedsr.runtime import Upscaler

    up = Upscaler.from_engine_dir(engines, backend="auto")
    up.upscale(image, seed=0, steps=steps)  # warm-up
    def work(t):
        for _ in range(images):
            up.upscale(image, seed=t, steps=steps)
    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    started = time.perf_counter()
    for p in pool:
        p.start()
    for p in pool:
        p.join()
    return threads * images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=Path)
    parser.add_argument("--size", default="32x24", help="LR WIDTHxHEIGHT (the astronaut, resized)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--images", type=int, default=4, help="images per thread")
    parser.add_argument("--threads", default="1,2,4")
    args = parser.parse_args()
    from deedsr.runtime.capi.build import build_library

    if args.engines is None:
        from deedsr.runtime.demo import build_demo_engine_dir

        args.engines = build_demo_engine_dir()
    width, height = (int(v) for v in args.size.split("x"))
    image = np.asarray(Image.open(ASSET).convert("RGB").resize((width, height), Image.BICUBIC))
    counts = [int(t) for t in args.threads.split(",")]
    print(f"engines {args.engines}, LR {width}x{height}, {args.steps} steps, {args.images} images per thread, "
          f"{os.cpu_count()} CPUs")

    with tempfile.TemporaryDirectory(prefix="bench-capi-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        build_library(tmp / "lib")
        print(f"build_library (deedsr capi): {time.perf_counter() - started:.2f} s")
        exe = tmp / "upscale-cpp"
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "deedsr"], capture_output=True, text=True,
                               check=True, env={**os.environ, "PKG_CONFIG_PATH": str(tmp / "lib")}).stdout.split()
        subprocess.run(["g++", "-std=c++17", "-O2", str(ROOT / "examples" / "cpp" / "upscale.cpp"), "-o", str(exe),
                        *flags, "-pthread"], check=True)
        Image.fromarray(image).save(tmp / "in.ppm")
        clean = {"PATH": "/usr/bin:/bin"}
        for threads in counts:
            out = subprocess.run([str(exe), str(args.engines), str(tmp / "in.ppm"), str(tmp / "out"),
                                  "--threads", str(threads), "--steps", str(args.steps),
                                  "--images-per-thread", str(args.images), "--warmup", "1"],
                                 capture_output=True, text=True, env=clean)
            if out.returncode != 0:
                sys.exit(f"upscale-cpp failed: {out.stderr.strip()}")
            opened = re.search(r"open: ([\d.]+) s", out.stdout).group(1)
            rate = float(re.search(r"([\d.]+) images/s", out.stdout).group(1))
            print(f"C ABI      {threads} thread(s): {rate:6.2f} images/s   "
                  f"(deedsr_open, interpreter start included: {opened} s)")
    for threads in counts:
        rate = python_images_per_second(args.engines, image, args.steps, threads, args.images)
        print(f"Python API {threads} thread(s): {rate:6.2f} images/s")


if __name__ == "__main__":
    main()
