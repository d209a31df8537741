"""The runtime end to end on real engine directories (tiny preset, exported once per session)
against the PyTorch reference sampler."""
import json
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from deedsr.runtime.contract import ADAPTER, LEARNER, UNET, VAE_DECODER_TILED, VAE_ENCODER_TILED
from deedsr.runtime.errors import Cancelled, EngineError, InsufficientMemory, ShapeError
from deedsr.runtime.backends import open_backend
from deedsr.runtime.manifest import Manifest
from deedsr.runtime.upscaler import Upscaler
from PIL import Image

from deedsr.cli import main
from deedsr.pipeline import DeeDSRPipeline

TILE, MAX_SIZE = 16, 256
STEPS = 4  # t = 751, 501, 251, 1; step 0 noise-guided (the default), eta 1
HEAVY = ("torch", "diffusers", "deedsr.models", "deedsr.pipeline", "deedsr.export", "deedsr.train")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def engines(tiny_model, tmp_path_factory):
    """fp32 + fp16 graphs of the tiny test model with a fused denoiser, tile 16; once per session."""
    from deedsr.export.engine_dir import export_engine_dir

    out = tmp_path_factory.mktemp("engines") / "tiny"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_torch_thread; session fixtures are set up before it
    try:
        export_engine_dir(tiny_model, out, precisions=("fp32", "fp16"), tile=TILE, max_size=MAX_SIZE,
                          fuse_denoiser=True)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def runtime_fp32(engines):
    return Upscaler.from_engine_dir(engines, backend="ort", precision="fp32", use_denoiser=False)


