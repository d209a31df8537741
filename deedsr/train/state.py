"""Training-state checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a folder `<out_dir>/checkpoints/step-<N>/` holding
  tensors.safetensors  every tensor: module states, optimizer states, EMA, RNG states
  state.json           the rest: step, config, fingerprints, optimizer param groups, scalars
and `<out_dir>/checkpoints/latest` names the newest complete one. Both are written to a
temporary name and renamed, so a crash at any moment leaves the last good checkpoint (and
`latest`) intact. Nothing is unpickled: nested structures are stored as JSON with tensor
placeholders.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["CheckpointStateError", "encode", "decode", "save_state", "load_state", "latest_checkpoint",
           "capture_rng", "restore_rng"]

FORMAT = "deedsr-training-state"
VERSION = 1
TENSORS = "tensors.safetensors"
STATE = "state.json"
LATEST = "latest"


class CheckpointStateError(ValueError):
    """A training checkpoint that cannot be resumed from; one line naming the file."""


# ----------------------------------------------------------------------------- encoding


def encode(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """JSON-able form of nested dicts/lists/tuples/scalars; tensors go into `tensors`."""
    if isinstance(obj, torch.Tensor):
        key = path or "root"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = path or "root"
        wide = obj.astype(np.int64 if np.issubdtype(obj.dtype, np.integer) else np.float64)
        tensors[key] = torch.from_numpy(np.ascontiguousarray(wide))
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {"__dict__": [[encode(k, tensors, f"{path}/k{i}"), encode(v, tensors, f"{path}/{_safe(k, i)}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at {path or 'root'} in a training checkpoint")


def _safe(key: Any, i: int) -> str:
    text = str(key)
    return text if text.replace("_", "").replace(".", "").isalnum() else f"i{i}"


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
        if "__dict__" in obj:
            return {decode(k, tensors): decode(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        raise ValueError(f"unexpected mapping in a training checkpoint: {sorted(obj)[:3]}")
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    return obj


# ----------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- files


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_state(root: str | Path, step: int, payload: dict[str, Any], keep_last: int = 2) -> Path:
    """Write checkpoint `step` under `root` (…/checkpoints) atomically, point `latest` at it,
    then delete all but the newest `keep_last` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        tensors: dict[str, torch.Tensor] = {}
        meta = {"format": FORMAT, "version": VERSION, "step": step, "payload": encode(payload, tensors)}
        save_file(tensors, str(tmp / TENSORS))
        (tmp / STATE).write_text(json.dumps(meta) + "\n")
        for f in (tmp / TENSORS, tmp / STATE):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(root / LATEST, name + "\n")
    kept = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in kept[:-keep_last] if keep_last > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    return path if path.is_dir() else None


def load_state(path: str | Path) -> tuple[int, dict[str, Any]]:
    """(step, payload) of a checkpoint folder (or of `latest` under a checkpoints root)."""
    path = Path(path)
    if (path / LATEST).is_file() and not (path / STATE).is_file():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointStateError(f"{path / LATEST}: names a checkpoint that does not exist")
        path = found
    state_file, tensor_file = path / STATE, path / TENSORS
    if not state_file.is_file():
        raise CheckpointStateError(f"{state_file}: missing (not a training checkpoint)")
    try:
        meta = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointStateError(f"{state_file}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointStateError(f"{state_file}: not a deedsr training checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointStateError(f"{state_file}: version {meta.get('version')}, this deedsr reads {VERSION}")
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointStateError(f"{tensor_file}: unreadable ({e})") from None
    try:
        payload = decode(meta["payload"], tensors)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointStateError(f"{state_file}: damaged ({e})") from None
    return int(meta["step"]), payload
