"""Engines stage (TensorRT plans) and the runtime's trt backend.

Without a GPU: the pure logic, on real manifests of the tiny export (`tiny_engine_dir`):
build mode from a TensorRT version, profiles from manifest ranges, the compatibility check,
plan records and their atomic manifest updates, and one-line errors when TensorRT is missing.

With an NVIDIA GPU and TensorRT (`-m gpu`, run by scripts/gpu_check.sh): plans vs ONNX Runtime
fp32 per graph (cosine >= 0.999), end-to-end PSNR >= 35 dB vs the fp32 reference, refusal of
plans from another TensorRT version, static-tile plans and CUDA graphs. These are skipped, not
faked, where TensorRT or a GPU is missing.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from deedsr.engines import records
from deedsr.engines.build import (
    BuildOptions,
    available_precisions,
    parse_bytes,
    plan_settings,
    select_graphs,
)
from deedsr.engines.errors import BuildError
from deedsr.engines.modes import (
    check_graph_version,
    choose_mode,
    parse_version,
    supports_opt_level,
)
from deedsr.engines.profiles import dims_used, plan_dims
from deedsr.runtime.errors import EngineError
from deedsr.runtime.manifest import Manifest
from deedsr.runtime.plans import GpuInfo, plan_mismatch, plan_records

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
GPU = GpuInfo("NVIDIA GeForce RTX 4090", "8.9", 24 << 30)


@pytest.fixture(scope="module")
def manifest_data(tiny_engine_dir):
    return json.loads((tiny_engine_dir / "manifest.json").read_text())


@pytest.fixture
def engine_copy(tiny_engine_dir, tmp_path):
    """A private copy of the tiny engine directory (manifest edits must not leak into other tests)."""
    return Path(shutil.copytree(tiny_engine_dir, tmp_path / "tiny"))


# ------------------------------------------------------------------------------ build mode
@pytest.mark.parametrize("version, mode, source, strongly_typed, fp16_flag", [
    ("8.5.2.2", "fp16-flag", "fp32", False, True),    # JetPack 5.1
    ("8.6.2", "fp16-flag", "fp32", False, True),      # JetPack 6.0
    ("9.3.0.1", "fp16-flag", "fp32", False, True),
    ("10.0.0b6", "strongly-typed", "fp16", True, False),
    ("10.3.0", "strongly-typed", "fp16", True, False),  # JetPack 6.1/6.2
    ("10.13.3.9", "strongly-typed", "fp16", True, False),
    ("11.0.0", "strongly-typed", "fp16", True, False),
    ("11.4.1", "strongly-typed", "fp16", True, False),
])
def test_build_mode_from_tensorrt_version(version, mode, source, strongly_typed, fp16_flag):
    m = choose_mode(version)
    assert (m.name, m.source_precision, m.plan_precision) == (mode, source, "fp16")
    assert (m.strongly_typed, m.fp16_flag) == (strongly_typed, fp16_flag)
    if parse_version(version) >= (11,):
        assert not m.fp16_flag  # the FP16 flag raises on 11


def test_build_mode_fallbacks_and_refusals():
    # 10.x with only fp32 graphs: the weak FP16 flag still exists there
    m = choose_mode("10.3.0", available=("fp32",))
    assert (m.name, m.source_precision, m.fp16_flag, m.fp32_islands) == ("fp16-flag", "fp32", True, True)
    assert not choose_mode("8.6.1", fp32_islands=False).fp32_islands
    assert choose_mode("10.3.0", "fp16-flag").fp16_flag
    fp32 = choose_mode("11.1.0", "fp32")
    assert (fp32.plan_precision, fp32.strongly_typed, fp32.fp16_flag) == ("fp32", True, False)
    assert choose_mode("8.5.2", "fp32").strongly_typed is False
    cases = [
        (("8.4.3.1",), {}, "older than 8.5"),
        (("11.0.0", "fp16-flag"), {}, "removed the FP16 builder flag"),
        (("9.3.0", "strongly-typed"), {}, "TensorRT 10 or newer"),
        (("11.0.0",), {"available": ("fp32",)}, "--precision fp32,fp16"),
        (("8.6.1",), {"available": ("fp16",)}, "--precision fp32,fp16"),
        (("10.3.0", "strongly-typed"), {"available": ("fp32",)}, "--precision fp32,fp16"),
        (("10.3.0", "int8"), {}, "unknown build mode"),
        (("banana",), {}, "cannot read a TensorRT version"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(BuildError, match=message.replace("(", r"\(").replace(".", r"\.")) as info:
            choose_mode(*args, **kwargs)
        assert "\n" not in str(info.value)


def test_version_helpers():
    assert parse_version("10.3.0.26") == (10, 3, 0, 26)
    assert parse_version("10.0.0b6") == (10, 0, 0)
    assert parse_version("8.6.1.post1") == (8, 6, 1)
    assert not supports_opt_level("8.5.2.2") and supports_opt_level("8.6.1") and supports_opt_level("11.0")


def test_graph_needing_newer_tensorrt_is_refused_with_the_fix(manifest_data):
    entry = manifest_data["graphs"]["unet"]["precisions"]["fp32"]
    assert entry["min_tensorrt"] == "8.6"  # opset 17 LayerNormalization in the transformer blocks
    with pytest.raises(BuildError, match="--trt 8.5"):
        check_graph_version("8.5.2.2", "unet", entry)
    check_graph_version("8.6.1", "unet", entry)
    check_graph_version("8.5.2.2", "vae_encoder", manifest_data["graphs"]["vae_encoder"]["precisions"]["fp32"])


# -------------------------------------------------------------------------------- profiles
def test_profiles_from_the_tiny_manifest(manifest_data):
    d, tile = manifest_data["dims"], manifest_data["sampler"]["tile"]
    c = manifest_data["image"]["latent_channels"]
    t, b = d["tile_height"], d["batch"]

    dims, profile = plan_settings(manifest_data, "unet", BuildOptions())
    assert dims["batch"] == {"min": 1, "opt": b["max"], "max": b["max"]}  # the sampler's calls carry max tiles
    assert dims["tile_height"] == {"min": t["min"], "opt": tile, "max": t["max"]}
    assert profile["x_t"] == {"min": [1, c, t["min"], t["min"]], "opt": [b["max"], c, tile, tile],
                              "max": [b["max"], c, t["max"], t["max"]]}
    assert profile["timestep"] == {"min": [1], "opt": [b["max"]], "max": [b["max"]]}
    tokens = manifest_data["graphs"]["unet"]["inputs"][2]
    assert tokens["shape"][1] == "tile_height/8*tile_width/8"
    assert profile["tokens"]["min"][1] == (t["min"] // 8) ** 2 and profile["tokens"]["max"][1] == (t["max"] // 8) ** 2
    assert profile["local_3"]["min"][2:] == [t["min"] // 8] * 2 and profile["local_1"]["opt"][2:] == [tile // 2] * 2

    # per-image graphs: one image per call, the manifest's ranges with its opt
    for graph, prefix, name, channels in (("degradation_learner", "lr", "lr", 3),
                                          ("vae_encoder", "image", "image", 3),
                                          ("vae_decoder", "latent", "latent", c)):
        dims, profile = plan_settings(manifest_data, graph, BuildOptions(static=True, max_batch=2))
        r = d[f"{prefix}_height"]
        assert dims["batch"] == {"min": 1, "opt": 1, "max": 1}
        assert profile[name] == {w: [1, channels, r[w], r[w]] for w in ("min", "opt", "max")}, graph


def test_static_tile_and_max_batch(manifest_data):
    tile, c = manifest_data["sampler"]["tile"], manifest_data["image"]["latent_channels"]
    for graph in ("adapter", "unet", "denoiser"):
        dims, profile = plan_settings(manifest_data, graph, BuildOptions(static=True, max_batch=2))
        assert dims["tile_width"] == {"min": tile, "opt": tile, "max": tile}
        assert dims["batch"]["max"] == 2
        first = next(iter(profile.values()))
        assert first["min"][1:] == first["max"][1:]  # fixed shapes but the batch
    n = manifest_data["dims"]["batch"]["max"]
    assert plan_settings(manifest_data, "adapter", BuildOptions(static=True))[1]["z_lr"] == {
        "min": [1, c, tile, tile], "opt": [n, c, tile, tile], "max": [n, c, tile, tile]}
    too_many = manifest_data["dims"]["batch"]["max"] + 1
    with pytest.raises(BuildError, match=f"--max-batch {too_many}"):
        plan_dims(manifest_data, "unet", max_batch=too_many)


def test_every_graph_input_has_a_profile_of_its_rank(manifest_data, tiny_engine_dir):
    import onnx

    for graph, spec in manifest_data["graphs"].items():
        _, profile = plan_settings(manifest_data, graph, BuildOptions())
        model = onnx.load(str(tiny_engine_dir / spec["precisions"]["fp16"]["file"]), load_external_data=False)
        inputs = {i.name: len(i.type.tensor_type.shape.dim) for i in model.graph.input}
        assert set(profile) == set(inputs), graph
        for name, rank in inputs.items():
            assert all(len(profile[name][w]) == rank for w in ("min", "opt", "max")), (graph, name)
        assert set(dims_used(manifest_data, graph)) <= set(manifest_data["dims"])


def test_unevaluable_shape_is_a_build_error(manifest_data):
    data = json.loads(json.dumps(manifest_data))
    data["dims"]["tile_height"]["min"] = 12  # 12/8 is not exact
    with pytest.raises(BuildError, match="re-export"):
        plan_settings(data, "unet", BuildOptions())


def test_graph_selection_and_sizes(tiny_engine_dir):
    m = Manifest.load(tiny_engine_dir)
    assert select_graphs(m, None) == ["degradation_learner", "vae_encoder", "adapter", "unet", "vae_decoder",
                                      "denoiser", "vae_encoder_tiled", "vae_decoder_tiled"]
    assert select_graphs(m, ("unet", "adapter")) == ["adapter", "unet"]
    with pytest.raises(BuildError, match="no graph nope"):
        select_graphs(m, ("nope",))
    assert available_precisions(m, select_graphs(m, None)) == ["fp32", "fp16"]
    assert parse_bytes("4G") == 4 << 30 and parse_bytes("512MiB") == 512 << 20 and parse_bytes(None) is None
    with pytest.raises(BuildError):
        parse_bytes("lots")


# ---------------------------------------------------------------------------- compatibility
def record_for(version="10.3.0", gpu=GPU):
    return {"tensorrt": version, "gpu": gpu.record()}


def test_plan_compatibility_check():
    assert plan_mismatch(record_for(), "10.3.0", GPU) is None
    other_version = plan_mismatch(record_for("10.3.0"), "10.8.0", GPU)
    assert "TensorRT 10.3.0" in other_version and "TensorRT 10.8.0" in other_version
    other_gpu = plan_mismatch(record_for(), "10.3.0", GpuInfo("NVIDIA H100 80GB HBM3", "9.0"))
    assert "RTX 4090 (sm 8.9)" in other_gpu and "H100 80GB HBM3 (sm 9.0)" in other_gpu
    assert plan_mismatch(record_for(), "10.3.0", GpuInfo(GPU.name, "8.6")) is not None
    assert plan_mismatch(record_for("8.5.2.2"), "8.5.2", GPU) is not None  # exact version, as TensorRT needs
    assert "does not say" in plan_mismatch({"tensorrt": "10.3.0"}, "10.3.0", GPU)
    for reason in (other_version, other_gpu):
        assert "\n" not in reason


def make_record(root: Path, graph: str, manifest_data: dict, version="10.3.0", gpu=GPU, **over):
    """A record as build.py writes it, for a plan file of arbitrary bytes (no TensorRT here)."""
    mode = choose_mode(version)
    dims, profile = plan_settings(manifest_data, graph, BuildOptions())
    plan = root / records.PLAN_DIR / f"{graph}.plan"
    plan.parent.mkdir(exist_ok=True)
    plan.write_bytes(b"not a real plan " + graph.encode())
    flags = records.build_flags(mode, static=False, opt_level=None, workspace=None, timing_cache=True)
    source = manifest_data["graphs"][graph]["precisions"][mode.source_precision]
    rec = records.plan_record(
        graph=graph, plan_file=f"trt/{graph}.plan", plan_bytes=plan.stat().st_size,
        plan_sha256=records.sha256_file(plan), tensorrt_version=version, gpu=gpu, mode=mode, source=source,
        dims=dims, profile=profile, static=False, flags=flags, io_dtypes={"x_t": "float32"}, build_seconds=1.25,
        polygraphy_version="0.53.6")
    rec.update(over)
    return rec, dict(mode=mode, source=source, profile=profile, flags=flags)


def test_plan_records_in_the_manifest(engine_copy, manifest_data):
    rec, settings = make_record(engine_copy, "unet", manifest_data)
    records.set_plan(engine_copy, "unet", rec, records.timing_cache_name("10.3.0", GPU))
    data = json.loads((engine_copy / "manifest.json").read_text())
    stored = data["trt"]["plans"]["unet"]
    assert data["trt"]["timing_cache"] == "trt/timing-10.3.0-NVIDIA-GeForce-RTX-4090-sm8.9.cache"
    for key in ("tensorrt", "gpu", "precision", "mode", "profile", "dims", "build", "source", "file", "bytes",
                "sha256", "io_dtypes", "build_seconds", "built_at", "static"):
        assert key in stored, key
    assert stored["gpu"] == {"name": GPU.name, "compute_capability": "8.9", "memory": GPU.memory}
    assert stored["precision"] == "fp16" and stored["mode"] == "strongly-typed"
    assert stored["source"] == {"precision": "fp16", "file": "fp16/unet.onnx",
                                "sha256": manifest_data["graphs"]["unet"]["precisions"]["fp16"]["sha256"]}
    assert stored["build"]["strongly_typed"] is True and stored["build"]["fp16"] is False
    assert stored["profile"]["x_t"]["max"][0] == manifest_data["dims"]["batch"]["max"]
    # everything else in the manifest is untouched, and the runtime still reads it
    assert {k: v for k, v in data.items() if k != "trt"} == manifest_data
    manifest = Manifest.load(engine_copy)
    assert plan_records(manifest.data)["unet"] == stored
    from deedsr.runtime.backends import has_plans

    assert has_plans(manifest)
    # a second plan is added beside the first
    rec2, _ = make_record(engine_copy, "adapter", manifest_data)
    records.set_plan(engine_copy, "adapter", rec2)
    assert sorted(plan_records(json.loads((engine_copy / "manifest.json").read_text()))) == ["adapter", "unet"]


def test_up_to_date_only_for_the_same_build(engine_copy, manifest_data):
    rec, s = make_record(engine_copy, "unet", manifest_data)
    same = dict(tensorrt_version="10.3.0", gpu=GPU, **s)
    assert records.up_to_date(rec, engine_copy, **same)
    assert not records.up_to_date(None, engine_copy, **same)
    assert not records.up_to_date(rec, engine_copy, **{**same, "tensorrt_version": "10.4.0"})
    assert not records.up_to_date(rec, engine_copy, **{**same, "gpu": GpuInfo("NVIDIA A100", "8.0")})
    assert not records.up_to_date(rec, engine_copy, **{**same, "flags": {**s["flags"], "static_tile": True}})
    assert not records.up_to_date(rec, engine_copy, **{**same, "source": {"sha256": "other export"}})
    (engine_copy / "trt" / "unet.plan").write_bytes(b"truncated")
    assert not records.up_to_date(rec, engine_copy, **same)


def test_manifest_update_is_atomic(engine_copy):
    before = (engine_copy / "manifest.json").read_bytes()

    def broken(data):
        data["trt"] = {"plans": {"unet": {"oops": object()}}}  # not JSON: fails while serialising

    with pytest.raises(TypeError):
        records.update_manifest(engine_copy, broken)
    assert (engine_copy / "manifest.json").read_bytes() == before
    assert not [p for p in engine_copy.iterdir() if p.name.startswith(".")]

    target = engine_copy / "trt" / "unet.plan"

    def half_written(tmp):
        tmp.write_bytes(b"partial plan")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        records.write_atomic(target, half_written)
    assert not target.exists() and list((engine_copy / "trt").iterdir()) == []
    records.write_atomic(target, lambda tmp: tmp.write_bytes(b"whole plan"))
    assert target.read_bytes() == b"whole plan" and len(list((engine_copy / "trt").iterdir())) == 1


def test_plans_and_rewritten_manifest_are_readable_by_others(engine_copy):
    """The export makes engine directories readable by a service account; mkstemp's 0600 must
    not survive into plans or manifest.json."""
    old = os.umask(0o022)
    try:
        target = engine_copy / "trt" / "unet.plan"
        records.write_atomic(target, lambda tmp: tmp.write_bytes(b"plan"))
        records.update_manifest(engine_copy, lambda data: data.setdefault("trt", {}))
    finally:
        os.umask(old)
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert oct((engine_copy / "manifest.json").stat().st_mode & 0o777) == "0o644"


def test_timing_cache_name_keys_on_the_gpu_model():
    a = records.timing_cache_name("10.3.0", GpuInfo("NVIDIA GeForce RTX 4090", "8.9"))
    b = records.timing_cache_name("10.3.0", GpuInfo("NVIDIA L4", "8.9"))  # same sm, another GPU
    assert a != b and a == "trt/timing-10.3.0-NVIDIA-GeForce-RTX-4090-sm8.9.cache"


def test_auto_backend_falls_back_to_ort_without_a_gpu(engine_copy, manifest_data, monkeypatch):
    """Plans present and TensorRT importable, but no driver/GPU: `auto` runs onnxruntime."""
    from deedsr.runtime import backends
    from deedsr.runtime.backends import cuda, trt_api

    rec, _ = make_record(engine_copy, "unet", manifest_data)
    records.set_plan(engine_copy, "unet", rec)
    monkeypatch.setattr(backends, "tensorrt_available", lambda: True)
    monkeypatch.setattr(trt_api, "import_tensorrt", lambda otherwise="": object())
    monkeypatch.setattr(cuda, "_libcuda", lambda: None)  # no libcuda: no NVIDIA driver
    backend = backends.open_backend(Manifest.load(engine_copy), "auto")
    assert backend.name == "ort"
    backend.close()


# ------------------------------------------------------------------ without TensorRT / a GPU
def one_error_line(output: str) -> str:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].lower().startswith("error: ") and "Traceback" not in output, output
    return lines[0]


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_build_engines_without_tensorrt_is_one_line_and_leaves_nothing(engine_copy):
    from deedsr.export.cli import main

    before = (engine_copy / "manifest.json").read_bytes()
    result = CliRunner().invoke(main, ["build-engines", str(engine_copy)])
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert "TensorRT is not installed" in line and "pip install tensorrt-cu12" in line and "tensorrt-cu13" in line
    assert not (engine_copy / "trt").exists() and (engine_copy / "manifest.json").read_bytes() == before
    # the same through `python -m engines`
    proc = subprocess.run([sys.executable, "-m", "deedsr.engines", str(engine_copy)], capture_output=True, text=True)
    assert proc.returncode == 2 and one_error_line(proc.stderr) == line


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_trt_backend_without_tensorrt(engine_copy, manifest_data, photo, tmp_path):
    from deedsr.runtime.backends import open_backend
    from PIL import Image

    from deedsr.cli import main

    rec, _ = make_record(engine_copy, "unet", manifest_data)
    records.set_plan(engine_copy, "unet", rec)
    with pytest.raises(EngineError, match="TensorRT is not installed") as info:
        open_backend(Manifest.load(engine_copy), "trt")
    assert "\n" not in str(info.value)
    src = tmp_path / "lr.png"
    Image.fromarray(photo).save(src)
    result = CliRunner().invoke(main, ["upscale", str(src), "-o", str(tmp_path / "out"), "--engines",
                                       str(engine_copy), "--backend", "trt"])
    assert result.exit_code == 2 and "pip install tensorrt-cu12" in one_error_line(result.output)
    assert not (tmp_path / "out" / "lr.png").exists()


def test_no_gpu_is_one_line():
    from deedsr.runtime.backends.cuda import _libcuda, gpu_identity

    if _libcuda() is not None:
        pytest.skip("an NVIDIA driver is installed here")
    with pytest.raises(EngineError, match="no NVIDIA driver") as info:
        gpu_identity()
    assert "\n" not in str(info.value)


def test_engines_and_trt_backend_import_no_torch():
    code = ("import sys, deedsr.engines.build, deedsr.engines.check, deedsr.engines.cli, deedsr.runtime.backends.trt; "
            "bad = [m for m in ('torch', 'diffusers', 'deedsr.models', 'deedsr.export') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_export_cli_offers_build_engines():
    from deedsr.export.cli import main

    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "--build-engines" in result.output and "build-engines DIR" in result.output
    result = CliRunner().invoke(main, ["build-engines", "--help"])
    assert result.exit_code == 0 and "ENGINE_DIR" in result.output and "--static" in result.output


# ================================================================ GPU + TensorRT (scripts/gpu_check.sh)
def _require_gpu():
    pytest.importorskip("tensorrt", reason="needs TensorRT")
    pytest.importorskip("polygraphy", reason="needs polygraphy")
    from deedsr.runtime.backends.cuda import gpu_identity

    try:
        return gpu_identity()
    except EngineError as e:
        pytest.skip(f"needs an NVIDIA GPU ({e})")


@pytest.fixture(scope="module")
def trt_source(request):
    """An exported engine directory: $DEEDSR_TRT_TEST_DIR (scripts/gpu_check.sh exports one) or
    the session's tiny export."""
    _require_gpu()
    given = os.environ.get("DEEDSR_TRT_TEST_DIR")
    return Path(given) if given else request.getfixturevalue("tiny_engine_dir")