@pytest.fixture(scope="module")
def reference(tiny_model, photo):
    # the engines' sampler defaults: tile 16, overlap 8 (the model's own default tile is 32)
    return DeeDSRPipeline(tiny_model)(photo, seed=3, steps=STEPS, tile=TILE, tile_overlap=TILE // 2)


@pytest.fixture(scope="module")
def reference_code(tiny_model, photo):
    return DeeDSRPipeline(tiny_model)(photo, seed=3, steps=STEPS, tile=TILE, tile_overlap=TILE // 2,
                                      profile="reference-code")


def count_graph_calls(upscaler):
    calls = Counter()
    backend = upscaler.backend
    inner = backend.run_raw

    def counting(graph, feeds, outputs=None):
        calls[graph] += 1
        return inner(graph, feeds, outputs)

    backend.run_raw = counting
    return calls


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# ------------------------------------------------------------------------------ parity
def test_fp32_graphs_match_the_reference(runtime_fp32, engines, reference, photo):
    # 48x40 LR -> 24x24 latent, tile 16 / overlap 8: four tiles blended at every step
    got = runtime_fp32.upscale(photo, seed=3, steps=STEPS)
    diff = np.abs(got.astype(int) - reference.astype(int))
    print(f"\nfp32 adapter+unet vs reference: max abs pixel diff {diff.max()}, "
          f"{np.count_nonzero(diff)} of {diff.size} values differ")
    assert got.shape == reference.shape == (160, 192, 3) and diff.max() <= 1

    fused = Upscaler.from_engine_dir(engines, backend="ort", precision="fp32", use_denoiser=True)
    got = fused.upscale(photo, seed=3, steps=STEPS)
    diff = np.abs(got.astype(int) - reference.astype(int))
    print(f"fp32 fused denoiser vs reference: max abs pixel diff {diff.max()}")
    assert diff.max() <= 1


def test_fp32_graphs_match_the_reference_with_every_option(runtime_fp32, tiny_model, photo):
    options = dict(steps=3, eta=0.5, init="lr", noise_guidance_steps=(0, -1), tile_overlap=4, color_fix="wavelet")
    expected = DeeDSRPipeline(tiny_model)(photo, seed=11, tile=TILE, **options)
    got = runtime_fp32.upscale(photo, seed=11, **options)
    diff = np.abs(got.astype(int) - expected.astype(int))
    print(f"\nfp32, eta 0.5, lr init, wavelet: max abs pixel diff {diff.max()}")
    assert diff.max() <= 1


def test_fp16_graphs_against_the_fp32_reference(engines, reference, photo):
    fp16 = Upscaler.from_engine_dir(engines, backend="ort", precision="fp16")
    assert fp16.backend.precision == "fp16"
    got = fp16.upscale(photo, seed=3, steps=STEPS)
    value = psnr(got, reference)
    print(f"\nfp16 graphs (ORT CPU) vs fp32 reference: PSNR {value:.2f} dB, "
          f"max abs diff {np.abs(got.astype(int) - reference.astype(int)).max()}")
    assert value >= 35


def test_reference_code_profile_parity(runtime_fp32, engines, reference_code, reference, photo, tmp_path):
    # 48x40 LR -> torch bicubic 192x160 -> padded 256x192 (192 is a multiple of 64, yet gains 64)
    # -> 32x24 latent, encoded from [0, 1], a posterior sample drawn first, truncated to uint8
    got = runtime_fp32.upscale(photo, seed=3, steps=STEPS, profile="reference-code")
    diff = np.abs(got.astype(int) - reference_code.astype(int))
    print(f"\nreference-code, fp32 graphs vs reference: max abs pixel diff {diff.max()}, "
          f"{np.count_nonzero(diff)} of {diff.size} values differ")
    assert got.shape == reference_code.shape == (160, 192, 3) and diff.max() <= 1

    fp16 = Upscaler.from_engine_dir(engines, backend="ort", precision="fp16")
    value = psnr(fp16.upscale(photo, seed=3, steps=STEPS, profile="reference-code"), reference_code)
    print(f"reference-code, fp16 graphs (ORT CPU) vs fp32 reference: PSNR {value:.2f} dB")
    assert value >= 35

    between = psnr(reference_code, reference)
    print(f"reference-code vs paper (reference, same seed): PSNR {between:.2f} dB")
    assert between < 35  # the profile really changes the result

    src = _save(photo, tmp_path / "in")
    result = CliRunner().invoke(main, ["upscale", str(src), "-o", str(tmp_path / "out"), "--engines", str(engines),
                                       "--precision", "fp32", "--steps", str(STEPS), "--seed", "3",
                                       "--profile", "reference-code"])
    assert result.exit_code == 0, result.output
    cli = np.asarray(Image.open(tmp_path / "out" / "photo.png"))
    assert np.abs(cli.astype(int) - reference_code.astype(int)).max() <= 1


def test_engine_directories_from_before_the_profiles(engines, tmp_path, photo):
    import hashlib

    import onnx

    old = _copy(engines, tmp_path / "old", skip={"fp32/vae_encoder.onnx"})
    data = json.loads((old / "manifest.json").read_text())
    del data["sampler"]["profile"]
    encoder = data["graphs"]["vae_encoder"]
    encoder["outputs"] = [o for o in encoder["outputs"] if o["name"] == "latent"]
    graph = onnx.load(str(engines / "fp32" / "vae_encoder.onnx"))  # the graph as exported before: no latent_std
    kept = [o for o in graph.graph.output if o.name == "latent"]
    del graph.graph.output[:]
    graph.graph.output.extend(kept)
    onnx.save(graph, str(old / "fp32" / "vae_encoder.onnx"))
    blob = (old / "fp32" / "vae_encoder.onnx").read_bytes()
    encoder["precisions"]["fp32"].update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    (old / "manifest.json").write_text(json.dumps(data))
    upscaler = Upscaler.from_engine_dir(old, precision="fp32")
    assert upscaler.manifest.sampler["profile"] == "paper"
    assert upscaler.upscale(photo, steps=1).shape == (160, 192, 3)
    with pytest.raises(ValueError, match=r"the reference-code profile needs the VAE encoder's latent_std output, "
                                         r"which .*/old lacks \(exported before the profiles\); re-export it"):
        upscaler.upscale(photo, steps=1, profile="reference-code")
    data["sampler"]["profile"] = "ldm"
    (old / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineError, match="unknown sampling profile 'ldm'; choose one of paper, reference-code"):
        Upscaler.from_engine_dir(old)


def test_noise_guided_steps_do_not_call_the_unet(engines, photo):
    upscaler = Upscaler.from_engine_dir(engines, backend="ort", precision="fp32", use_denoiser=False)
    calls = count_graph_calls(upscaler)
    upscaler.upscale(photo, steps=4, noise_guidance_steps=(0, 2))
    # two model steps, four tiles each, one call each (max batch 4); the VAE in one tile each way
    assert calls == Counter({LEARNER: 1, VAE_ENCODER_TILED: 1, VAE_DECODER_TILED: 1, ADAPTER: 2, UNET: 2})
    calls.clear()
    upscaler.upscale(photo, steps=3, noise_guidance_steps=(0, 1, 2))
    assert calls[UNET] == 0 and calls[ADAPTER] == 0 and calls[VAE_DECODER_TILED] == 1


def test_batch_threads_and_cancel(runtime_fp32, photo):
    other = np.ascontiguousarray(photo[::-1])
    sequential = [runtime_fp32.upscale(photo, seed=1, steps=2), runtime_fp32.upscale(other, seed=2, steps=2)]
    results = [None, None]

    def work(i, image, seed):
        results[i] = runtime_fp32.upscale(image, seed=seed, steps=2)

    threads = [threading.Thread(target=work, args=a) for a in ((0, photo, 1), (1, other, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(results, sequential):
        np.testing.assert_array_equal(a, b)
    batch = runtime_fp32.upscale_batch([photo, other], seeds=[1, 2], steps=2)
    for a, b in zip(batch, sequential):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    seen = []
    with pytest.raises(Cancelled):
        runtime_fp32.upscale(photo, steps=4, callback=lambda info: seen.append(info) or info.index < 1)
    assert [s.index for s in seen] == [0, 1] and seen[0].guided and not seen[1].guided


# ------------------------------------------------------------------------ bad input
def _copy(engines, dest, skip=()):
    dest.mkdir()
    shutil.copy(engines / "manifest.json", dest / "manifest.json")
    for sub in ("fp32", "fp16"):
        (dest / sub).mkdir()
        for f in (engines / sub).iterdir():
            if f"{sub}/{f.name}" not in skip:
                os.link(f, dest / sub / f.name)  # a symlink would point outside the directory: refused
    return dest


def test_incomplete_or_foreign_engine_directories(engines, tmp_path):
    broken = _copy(engines, tmp_path / "no-unet", skip={"fp32/unet.onnx"})
    with pytest.raises(EngineError, match=r"fp32/unet.onnx: missing; the engine directory is incomplete"):
        Upscaler.from_engine_dir(broken, precision="fp32", use_denoiser=False)
    Upscaler.from_engine_dir(broken, precision="fp32")  # the fused denoiser replaces adapter + unet
    foreign = _copy(engines, tmp_path / "v2")
    data = json.loads((foreign / "manifest.json").read_text())
    (foreign / "manifest.json").write_text(json.dumps({**data, "schema_version": 2}))
    with pytest.raises(EngineError) as e:
        Upscaler.from_engine_dir(foreign)
    assert str(e.value) == f"{foreign}/manifest.json: schema version 2, this runtime reads 1"
    encoder = f"fp32/{VAE_ENCODER_TILED}.onnx"  # the graph the runtime encodes with
    garbage = _copy(engines, tmp_path / "garbage", skip={encoder})
    size = (engines / encoder).stat().st_size
    (garbage / encoder).write_bytes(b"\0" * size)
    with pytest.raises(EngineError, match=f"{VAE_ENCODER_TILED}.onnx: sha256 differs from manifest.json"):
        Upscaler.from_engine_dir(garbage, precision="fp32")
    manifest = Manifest.load(garbage)  # past the hash check: what onnxruntime says of such a file
    upscaler = Upscaler(manifest, open_backend(manifest, "ort", "fp32"))
    with pytest.raises(EngineError, match=f"{VAE_ENCODER_TILED}.onnx: onnxruntime cannot load it"):
        upscaler.upscale(np.zeros((16, 16, 3), np.uint8), steps=1)
    with pytest.raises(EngineError, match="TensorRT"):  # no plans here, and no TensorRT
        Upscaler.from_engine_dir(engines, backend="trt")


def test_shapes_outside_the_built_ranges_and_memory(runtime_fp32, engines, photo):
    with pytest.raises(ShapeError) as e:
        runtime_fp32.check(300, 200)
    assert str(e.value) == (f"image is 200x300: the engines are built for LR sides 16..{MAX_SIZE}, got 300; "
                            "re-export with --max-size")
    with pytest.raises(ShapeError, match="got 12; re-export with --min-size"):
        runtime_fp32.upscale(np.zeros((12, 40, 3), np.uint8), steps=1)
    with pytest.raises(ShapeError, match="latent tiles up to 16, got --tile 32"):
        runtime_fp32.upscale(photo, steps=1, tile=32)
    small = Upscaler.from_engine_dir(engines, precision="fp32", memory_limit=1 << 20)
    with pytest.raises(InsufficientMemory, match=r"image is 48x40: upscaling to 192x160 needs about .* MiB, only "
                                                 r"1.0 MiB is available"):
        small.upscale(photo, steps=1)


# ------------------------------------------------------------------------------- CLI
def _save(photo, folder, name="photo.png"):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo).save(folder / name)
    return folder / name


def test_cli_upscale_never_imports_torch(engines, photo, tmp_path, reference):
    src = _save(photo, tmp_path / "in")
    out = tmp_path / "out"
    code = ("import sys, deedsr.cli\n"
            "try:\n"
            f"    deedsr.cli.main(['upscale', {str(src)!r}, '-o', {str(out)!r}, '--engines', {str(engines)!r},"
            f" '--steps', '{STEPS}', '--seed', '3', '--precision', 'fp32'], standalone_mode=False)\n"
            "finally:\n"
            "    print('MODULES', ' '.join(sorted(sys.modules)))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    modules = proc.stdout.split("MODULES", 1)[1].split()
    loaded = sorted({h for h in HEAVY for m in modules if m == h or m.startswith(h + ".")})
    print(f"\nheavy modules imported by `deedsr upscale`: {loaded or 'none'} ({len(modules)} modules in all)")
    assert loaded == [] and "onnxruntime" in modules
    result = np.asarray(Image.open(out / "photo.png"))
    assert np.abs(result.astype(int) - reference.astype(int)).max() <= 1


def test_cli_warns_once_about_untrained_weights(engines, photo, tmp_path):
    # the test model is an untrained preset with random modulation: its directory is marked so
    src = _save(photo, tmp_path / "in")
    result = CliRunner().invoke(main, ["upscale", str(src), "-o", str(tmp_path / "out"), "--engines", str(engines),
                                       "--steps", "1"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: untrained weights: the output is noise (export a trained checkpoint, "
                        "e.g. deedsr-export --checkpoint deedsr/assets/demo)"]


def test_cli_bad_input_one_line_each_rest_done(engines, photo, tmp_path):
    from helpers import make_bad_inputs

    expected = make_bad_inputs(tmp_path / "in", photo)
    big = np.zeros((MAX_SIZE + 20, 40, 3), np.uint8)
    Image.fromarray(big).save(tmp_path / "in" / "tall.png")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "deedsr.cli", "upscale", str(tmp_path / "in"), str(tmp_path / "missing.png"),
         "-o", str(out), "--engines", str(engines), "--steps", "1"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    for name, message in {**expected, "tall.png": "re-export with --max-size"}.items():
        assert any(name in e and message in e for e in errors), (name, proc.stderr)
    assert sorted(p.name for p in out.iterdir()) == ["good.png"]


@pytest.mark.parametrize("args,message", [
    (["--engines", "NOWHERE"], "engine directory does not exist"),
    (["--engines", "ENGINES", "--backend", "trt"], "TensorRT"),
    (["--engines", "ENGINES", "--preset", "tiny", "--backend", "ort"], "--checkpoint/--preset choose the torch"),
    (["--engines", "ENGINES", "--tile", "32"], "latent tiles up to 16"),
    (["--engines", "ENGINES", "--tile-overlap", "16"], "tile overlap (16) must be in 0..15"),
    (["--engines", "ENGINES", "--profile", "ldm"], "'ldm' is not one of 'paper', 'reference-code'"),
])
def test_cli_usage_errors_are_one_line(engines, photo, tmp_path, args, message):
    src = _save(photo, tmp_path / "in")
    args = [str(engines) if a == "ENGINES" else str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in args]
    result = CliRunner().invoke(main, ["upscale", str(src), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_demo_and_default_engines(engines, tmp_path, monkeypatch):
    from deedsr.runtime import demo

    monkeypatch.setenv("DEEDSR_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["upscale", str(demo.ASSET), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "deedsr demo" in result.output
    target = demo.demo_engine_dir()
    target.parent.mkdir(parents=True)
    target.symlink_to(engines)  # as if `deedsr demo` had built it
    result = CliRunner().invoke(main, ["demo", "-o", str(tmp_path / "demo"), "--steps", "2"])
    assert result.exit_code == 0, result.output
    x4 = Image.open(tmp_path / "demo" / "astronaut_x4.png")
    compare = Image.open(tmp_path / "demo" / "astronaut_compare.png")
    assert x4.size == (512, 512) and compare.size[0] > 1024
    result = CliRunner().invoke(main, ["upscale", str(demo.ASSET), "-o", str(tmp_path / "o"), "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "astronaut_lr.png").is_file()


def test_demo_export_command_runs_in_a_subprocess(monkeypatch, tmp_path):
    from deedsr.runtime import demo

    cmd = demo.export_command(tmp_path / "x")
    assert cmd[0] == sys.executable and "export.cli" in cmd[2] and cmd[cmd.index("--out") + 1] == str(tmp_path / "x")
    assert ("--checkpoint" in cmd) == (demo.demo_checkpoint() is not None)
