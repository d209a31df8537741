"""The sha256 of every graph (or plan) an Upscaler will run, checked when it opens a directory.

A bit-flipped or swapped graph of the right size loads and runs and gives a wrong image, so
sizes are not enough. Hashing reads every byte (gigabytes for sd21-base), so digests are
cached in $DEEDSR_CACHE/sha256-cache.json (runtime/memory.py `cache_root`), keyed by each
file's resolved path, size, mtime_ns, ctime_ns and inode: a service that restarts does not
rehash unchanged files, and any write to a file (even one that restores its mtime, since
ctime cannot be set) makes it hashed again. The cache is written atomically (temporary file
+ rename) and a corrupt or unreadable cache is ignored (everything is hashed again).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterable

from .errors import EngineError
from .manifest import Manifest
from .memory import cache_root
from .plans import plan_records, rebuild_command

log = logging.getLogger(__name__)

CACHE_NAME = "sha256-cache.json"
CACHE_VERSION = 1
MAX_ENTRIES = 4096  # oldest dropped first; an entry is ~200 bytes
_lock = threading.Lock()


def cache_file() -> Path:
    return cache_root() / CACHE_NAME


def file_key(files: Iterable[Path]) -> str:
    """What identifies these files' contents without reading them."""
    parts = []
    for f in files:
        real = os.path.realpath(f)
        st = os.stat(real)
        parts.append(f"{real}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}")
    return "|".join(parts)


def sha256_files(files: Iterable[Path]) -> str:
    """One digest over the files' bytes in order (as the exporter computes it)."""
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _load_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("digests"), dict):
        return {}
    return {k: v for k, v in data["digests"].items() if isinstance(k, str) and isinstance(v, str)}


def _save_cache(path: Path, digests: dict[str, str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": CACHE_VERSION, "digests": digests}, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:  # a read-only cache folder costs a rehash next time, nothing else
        log.info("sha256 cache not written (%s)", e)


class DigestCache:
    """sha256 of file groups, from the cache when the files are unchanged."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_file()
        self.digests = _load_cache(self.path)
        self.changed = False
        self.hashed_bytes = 0

    def digest(self, files: list[Path]) -> str:
        key = file_key(files)
        known = self.digests.get(key)
        if known is not None:
            return known
        value = sha256_files(files)
        self.hashed_bytes += sum(os.stat(f).st_size for f in files)
        self.digests.pop(key, None)
        self.digests[key] = value
        self.changed = True
        return value

    def save(self) -> None:
        if not self.changed:
            return
        with _lock:
            merged = _load_cache(self.path)  # keep what other processes added meanwhile
            merged.update(self.digests)
            while len(merged) > MAX_ENTRIES:
                merged.pop(next(iter(merged)))
            _save_cache(self.path, merged)
        self.changed = False


def verify_graphs(manifest: Manifest, precision: str, graphs: Iterable[str], cache: DigestCache | None = None) -> int:
    """Raise EngineError unless every listed graph's files hash to manifest.json's sha256.
    Returns the bytes actually read (0 when every digest came from the cache)."""
    graphs = list(graphs)
    manifest.check_files(precision, graphs)  # missing or truncated: the cheaper, clearer message
    cache = cache or DigestCache()
    try:
        for name in graphs:
            entry = manifest.graph_file(name, precision)
            files = [entry.file] + ([entry.external_data] if entry.external_data else [])
            try:
                digest = cache.digest(files)
            except OSError as e:
                raise EngineError(f"{entry.file}: cannot be read ({e.strerror or e})") from None
            if digest != entry.sha256:
                raise EngineError(f"{entry.file}: sha256 differs from manifest.json (corrupt or replaced); "
                                  "re-export")
    finally:
        cache.save()
    return cache.hashed_bytes


def verify_plans(manifest: Manifest, graphs: Iterable[str], cache: DigestCache | None = None) -> int:
    """The TensorRT plans' sha256 against their records in manifest.json's "trt" section."""
    records = plan_records(manifest.data)
    cache = cache or DigestCache()
    try:
        for name in graphs:
            record = records.get(name, {})
            expected = record.get("sha256")
            if not expected:
                continue
            file = manifest.root / str(record.get("file", f"trt/{name}.plan"))
            try:
                digest = cache.digest([file])
            except OSError as e:
                raise EngineError(f"{file}: cannot be read ({e.strerror or e}); rebuild the plans: "
                                  f"{rebuild_command(manifest.root)}") from None
            if digest != expected:
                raise EngineError(f"{file}: sha256 differs from manifest.json (corrupt or replaced); rebuild the "
                                  f"plans: {rebuild_command(manifest.root)}")
    finally:
        cache.save()
    return cache.hashed_bytes


def verify_backend(manifest: Manifest, backend) -> int:
    """Hash what this backend runs: the plans for TensorRT, else the ONNX graphs."""
    if backend.name == "trt":
        return verify_plans(manifest, backend.graphs())
    return verify_graphs(manifest, backend.precision, backend.graphs())
