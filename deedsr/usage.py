"""What `deedsr upscale` settles before it processes any image: where every output goes, that
the output folder can be written, and the options and environment that cannot work.

Output names (docs in README "Command line"):
- `-o DIR`: each input INPUT becomes DIR/<stem>.png. When several inputs have the same stem
  (`a/x.png b/x.png`, `x.png x.jpg`) the first, in the order given, keeps `<stem>.png` and each
  later one gets the first free `<stem>-1.png`, `<stem>-2.png`, ... (a name no other input of the
  batch maps to). Two inputs never write the same file, with or without --overwrite.
- `-o NAME.png` with exactly one input writes that file; with more inputs it is refused, and a
  name with another image suffix (`-o out.jpg`) is refused because outputs are PNG. An existing
  folder is always a folder, whatever its name.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .runtime.images import IMAGE_SUFFIXES



class OutputError(ValueError):
    """An output that cannot be written; one line."""


def wants_single_file(output: Path) -> bool:
    """`-o result.png` (an image suffix, not an existing folder) names a file, not a folder."""
    return output.suffix.lower() in IMAGE_SUFFIXES and not output.is_dir()


def plan_outputs(inputs: list[Path], output: Path) -> dict[Path, Path]:
    """Input -> output file for a batch, distinct for every input (see the module docstring)."""
    if wants_single_file(output):
        if output.suffix.lower() != ".png":
            raise OutputError(f"-o {output}: outputs are PNG; name the file .png or give a folder")
        if len(inputs) != 1:
            raise OutputError(f"-o {output} names one file but there are {len(inputs)} inputs; give a folder")
        return {inputs[0]: output}
    taken = {}
    for path in inputs:  # every first occurrence keeps its own stem
        taken.setdefault(path.stem, path)
    names = set(taken)
    plan = {}
    for path in inputs:
        if taken[path.stem] is path:
            plan[path] = output / f"{path.stem}.png"
            continue
        n = 1
        while f"{path.stem}-{n}" in names:
            n += 1
        names.add(f"{path.stem}-{n}")
        plan[path] = output / f"{path.stem}-{n}.png"
    return plan


def prepare_folder(folder: Path) -> None:
    """Create `folder` if needed and prove a file can be written there (root ignores mode bits,
    so a real write is the only honest test)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{folder}: exists and is not a folder") from None
    except NotADirectoryError:
        raise OutputError(f"{folder}: cannot be created, a part of the path is a file") from None
    except OSError as e:
        raise OutputError(f"{folder}: cannot be created ({e.strerror or e})") from None
    if not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".deedsr-probe.{os.getpid()}-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{folder}: cannot write there ({e.strerror or e})") from None
