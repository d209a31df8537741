import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from deedsr.export import trt_ops
from deedsr.export.engine_dir import ExportError, export_engine_dir
from deedsr.export.graphs import graph_specs

GRAPHS = ["degradation_learner", "vae_encoder", "adapter", "unet", "vae_decoder", "denoiser", "vae_encoder_tiled",
          "vae_decoder_tiled"]


@pytest.fixture(scope="module")
def manifest(tiny_engine_dir):
    return json.loads((tiny_engine_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def specs(tiny_model):
    return {s.name: s for s in graph_specs(tiny_model, fuse_denoiser=True)}


def session(engine_dir, manifest, name, precision):
    path = engine_dir / manifest["graphs"][name]["precisions"][precision]["file"]
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_both(engine_dir, manifest, spec, precision, batch, height, width, seed=0):
    torch.manual_seed(seed)
    example = spec.example(batch, height, width)
    with torch.no_grad():
        ref = spec.module(*example)
    ref = ref if isinstance(ref, tuple) else (ref,)
    feeds = {name: t.numpy() for (name, _), t in zip(spec.inputs, example)}
    got = session(engine_dir, manifest, spec.name, precision).run([n for n, _ in spec.outputs], feeds)
    return [r.numpy() for r in ref], got


SIZES = {  # two spatial sizes per graph, in the graph's own dims, inside the exported ranges
    "degradation_learner": [(24, 40), (64, 48)],
    "vae_encoder": [(64, 96), (128, 64)],
    "vae_decoder": [(8, 16), (24, 16)],
    "adapter": [(16, 16), (8, 16)],
    "unet": [(16, 16), (16, 8)],
    "denoiser": [(16, 16), (8, 8)],
    "vae_encoder_tiled": [(8, 16), (24, 16)],  # latent windows; one tile per call
    "vae_decoder_tiled": [(8, 16), (24, 16)],
}


@pytest.mark.parametrize("name", GRAPHS)
def test_fp32_graph_matches_pytorch(tiny_engine_dir, manifest, specs, name):
    for height, width in SIZES[name]:
        refs, gots = run_both(tiny_engine_dir, manifest, specs[name], "fp32", 2, height, width)
        for (out_name, _), ref, got in zip(specs[name].outputs, refs, gots):
            assert got.shape == ref.shape, out_name
            err = np.abs(got - ref).max()
            bound = 1e-4 * np.abs(ref).max()
            print(f"fp32 {name}.{out_name} {height}x{width}: max abs err {err:.2e} (bound {bound:.2e})")
            assert err <= bound, (out_name, err, bound)


@pytest.mark.parametrize("name", GRAPHS)
def test_fp16_graph_close_to_fp32_reference(tiny_engine_dir, manifest, specs, name):
    height, width = SIZES[name][0]
    refs, gots = run_both(tiny_engine_dir, manifest, specs[name], "fp16", 2, height, width)
    for (out_name, _), ref, got in zip(specs[name].outputs, refs, gots):
        assert np.isfinite(got).all(), out_name
        ref, got = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
        cosine = ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got) + 1e-30)
        print(f"fp16 {name}.{out_name}: cosine {cosine:.6f}, max abs err {np.abs(ref - got).max():.2e}")
        assert cosine >= 0.999, (out_name, cosine)


def test_split_path_equals_fused_denoiser(tiny_engine_dir, manifest, specs):
    torch.manual_seed(3)
    x_t, t, z_lr, *conds = specs["denoiser"].example(2, 16, 16)
    names = manifest["conditions"]
    cond_feeds = {n: c.numpy() for n, c in zip(names, conds)}
    adapter = session(tiny_engine_dir, manifest, "adapter", "fp32")
    local_and_tokens = adapter.run(None, {"z_lr": z_lr.numpy(), "timestep": t.numpy(), **cond_feeds})
    unet_feeds = {o.name: v for o, v in zip(adapter.get_outputs(), local_and_tokens)}
    split = session(tiny_engine_dir, manifest, "unet", "fp32").run(
        ["eps"], {"x_t": x_t.numpy(), "timestep": t.numpy(), **unet_feeds})[0]
    fused = session(tiny_engine_dir, manifest, "denoiser", "fp32").run(
        ["eps"], {"x_t": x_t.numpy(), "timestep": t.numpy(), "z_lr": z_lr.numpy(), **cond_feeds})[0]
    np.testing.assert_allclose(split, fused, rtol=0, atol=1e-5 * np.abs(split).max())


