"""Full-size export figures: time, peak memory, file sizes, fp32 adapter+UNet parity, and
what moving the degradation-only work out of the per-step graph saves.

    python benchmarks/bench_export.py --preset sd21-base --out /tmp/deedsr-sd21 [--precision fp32,fp16]

Random weights (seeded): the figures do not depend on training.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn, repeat):
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="sd21-base")
    parser.add_argument("--out", required=True)
    parser.add_argument("--precision", default="fp32,fp16")
    parser.add_argument("--tile", type=int)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from deedsr.config import preset
    from deedsr.models import DeeDSR
    from deedsr.export.engine_dir import export_engine_dir

    torch.manual_seed(0)
    model = DeeDSR(preset(args.preset)).eval()
    with torch.no_grad():  # non-zero modulation, so the parity figure covers it
        for m in model.unet.modulation:
            m.gamma.weight.normal_(0, 0.01)
            m.beta.weight.normal_(0, 0.01)
    tile = args.tile or model.config.sampler.tile
    rows = {}

    # Per-step saving: adapter with precomputed conditions vs computing them every step.
    z = torch.randn(1, 4, tile, tile)
    t = torch.tensor([481.0])
    d = torch.randn(1, model.config.learner.out_dim)
    with torch.no_grad():
        conditions = model.adapter.condition(d)
        split = timed(lambda: model.adapter(z, t, conditions), args.repeat)
        whole = timed(lambda: model.adapter.forward_from_degradation(z, t, d), args.repeat)
        cond_only = timed(lambda: model.adapter.condition(d), args.repeat)
        unet_step = timed(lambda: model.denoise(torch.randn(1, 4, tile, tile), t, z, conditions), 1)
    rows["adapter step, conditions precomputed (s)"] = split
    rows["adapter step, conditions recomputed (s)"] = whole
    rows["conditions alone (s)"] = cond_only
    rows["adapter+unet step, torch (s)"] = unet_step
    cond_params = sum(p.numel() for b in model.adapter.da_blocks for n, p in b.named_parameters()
                      if not n.startswith(("conv", "da_conv1.conv", "da_conv2.conv")))
    rows["degradation-only parameters moved out of the step"] = cond_params

    start = time.perf_counter()
    out = export_engine_dir(model, args.out, precisions=tuple(args.precision.split(",")), tile=tile, force=True,
                            progress=lambda n: print(f"  exported {n} at {time.perf_counter() - start:.0f} s", flush=True))
    rows["export time (s)"] = time.perf_counter() - start
    rows["export peak RSS (GiB)"] = peak_rss_gib()
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    for name, graph in manifest["graphs"].items():
        for precision, entry in graph["precisions"].items():
            rows[f"{precision}/{name} (MB)"] = entry["bytes"] / 1e6

    # fp32 adapter -> UNet in ONNX Runtime vs PyTorch, one tile.
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads

    def session(name):
        return ort.InferenceSession(str(Path(out) / manifest["graphs"][name]["precisions"]["fp32"]["file"]),
                                    opts, providers=["CPUExecutionProvider"])

    x_t = torch.randn(1, 4, tile, tile)
    with torch.no_grad():
        ref = model.denoise(x_t, t, z, conditions).numpy()
    feeds = {n: c.numpy() for n, c in zip(manifest["conditions"], conditions)}
    adapter = session("adapter")
    locals_tokens = adapter.run(None, {"z_lr": z.numpy(), "timestep": t.numpy(), **feeds})
    unet = session("unet")
    unet_feeds = {"x_t": x_t.numpy(), "timestep": t.numpy(),
                  **{o.name: v for o, v in zip(adapter.get_outputs(), locals_tokens)}}
    got = unet.run(["eps"], unet_feeds)[0]
    rows["fp32 adapter+unet max abs err"] = float(np.abs(got - ref).max())
    rows["fp32 adapter+unet max abs err / max |ref|"] = float(np.abs(got - ref).max() / np.abs(ref).max())
    rows["ORT unet step (s)"] = timed(lambda: unet.run(["eps"], unet_feeds), 1)
    rows["peak RSS (GiB)"] = peak_rss_gib()

    print(f"\n{args.preset}, tile {tile} (latent), {args.threads} threads")
    for key, value in rows.items():
        print(f"  {key:55s} {value:.4g}" if isinstance(value, float) else f"  {key:55s} {value:,}")


if __name__ == "__main__":
    main()
