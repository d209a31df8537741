import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from deedsr.checkpoints import CheckpointError, save_checkpoint
from deedsr.models import DeeDSR, load_checkpoint


def test_round_trip_is_exact(tiny_model, tmp_path):
    path = save_checkpoint(tiny_model, tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == [
        "adapter.safetensors", "config.json", "learner.safetensors", "unet.safetensors", "vae.safetensors",
    ]
    loaded = DeeDSR.from_pretrained(path)
    assert loaded.config.to_dict() == tiny_model.config.to_dict()
    ref, got = tiny_model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    assert not list(tmp_path.glob(".ckpt.*")), "temporary folder left behind"


def test_missing_and_misshaped_tensors_name_the_file(tiny_model, tmp_path):
    path = save_checkpoint(tiny_model, tmp_path / "ckpt")
    file = path / "adapter.safetensors"
    state = load_file(str(file))
    key = "conv_in.weight"
    save_file({k: v for k, v in state.items() if k != key}, str(file))
    with pytest.raises(CheckpointError, match=r"adapter\.safetensors: missing tensor 'conv_in\.weight'"):
        load_checkpoint(path)
    state[key] = torch.zeros(1, 2, 3, 3)
    save_file(state, str(file))
    with pytest.raises(CheckpointError, match=r"conv_in\.weight' has shape \(1, 2, 3, 3\)"):
        load_checkpoint(path)
    file.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_checkpoint(path)
    (path / "unet.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"unet\.safetensors: missing"):
        load_checkpoint(path, components=("unet",))


def test_bad_config_files(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "deedsr-checkpoint", "version": 1, "config": {"x": 1}}))
    with pytest.raises(CheckpointError, match="unknown config keys"):
        load_checkpoint(tmp_path)


def test_untrained_weights_are_marked_through_checkpoint_and_export(tiny_model, tmp_path):
    from deedsr.runtime.demo import demo_checkpoint
    from deedsr.runtime.manifest import Manifest

    from deedsr.checkpoints import is_trained

    assert tiny_model.trained is False  # a freshly built model: no training, checkpoint or import
    path = save_checkpoint(tiny_model, tmp_path / "ckpt")
    assert json.loads((path / "config.json").read_text())["trained"] is False
    assert is_trained(path) is False and DeeDSR.from_pretrained(path).trained is False
    demo = demo_checkpoint()
    assert demo is not None and is_trained(demo) and DeeDSR.from_pretrained(demo).trained  # no mark: trained

    from deedsr.export.engine_dir import build_manifest

    data = build_manifest(tiny_model, {}, {}, 17, 16)
    assert data["model"]["trained"] is False
    manifest = Manifest.__new__(Manifest)
    manifest.model = data["model"]
    assert manifest.trained is False
    manifest.model = {"preset": "tiny"}  # directories exported before the mark: trained
    assert manifest.trained is True