def test_learner_graph_outputs_the_per_image_conditions(tiny_engine_dir, manifest, tiny_model):
    lr = torch.rand(1, 3, 32, 32)
    outs = session(tiny_engine_dir, manifest, "degradation_learner", "fp32").run(None, {"lr": lr.numpy()})
    with torch.no_grad():
        d = tiny_model.learner(lr)
        conds = tiny_model.adapter.condition(d)
    assert len(outs) == 1 + len(manifest["conditions"]) == 17
    for got, ref in zip(outs[1:], conds):
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-5)
    # the per-step adapter graph never sees the degradation vector
    inputs = [i["name"] for i in manifest["graphs"]["adapter"]["inputs"]]
    assert "degradation" not in inputs and inputs[:2] == ["z_lr", "timestep"]


def test_manifest_describes_every_graph(tiny_engine_dir, manifest):
    assert manifest["schema"] == "deedsr-engine" and manifest["schema_version"] == 1
    assert manifest["opset"] == 17
    assert manifest["scheduler"]["alphas_cumprod"][0] == pytest.approx(1 - 0.00085)
    assert len(manifest["scheduler"]["alphas_cumprod"]) == 1000
    assert manifest["dims"]["tile_height"] == {"min": 8, "opt": 16, "max": 16}
    assert manifest["dims"]["lr_width"] == {"min": 16, "opt": 32, "max": 128}
    # an LR side of 128 pads to 144 under reference-code when the other side needs padding
    assert manifest["dims"]["image_width"] == {"min": 64, "opt": 128, "max": 576}
    assert manifest["dims"]["latent_width"] == {"min": 8, "opt": 16, "max": 72}
    assert manifest["sampler"]["profile"] == "paper"
    assert [o["name"] for o in manifest["graphs"]["vae_encoder"]["outputs"]] == ["latent", "latent_std"]
    assert set(manifest["graphs"]) == set(GRAPHS)
    for name, graph in manifest["graphs"].items():
        for precision, entry in graph["precisions"].items():
            path = tiny_engine_dir / entry["file"]
            model = onnx.load(str(path))
            assert entry["operators"] == sorted({n.op_type for n in model.graph.node})
            assert not trt_ops.unsupported(entry["operators"])
            assert {i.name for i in model.graph.input} == {i["name"] for i in graph["inputs"]}
            assert entry["bytes"] == path.stat().st_size
            onnx.checker.check_model(str(path), full_check=True)
            assert set(entry["dtypes"].values()) == {"float32"}  # fp16 graphs keep fp32 I/O
    fp32 = tiny_engine_dir / manifest["graphs"]["unet"]["precisions"]["fp32"]["file"]
    fp16 = tiny_engine_dir / manifest["graphs"]["unet"]["precisions"]["fp16"]["file"]
    assert fp16.stat().st_size < 0.6 * fp32.stat().st_size


def test_da_convolution_is_not_a_batch_grouped_conv(tiny_engine_dir, manifest):
    # TensorRT needs convolution weights to be initializers; a per-sample kernel must not be one.
    model = onnx.load(str(tiny_engine_dir / manifest["graphs"]["adapter"]["precisions"]["fp32"]["file"]))
    initializers = {i.name for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(n.input[1] in initializers for n in convs)


@pytest.mark.parametrize("name", ["adapter", "unet", "vae_decoder"])
def test_attention_exports_as_softmax_of_a_scaled_matmul(tiny_engine_dir, manifest, name):
    # No N x N tensor of zeros added to the scores (diffusers' baddbmm form), no shape-derived
    # scale: every Softmax reads a MatMul of the (constant-)scaled query and key.
    model = onnx.load(str(tiny_engine_dir / manifest["graphs"][name]["precisions"]["fp32"]["file"]))
    producer = {o: n for n in model.graph.node for o in n.output}
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert softmaxes
    assert all(producer[n.input[0]].op_type == "MatMul" for n in softmaxes)


def test_fp16_keeps_fp32_islands(tiny_engine_dir, manifest):
    model = onnx.load(str(tiny_engine_dir / manifest["graphs"]["unet"]["precisions"]["fp16"]["file"]))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    for node in model.graph.node:
        if node.op_type in ("Softmax", "InstanceNormalization", "Sin", "Cos"):
            for name in node.input[:1]:
                if name in types:
                    assert types[name] == onnx.TensorProto.FLOAT, (node.op_type, name)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)


