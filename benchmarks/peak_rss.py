"""Peak resident memory of a command and all its child processes together.

    python benchmarks/peak_rss.py [--every 0.05] -- deedsr-export --preset sd21-base --out /tmp/x

Polls /proc every `--every` seconds and sums VmRSS over the process tree (a child's memory
probe and the exporting parent count together: that sum is what a machine must hold). Prints
the peak of the sum, the largest single process and the wall time; exits with the command's
status. Linux only; a peak shorter than the polling interval can be missed.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(root: int) -> tuple[int, int]:
    """(sum, largest) of VmRSS over `root` and its descendants."""
    total = largest = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        rss = _rss(pid)
        total += rss
        largest = max(largest, rss)
        stack += _children(pid)
    return total, largest


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--every", type=float, default=0.05)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command after --")
    start = time.monotonic()
    proc = subprocess.Popen(command)
    peak = largest = 0
    while proc.poll() is None:
        total, big = tree_rss(proc.pid)
        peak, largest = max(peak, total), max(largest, big)
        time.sleep(args.every)
    gib = 1 << 30
    print(f"peak RSS (process tree) {peak / gib:.2f} GiB, largest process {largest / gib:.2f} GiB, "
          f"wall {time.monotonic() - start:.0f} s, exit {proc.returncode}", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
