"""Remove the temporaries a killed run of this tool left behind, and nothing else.

Every temporary our writers make carries the writer's PID in its name: `deedsr upscale`'s
`.<stem>.<pid>-XXXXXXXX.png.tmp` beside an output (runtime/images.py `write_png`) and
`deedsr-export`'s `.<name>.tmp-<pid>-XXXXXXXX` / `.<name>.old-<pid>` folders beside an engine
directory. One is stale when that process is gone, or when the PID now belongs to a process that
started after the temporary was last written (the PID was reused). Only names of exactly these
forms, owned by the current user, that are not symlinks, are removed; a temporary of a live run
is never touched.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PNG_TMP = re.compile(r"\..+\.(?P<pid>\d+)-[A-Za-z0-9_]{6,}\.png\.tmp")


def export_tmp_pattern(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(name)}\.(?:tmp-(?P<pid>\d+)-[A-Za-z0-9_]{{6,}}|old-(?P<old>\d+))")


def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch); None when unknown (no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat(5), counted after the ")" of the command name
        boot = _boot_time()
        return None if boot is None else boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def is_stale(pid: int, mtime: float) -> bool:
    """True when the process that wrote a temporary (last written at `mtime`) is gone."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    except OSError:
        return False
    started = process_start(pid)
    return started is not None and mtime < started - 1.0  # the PID was reused by a later process


def _candidates(folder: Path, pattern: re.Pattern):
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not m:
            continue
        pid = int(next(g for g in m.groups() if g is not None))
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid():
            continue
        if is_stale(pid, st.st_mtime):
            yield Path(entry.path), st


def remove_stale_pngs(folder: str | Path) -> list[Path]:
    """Remove `.*.<pid>-*.png.tmp` files of dead writers in `folder`; returns what was removed."""
    removed = []
    for path, st in _candidates(Path(folder), PNG_TMP):
        if not stat.S_ISREG(st.st_mode):
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError as e:
            log.info("cannot remove stale %s (%s)", path, e)
    if removed:
        log.info("removed %d stale temporary file(s) in %s", len(removed), folder)
    return removed


def remove_stale_exports(out: str | Path) -> list[Path]:
    """Remove `.<name>.tmp-<pid>-*` and `.<name>.old-<pid>` folders of dead exports beside `out`
    (an `.old-` folder is renamed back to `out` when the export died before replacing it)."""
    out = Path(out)
    removed = []
    for path, st in _candidates(out.parent, export_tmp_pattern(out.name)):
        if not stat.S_ISDIR(st.st_mode):
            continue
        if ".old-" in path.name and not os.path.lexists(out):
            # killed between moving the previous directory aside and renaming the new one in
            os.replace(path, out)
            log.info("restored %s from %s", out, path)
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    if removed:
        log.info("removed %d stale temporary folder(s) beside %s", len(removed), out)
    return removed