def test_export_refuses_bad_requests(tiny_model, tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(ExportError, match="exists; pass --force"):
        export_engine_dir(tiny_model, tmp_path / "exists")
    with pytest.raises(ExportError, match="opset 18 is not supported"):
        export_engine_dir(tiny_model, tmp_path / "x", opset=18)
    with pytest.raises(ExportError, match="tile must be a multiple of 8"):
        export_engine_dir(tiny_model, tmp_path / "x", tile=12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "deedsr.export.cli", *args], capture_output=True, text=True)


def test_cli_bad_checkpoints_are_one_line_errors(tiny_model, tmp_path):
    corrupt = tmp_path / "corrupt"
    tiny_model.save_pretrained(corrupt)
    (corrupt / "unet.safetensors").write_bytes(b"\0" * 64)
    proc = cli("--checkpoint", str(corrupt), "--out", str(tmp_path / "e"))
    assert proc.returncode == 2 and "unet.safetensors: unreadable" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "e").exists()
    # a config that does not match its tensors
    mismatched = tmp_path / "mismatched"
    tiny_model.save_pretrained(mismatched)
    meta = json.loads((mismatched / "config.json").read_text())
    meta["config"]["modulation_hidden"] = 8
    (mismatched / "config.json").write_text(json.dumps(meta))
    proc = cli("--checkpoint", str(mismatched), "--out", str(tmp_path / "e"))
    assert proc.returncode == 2 and "has shape" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("--preset", "tiny", "--checkpoint", str(mismatched), "--out", str(tmp_path / "e"))
    assert proc.returncode == 2 and "exactly one of" in proc.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_cli_read_only_destination(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    proc = cli("--preset", "tiny", "--precision", "fp32", "--out", str(ro / "e"))
    assert proc.returncode == 1 and "cannot write" in proc.stderr
    assert list(ro.iterdir()) == []


def test_cli_unwritable_destination_leaves_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = cli("--preset", "tiny", "--precision", "fp32", "--out", str(blocker / "e"))
    assert proc.returncode == 1 and "cannot write" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_engine_directory_is_readable_by_others(tiny_engine_dir):
    modes = {p.relative_to(tiny_engine_dir): p.stat().st_mode & 0o777 for p in [tiny_engine_dir, *tiny_engine_dir.rglob("*")]}
    assert all(m in (0o755, 0o644) for m in modes.values()), modes


def test_graphs_over_the_protobuf_limit_are_streamed_and_equal(tiny_model, tiny_engine_dir, manifest, specs,
                                                                tmp_path, monkeypatch):
    """What the sd21-base UNet does (3.5 GB of weights), forced on the tiny adapter and UNet
    with a lower limit: weights in one <name>.onnx.data file per precision, fp16 cast tensor by
    tensor, and the same weights and outputs as the in-memory path."""
    from onnx.numpy_helper import to_array

    from deedsr.export import onnx_io

    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 2**26 + 3_000_000)  # the UNet (10 MB) over, the learner under
    out = export_engine_dir(tiny_model, tmp_path / "streamed", tile=16, min_size=16, max_size=128, max_batch=4)
    streamed = json.loads((out / "manifest.json").read_text())
    for precision in ("fp32", "fp16"):
        unet = streamed["graphs"]["unet"]["precisions"][precision]
        assert unet["external_data"] == f"{precision}/unet.onnx.data" and (out / unet["external_data"]).is_file()
        assert streamed["graphs"]["degradation_learner"]["precisions"][precision]["external_data"] is None
        assert sorted(p.name for p in (out / precision).iterdir()) == sorted(
            [f"{g}.onnx" for g in streamed["graphs"]] +
            [f"{g}.onnx.data" for g, e in streamed["graphs"].items() if e["precisions"][precision]["external_data"]])
        for name in ("unet", "adapter"):
            a = onnx.load(str(out / streamed["graphs"][name]["precisions"][precision]["file"]))
            b = onnx.load(str(tiny_engine_dir / manifest["graphs"][name]["precisions"][precision]["file"]))
            wa = {t.name: to_array(t) for t in a.graph.initializer}
            wb = {t.name: to_array(t) for t in b.graph.initializer}
            assert wa.keys() == wb.keys()
            assert all(wa[k].dtype == wb[k].dtype and np.array_equal(wa[k], wb[k]) for k in wa), (name, precision)
        refs, gots = run_both(out, streamed, specs["unet"], precision, 2, 16, 16)
        _, expected = run_both(tiny_engine_dir, manifest, specs["unet"], precision, 2, 16, 16)
        assert all(np.array_equal(g, e) for g, e in zip(gots, expected))
