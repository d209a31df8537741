"""Runtime peak RSS against the memory model's estimate, one fresh process per image size.

    python benchmarks/bench_memory.py ENGINE_DIR [--sizes 64,128,256,512,1024,1024x768] [--steps 2]
        [--reference sd21-base]

Each size runs `Upscaler.upscale` on the astronaut photo resized to that LR size in a child
process that reports its own peak RSS (VmHWM) and wall time; the parent prints the estimate
(Upscaler.estimate_memory, made before anything is allocated), the measured peak and their
ratio. With --steps 2 one model step runs (step 0 is noise-guided), so every graph is loaded
and run. With --reference PRESET|CHECKPOINT the PyTorch reference (DeeDSRPipeline, fp32, the
same tiled VAE) upscales the same image in another fresh process, for comparison. Prints
figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
import numpy as np
from PIL import Image
from skimage import data
from deedsr.runtime.upscaler import Upscaler

engine_dir, h, w, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
lr = np.asarray(Image.fromarray(data.astronaut()).resize((w, h), Image.BICUBIC))
up = Upscaler.from_engine_dir(engine_dir, backend="ort", threads=int(threads) or None)
plan = up.plan(h, w)
start = time.perf_counter()
sr = up.upscale(lr, seed=0, steps=steps)
wall = time.perf_counter() - start
assert sr.shape == (4 * h, 4 * w, 3)
with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print(json.dumps({"estimate": plan.bytes, "vae_core": plan.vae_core, "peak": peak, "wall": wall,
                  "parts": plan.parts}))
"""

REFERENCE = r"""
import json, sys, time
import numpy as np, torch
from PIL import Image
from skimage import data
from deedsr.config import PRESETS, preset
from deedsr.models import DeeDSR, load_checkpoint
from deedsr.pipeline import DeeDSRPipeline

spec, h, w, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if threads:
    torch.set_num_threads(threads)
lr = np.asarray(Image.fromarray(data.astronaut()).resize((w, h), Image.BICUBIC))
torch.manual_seed(0)
model = DeeDSR(preset(spec)) if spec in PRESETS else load_checkpoint(spec)
start = time.perf_counter()
sr = DeeDSRPipeline(model)(lr, seed=0, steps=steps)
wall = time.perf_counter() - start
assert sr.shape == (4 * h, 4 * w, 3)
with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print(json.dumps({"peak": peak, "wall": wall}))
"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine_dir")
    parser.add_argument("--sizes", default="64,128,256,512,1024")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", help="Also append each size's raw figures to this file (JSON lines).")
    parser.add_argument("--reference", help="Also measure the PyTorch reference: a preset name or a checkpoint.")
    args = parser.parse_args()
    gib = 1 << 30
    print(f"{'LR':>10} {'x4 output':>11} {'VAE core':>8} {'estimate':>10} {'peak RSS':>10} {'est/peak':>8} {'wall':>8}"
          + (f" {'reference peak':>15} {'wall':>8}" if args.reference else ""))
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x")) if "x" in size else (int(size), int(size))
        done = subprocess.run([sys.executable, "-c", CHILD, args.engine_dir, str(h), str(w), str(args.steps),
                               str(args.threads)], capture_output=True, text=True)
        if done.returncode:
            print(f"{w}x{h}: failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"width": w, "height": h, **r}) + "\n")
        line = (f"{w}x{h:<5} {4 * w}x{4 * h:<6} {r['vae_core']:>8} {r['estimate'] / gib:>8.2f} G "
                f"{r['peak'] / gib:>8.2f} G {r['estimate'] / r['peak']:>8.2f} {r['wall']:>7.1f}s")
        if args.reference:
            ref = subprocess.run([sys.executable, "-c", REFERENCE, args.reference, str(h), str(w), str(args.steps),
                                  str(args.threads)], capture_output=True, text=True)
            if ref.returncode:
                line += f" reference failed: {(ref.stderr.strip().splitlines() or ['?'])[-1]}"
            else:
                rr = json.loads(ref.stdout.strip().splitlines()[-1])
                line += f" {rr['peak'] / gib:>13.2f} G {rr['wall']:>7.1f}s"
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps({"width": w, "height": h, "reference": args.reference, **rr}) + "\n")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
