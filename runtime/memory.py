"""Memory sizes (reading "8G", printing 8.0 GiB, what the process may still allocate) and the
cache folder the runtime writes to."""
from __future__ import annotations

import os
import re
from pathlib import Path

GiB = 1 << 30


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 8G, 512M)")
    value = float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " ")
    if not value < 2 ** 63:  # also inf, from hundreds of digits
        raise ValueError(f"memory size {text[:40]!r} is too large")
    return int(value)


def available_memory() -> int | None:
    """Bytes the process can still allocate: $DEEDSR_MEMORY_LIMIT, else MemAvailable, else None."""
    limit = os.environ.get("DEEDSR_MEMORY_LIMIT")
    if limit:
        return env_memory_limit()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def env_memory_limit() -> int | None:
    """$DEEDSR_MEMORY_LIMIT in bytes (None when unset); ValueError naming the variable when it
    is not a positive size, so that a command refuses it before any image."""
    text = os.environ.get("DEEDSR_MEMORY_LIMIT")
    if not text:
        return None
    try:
        value = parse_bytes(text)
    except ValueError as e:
        raise ValueError(f"DEEDSR_MEMORY_LIMIT: {e}") from None
    if value <= 0:
        raise ValueError(f"DEEDSR_MEMORY_LIMIT: must be more than 0 bytes, got {text!r}")
    return value


def human_bytes(n: int | float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def cache_root() -> Path:
    """$DEEDSR_CACHE, else $XDG_CACHE_HOME/deedsr, else ~/.cache/deedsr."""
    base = os.environ.get("DEEDSR_CACHE")
    if base:
        return Path(base).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deedsr"
