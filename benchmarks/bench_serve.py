"""Load on `deedsr serve` (Triton through PyTriton): requests/s, p50 and p99 latency and failures
at several client concurrencies, for each Triton max batch size.

    # the serve environment (PyTriton needs numpy < 2); engines: the demo checkpoint at 128 px
    deedsr-export --checkpoint deedsr/assets/demo --out /tmp/demo-128 --max-size 128 --precision fp32
    .venv-serve/bin/python benchmarks/bench_serve.py --engines /tmp/demo-128 --size 64 --steps 10

For every --max-batch a fresh `deedsr serve` process is started on free loopback ports (the
clients run in this process, one PyTriton ModelClient per thread, so they do not share the
server's interpreter). Each concurrency level sends --requests requests (default: 4 per client)
of the bundled astronaut resized to --size, seeds 0..3 in turn, after two warm-up requests; every
result is compared byte for byte with the local Upscaler's for its seed ("wrong" counts the
differences). p99 of a few dozen samples is close to the maximum: read it as such. The machine's
load average is printed next to each row because other work on the machine moves these numbers.
"""
from __future__ import annotations

import argparse
import os
import signal
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
SEEDS = 4


def start_server(args, max_batch: int, log_path: Path):
    from deedsr.runtime.serve import free_ports, wait_until_ready

    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "deedsr.cli", "serve", "--engines", args.engines, "--backend", "ort",
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--max-batch", str(max_batch), "--instances", str(args.instances),
           "--queue-delay-us", str(args.queue_delay_us)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{http}"
    try:
        wait_until_ready(url, timeout_s=180)
    except TimeoutError:
        stop_server(proc)
        raise SystemExit("the server did not start:\n" + log_path.read_text()[-3000:])
    return proc, url, metrics


def stop_server(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def batches_run(metrics_port: int) -> tuple[float, float]:
    """(requests, model executions) Triton has counted for the model so far."""
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()

    def value(name):
        found = re.search(rf'^{name}{{model="deedsr",version="1"}} (\S+)$', text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    return value("nv_inference_count"), value("nv_inference_exec_count")


def run_level(url: str, image: np.ndarray, expected: list[np.ndarray], steps: int, concurrency: int,
              requests: int) -> dict:
    from deedsr.runtime.remote import RemoteUpscaler

    latencies: list[float] = []
    failures: list[str] = []
    wrong = 0
    lock = threading.Lock()
    counter = iter(range(requests))
    clients = [RemoteUpscaler(url) for _ in range(concurrency)]  # connected before the clock starts

    def worker(client):
        nonlocal wrong
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            started = time.perf_counter()
            try:
                result = client.upscale(image, seed=i % SEEDS, steps=steps)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    failures.append(f"{type(e).__name__}: {e}")
                continue
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                wrong += not np.array_equal(result, expected[i % SEEDS])

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    for c in clients:
        c.close()
    ms = np.array(latencies) * 1000
    return {
        "rps": len(latencies) / wall,
        "p50": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p99": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "ok": len(latencies), "failures": len(failures), "wrong": wrong, "errors": failures[:3],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", help="engine directory (default: the built demo engines)")
    parser.add_argument("--size", type=int, default=64, help="LR side in pixels")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated client counts")
    parser.add_argument("--max-batch", default="1,4", help="comma-separated Triton max batch sizes")
    parser.add_argument("--requests", type=int, help="requests per level (default: 4 per client)")
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--threads", type=int, help="onnxruntime threads per instance (default: one per core)")
    parser.add_argument("--queue-delay-us", type=int, default=0)
    args = parser.parse_args(argv)

    from deedsr.runtime.demo import built_demo_engine_dir
    from deedsr.runtime.upscaler import Upscaler

    if args.engines is None:
        demo = built_demo_engine_dir()
        if demo is None:
            raise SystemExit("no engines: pass --engines DIR or run `deedsr demo` once")
        args.engines = str(demo)
    image = np.asarray(Image.open(ASSET).convert("RGB").resize((args.size, args.size), Image.BICUBIC))
    local = Upscaler.from_engine_dir(args.engines, backend="ort", threads=args.threads)
    expected = [local.upscale(image, seed=s, steps=args.steps) for s in range(SEEDS)]
    local.close()
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"# deedsr serve load: {args.engines}, LR {args.size}x{args.size}, {args.steps} steps, "
          f"{args.instances} instance(s), threads {args.threads or 'default'}, queue delay {args.queue_delay_us} us, "
          f"{os.cpu_count()} CPUs")
    print("| max batch | clients | requests | req/s | p50 ms | p99 ms | failures | wrong | mean batch | load avg (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        for max_batch in [int(b) for b in args.max_batch.split(",")]:
            log = Path(tmp) / f"serve-b{max_batch}.log"
            proc, url, metrics_port = start_server(args, max_batch, log)
            try:
                run_level(url, image, expected, args.steps, 1, 2)  # warm-up: sessions, first-call costs
                for concurrency in levels:
                    n = args.requests or 4 * concurrency
                    count0, exec0 = batches_run(metrics_port)
                    row = run_level(url, image, expected, args.steps, concurrency, n)
                    count1, exec1 = batches_run(metrics_port)
                    mean_batch = (count1 - count0) / max(exec1 - exec0, 1)
                    print(f"| {max_batch} | {concurrency} | {n} | {row['rps']:.2f} | {row['p50']:.0f} | "
                          f"{row['p99']:.0f} | {row['failures']} | {row['wrong']} | {mean_batch:.2f} | "
                          f"{os.getloadavg()[0]:.1f} |", flush=True)
                    for error in row["errors"]:
                        print(f"  error: {error}", file=sys.stderr)
            finally:
                code = stop_server(proc)
            if code != 0:
                print(f"  the server exited {code}:\n{log.read_text()[-3000:]}", file=sys.stderr)


if __name__ == "__main__":
    main()