def _with_plans(source: Path, dest: Path, **options) -> Path:
    from deedsr.engines.build import build_plans

    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("trt"))
    data = json.loads((dest / "manifest.json").read_text())
    data.pop("trt", None)
    (dest / "manifest.json").write_text(json.dumps(data, indent=1) + "\n")
    build_plans(dest, BuildOptions(**options))
    return dest


@pytest.fixture(scope="module")
def trt_dir(trt_source, tmp_path_factory):
    return _with_plans(trt_source, tmp_path_factory.mktemp("trt") / "dynamic")


@pytest.fixture(scope="module")
def trt_static_dir(trt_source, tmp_path_factory):
    return _with_plans(trt_source, tmp_path_factory.mktemp("trt") / "static", static=True)


@pytest.mark.gpu
def test_plans_match_onnxruntime_fp32(trt_dir):
    from deedsr.engines.check import compare

    rows = compare(trt_dir, min_cosine=0.999)
    assert rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert any(r["graph"].startswith("step:") for r in rows)  # the device-bound adapter -> UNet path


@pytest.mark.gpu
def test_end_to_end_psnr_vs_fp32_reference(trt_dir, photo):
    from deedsr.engines.check import end_to_end

    out = end_to_end(trt_dir, photo, steps=20, min_psnr=35.0)
    assert out["psnr"] >= 35.0, out


