"""Two ranks on CPU (gloo) launched by torchrun: both ranks must hold identical weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image
from skimage import data


def _photos(folder: Path) -> None:
    folder.mkdir()
    for name in ("coffee", "rocket", "astronaut", "chelsea"):
        img = getattr(data, name)()
        h, w = img.shape[:2]
        Image.fromarray(img[h // 2 - 32 : h // 2 + 32, w // 2 - 32 : w // 2 + 32]).save(folder / f"{name}.png")


def test_two_ranks_agree_stage1(tmp_path):
    photos = tmp_path / "photos"
    _photos(photos)
    out = tmp_path / "run"
    config = tmp_path / "stage1.toml"
    config.write_text(
        f"""
[stage1]
model = "tiny"
out_dir = "{out}"
batch_size = 8          # 4 per rank
queue_size = 16         # rolls over at step 2
patch_size = 8
max_steps = 3
save_every = 3
log_every = 1
progress = false
device = "cpu"
[stage1.data]
folders = ["{photos}"]
gt_size = 64
repeat = 2
num_workers = 0
"""
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "deedsr.train", "stage1", "--config", str(config)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    replicas = json.loads((out / "replicas.json").read_text())
    assert replicas["step"] == 3 and len(replicas["digests"]) == 2
    assert replicas["digests"][0] == replicas["digests"][1]
    assert (out / "learner" / "learner.safetensors").is_file()
    lines = [json.loads(s) for s in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
