"""Engine-directory checks of the runtime on synthetic manifests (no export needed)."""
import json

import numpy as np
import pytest
from deedsr.runtime.errors import EngineError, ShapeError
from deedsr.runtime.manifest import Manifest, eval_dim, eval_shape
from helpers import manifest_dict, write


@pytest.fixture
def engine(tmp_path):
    root = tmp_path / "eng"
    root.mkdir()
    return write(root, manifest_dict(root))


def test_valid_manifest_loads(engine):
    m = Manifest.load(engine)
    assert m.precisions() == ["fp32"] and m.max_batch == 4
    m.check_files("fp32")
    assert m.alphas_cumprod.dtype == np.float32 and len(m.alphas_cumprod) == 1000
    assert m.latent_size(40, 48) == (24, 24)


@pytest.mark.parametrize("version", [0, 2, "1"])
def test_other_schema_version_is_refused(engine, version):
    data = json.loads((engine / "manifest.json").read_text())
    data["schema_version"] = version
    write(engine, data)
    with pytest.raises(EngineError) as e:
        Manifest.load(engine)
    shown = version if isinstance(version, int) else repr(version)
    assert str(e.value) == f"{engine}/manifest.json: schema version {shown}, this runtime reads 1"


def test_other_schema_and_broken_json(engine):
    data = json.loads((engine / "manifest.json").read_text())
    write(engine, {**data, "schema": "something-else"})
    with pytest.raises(EngineError, match="schema 'something-else', this runtime reads 'deedsr-engine'"):
        Manifest.load(engine)
    (engine / "manifest.json").write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        Manifest.load(engine)


def test_missing_directory_manifest_and_keys(tmp_path, engine):
    with pytest.raises(EngineError, match="engine directory does not exist"):
        Manifest.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match="manifest.json: missing; .* not an engine directory"):
        Manifest.load(tmp_path / "empty")
    data = json.loads((engine / "manifest.json").read_text())
    del data["dims"]
    write(engine, data)
    with pytest.raises(EngineError, match="dims is missing; re-export"):
        Manifest.load(engine)
    data = manifest_dict(engine)
    del data["graphs"]["unet"]
    write(engine, data)
    with pytest.raises(EngineError, match="graphs.unet is missing; re-export"):
        Manifest.load(engine)


def test_missing_and_truncated_graph_files(engine):
    m = Manifest.load(engine)
    (engine / "fp32" / "unet.onnx").unlink()
    with pytest.raises(EngineError, match=r"fp32/unet.onnx: missing; the engine directory is incomplete"):
        m.check_files("fp32")
    (engine / "fp32" / "unet.onnx").write_bytes(b"012")
    with pytest.raises(EngineError, match="3 bytes, manifest.json says 10"):
        m.check_files("fp32")


def test_precision_not_exported(engine):
    m = Manifest.load(engine)
    with pytest.raises(EngineError, match="no fp16 graphs \\(has fp32\\); re-export with --precision fp16"):
        m.check_precision("fp16")


def test_shape_expressions():
    env = {"batch": 2, "tile_height": 64, "tile_width": 48}
    assert eval_dim(4, env) == 4
    assert eval_dim("tile_height", env) == 64
    assert eval_dim("tile_height/8*tile_width/8", env) == 48
    assert eval_dim("tile_width/2", env) == 24
    assert eval_dim("tile_height*8", env) == 512
    assert eval_shape(["batch", 4, "tile_height/4", "tile_width/4"], env) == (2, 4, 16, 12)
    with pytest.raises(ValueError, match="not divisible"):
        eval_dim("tile_width/7", env)
    with pytest.raises(KeyError, match="lr_height"):
        eval_dim("lr_height", env)
    with pytest.raises(ValueError, match="bad shape"):
        eval_dim("tile_height+1", env)


def test_dims_out_of_range_say_what_to_do(engine):
    m = Manifest.load(engine)
    assert m.image_dims(40, 48)["latent_height"] == 24
    with pytest.raises(ShapeError) as e:
        m.image_dims(700, 300)
    assert "built for LR sides 16..512, got 700; re-export with --max-size" in str(e.value)
    with pytest.raises(ShapeError, match="LR sides 16..512, got 12; re-export with --min-size"):
        m.image_dims(40, 12)
    with pytest.raises(ShapeError, match="latent tiles up to 16, got --tile 32; use --tile 16 or less"):
        m.check_tile(32)
    with pytest.raises(ShapeError, match="multiple of 8"):
        m.check_tile(12)
    m.check_tile(16)


def test_import_runtime_pulls_in_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, deedsr.runtime, deedsr.runtime.manifest, deedsr.runtime.sampler, deedsr.cli; "
            "print(sorted(m for m in ('torch', 'diffusers', 'deedsr.models', 'deedsr.pipeline', 'deedsr.export', "
            "'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