@pytest.mark.gpu
def test_rebuild_skips_up_to_date_plans(trt_dir):
    from deedsr.engines.build import build_plans

    built = build_plans(trt_dir, BuildOptions())
    assert built and all(b.skipped for b in built)


@pytest.mark.gpu
def test_plan_from_another_tensorrt_version_is_refused(trt_dir, tmp_path):
    from deedsr.runtime.upscaler import Upscaler

    other = Path(shutil.copytree(trt_dir, tmp_path / "other"))
    data = json.loads((other / "manifest.json").read_text())
    data["trt"]["plans"]["unet"]["tensorrt"] = "9.0.0.0"
    (other / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineError, match="build-engines") as info:
        Upscaler.from_engine_dir(other, backend="trt", use_denoiser=False)
    assert "TensorRT 9.0.0.0" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.gpu
def test_static_plans_cuda_graphs_and_uncovered_tile(trt_static_dir, photo):
    from deedsr.runtime.errors import ShapeError
    from deedsr.runtime.upscaler import Upscaler

    plain = Upscaler.from_engine_dir(trt_static_dir, backend="trt")
    plain.backend.cuda_graphs = False  # the same plans without CUDA graphs
    reference = plain.upscale(photo, seed=3, steps=4)
    tile = plain.manifest.sampler["tile"]
    small = np.ascontiguousarray(photo[:16, :16])  # LR 16 -> latent 8, smaller than the static tile
    assert plain.manifest.latent_size(16, 16)[0] < tile
    with pytest.raises(ShapeError, match="static") as info:
        plain.upscale(small, seed=0, steps=2)
    assert "\n" not in str(info.value)
    plain.close()
    from deedsr.runtime.backends.cuda import cudart_graphs

    if cudart_graphs() is None:  # the module the backend imports, not just a `cuda` package
        pytest.skip("CUDA graphs need cuda-python's runtime module")
    graphs = Upscaler.from_engine_dir(trt_static_dir, backend="trt")
    assert graphs.backend.cuda_graphs
    first = graphs.upscale(photo, seed=3, steps=4)
    again = graphs.upscale(photo, seed=3, steps=4)  # replayed graphs
    graphs.close()
    assert np.abs(first.astype(int) - reference).max() <= 1
    assert np.array_equal(first, again)
