"""Measure, in this (fresh) process, what graphs of an engine directory cost in resident memory.

    python -m deedsr.runtime.memory_probe ENGINE_DIR --precision fp32 [--graph NAME --dims k=v,...]

Without --graph: opens the runtime's ORT backend, loads every graph the runtime uses and prints
{"base": RSS before loading, "resident": RSS after, "load_peak": peak RSS while loading}.
With --graph: loads that graph, resets the kernel's peak-RSS mark, runs it twice on inputs of
the given named dimensions and prints {"working": peak RSS during the runs - RSS before them}.
The export runs one such process per measurement (export/memory.py); the runtime's memory
model (memory_model.py) reads the figures back from the manifest.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .manifest import Manifest, eval_shape


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def rss() -> int:
    return _status("VmRSS")


def peak_rss() -> int:
    return _status("VmHWM")


def reset_peak() -> None:
    """Make VmHWM the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def example_feeds(manifest: Manifest, graph: str, env: dict[str, int]) -> dict[str, np.ndarray]:
    """Inputs of the right shapes; values that keep every graph finite (variances of one)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for t in manifest.graphs[graph].inputs:
        shape = eval_shape(t.shape, env)
        if t.name == "stats":
            value = np.zeros(shape, np.float32)
            value[..., 1] = 1.0
        elif t.name in ("mask", "own"):
            value = np.ones(shape, np.float32)
        elif t.name == "timestep":
            value = np.full(shape, 481.0, np.float32)
        else:
            value = rng.standard_normal(shape, dtype=np.float32)
        feeds[t.name] = value
    return feeds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deedsr.runtime.memory_probe")
    parser.add_argument("engine_dir")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--graph")
    parser.add_argument("--dims", default="", help="named dimensions, e.g. batch=1,tile_height=32,tile_width=32")
    args = parser.parse_args(argv)

    from .backends.ort import OrtBackend
    from .memory_model import runtime_graphs

    base = rss()
    manifest = Manifest.load(args.engine_dir)
    backend = OrtBackend(manifest, args.precision, args.threads)
    if args.graph is None:
        reset_peak()
        for graph in runtime_graphs(manifest, args.precision, backend.use_denoiser):
            backend.session(graph)
        print(json.dumps({"base": base, "resident": rss(), "load_peak": peak_rss()}))
        return 0
    env = {k: int(v) for k, v in (kv.split("=") for kv in args.dims.split(",") if kv)}
    backend.session(args.graph)
    feeds = backend.cast_inputs(args.graph, example_feeds(manifest, args.graph, env))
    before = rss()
    reset_peak()
    for _ in range(2):
        backend.run_raw(args.graph, feeds, None)
    print(json.dumps({"working": peak_rss() - before}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
