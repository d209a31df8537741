"""What the sha256 check costs when an Upscaler opens an engine directory: cold (no digest
cache: every byte read) and cached (only stat calls), and the raw hashing speed of this machine.

    python benchmarks/bench_integrity.py                   # the demo engines (`deedsr demo` builds them)
    python benchmarks/bench_integrity.py --engines DIR --precision fp16

The digest cache is a private temporary folder, so the machine's own cache is left as it is.
"Cold" still reads from the page cache when the files were read recently; the first open after
a reboot also pays the disk.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", help="engine directory (default: the built demo engines)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    from deedsr.runtime.demo import built_demo_engine_dir

    engines = Path(args.engines) if args.engines else built_demo_engine_dir()
    if engines is None:
        raise SystemExit("no demo engines: run `deedsr demo` once, or pass --engines DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["DEEDSR_CACHE"] = cache  # read by cache_root() at each call
        from deedsr.runtime.integrity import cache_file, verify_graphs
        from deedsr.runtime.manifest import Manifest

        manifest = Manifest.load(engines)
        graphs = [g for g in manifest.graphs if manifest.has_graph(g, args.precision)]
        total = sum(manifest.graph_file(g, args.precision).bytes for g in graphs)
        cold, cached = [], []
        for _ in range(args.repeat):
            cache_file().unlink(missing_ok=True)
            start = time.perf_counter()
            read = verify_graphs(manifest, args.precision, graphs)
            cold.append(time.perf_counter() - start)
            assert read == total
            start = time.perf_counter()
            read = verify_graphs(manifest, args.precision, graphs)
            cached.append(time.perf_counter() - start)
            assert read == 0
    cold_s, cached_s = statistics.median(cold), statistics.median(cached)
    print(f"{engines} ({args.precision}): {len(graphs)} graphs, {total / 1e6:.1f} MB")
    print(f"cold (no digest cache): {cold_s * 1e3:.1f} ms median of {args.repeat} "
          f"({total / cold_s / 1e6:.0f} MB/s)")
    print(f"cached:                 {cached_s * 1e3:.2f} ms median of {args.repeat}")


if __name__ == "__main__":
    main()
