"""Issue 11: an engine directory, a config and a batch of files that nothing can corrupt,
hijack or crash. Real engine directory (the tiny model, exported once per session), real
onnxruntime, real files; every refusal is checked for its one line."""
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from deedsr.runtime.errors import EngineError
from deedsr.runtime.images import ImageError, expand_inputs, image_size, read_image
from deedsr.runtime.integrity import CACHE_NAME, DigestCache, verify_graphs
from deedsr.runtime.manifest import Manifest
from deedsr.runtime.stale import remove_stale_exports, remove_stale_pngs
from deedsr.runtime.upscaler import Upscaler
from PIL import Image

from deedsr.cli import main
from deedsr.usage import OutputError, plan_outputs

STEPS = ["--steps", "2"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEDSR_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def engine(tiny_engine_dir, tmp_path):
    """A private copy of the session's tiny engine directory, free to damage."""
    return Path(shutil.copytree(tiny_engine_dir, tmp_path / "eng"))


def edit(root: Path, change) -> Path:
    data = json.loads((root / "manifest.json").read_text())
    change(data)
    (root / "manifest.json").write_text(json.dumps(data))
    return root


def one_line(e) -> str:
    text = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- integrity
def test_same_size_bit_flip_is_refused_on_open(engine):
    path = engine / "fp32" / "unet.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(EngineError) as e:
        Upscaler.from_engine_dir(engine, backend="ort", precision="fp32", use_denoiser=False)
    assert one_line(e).endswith("fp32/unet.onnx: sha256 differs from manifest.json (corrupt or replaced); re-export")


def test_another_graph_in_place_of_the_decoder_is_refused(engine, photo):
    # the decoder the runtime runs: the tiled one (the untiled decoder is not called when it exists)
    src, dst = engine / "fp32" / "vae_encoder_tiled.onnx", engine / "fp32" / "vae_decoder_tiled.onnx"
    shutil.copyfile(src, dst)

    def same_size(d):
        d["graphs"]["vae_decoder_tiled"]["precisions"]["fp32"]["bytes"] = src.stat().st_size

    edit(engine, same_size)
    with pytest.raises(EngineError, match="vae_decoder_tiled.onnx: sha256 differs"):
        Upscaler.from_engine_dir(engine, backend="ort", precision="fp32")
    # Even with a manifest rewritten to that graph's hash, its tensors are not the decoder's:
    # refused when the graphs are loaded (deedsr upscale loads them before the first image).
    sha = json.loads((engine / "manifest.json").read_text())["graphs"]["vae_encoder_tiled"]["precisions"]["fp32"][
        "sha256"]
    edit(engine, lambda d: d["graphs"]["vae_decoder_tiled"]["precisions"]["fp32"].update(sha256=sha))
    up = Upscaler.from_engine_dir(engine, backend="ort", precision="fp32")
    with pytest.raises(EngineError) as e:
        up.backend.preload()
    assert ("vae_decoder_tiled.onnx: inputs ['image', 'mask', 'own', 'stats'] differ from manifest.json's "
            "['latent', 'mask', 'own', 'stats']") in one_line(e)


def test_digests_are_cached_by_path_size_and_times(engine, tmp_path):
    m = Manifest.load(engine)
    graphs = m.graphs_for("fp32")
    total = sum(m.graph_file(g, "fp32").bytes for g in graphs)
    assert verify_graphs(m, "fp32", graphs) == total  # cold: every byte read
    assert verify_graphs(m, "fp32", graphs) == 0  # cached
    cache = tmp_path / "cache" / CACHE_NAME
    assert len(json.loads(cache.read_text())["digests"]) == len(graphs)
    cache.write_text("{broken")  # a corrupt cache is ignored and rewritten
    assert verify_graphs(m, "fp32", graphs) == total
    assert verify_graphs(m, "fp32", graphs) == 0
    # rewriting a graph with the same bytes and restoring its mtime still changes ctime: rehashed
    graph = m.graph_file(graphs[-1], "fp32").file
    st = graph.stat()
    time.sleep(0.01)
    graph.write_bytes(graph.read_bytes())
    os.utime(graph, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert graph.stat().st_mtime_ns == st.st_mtime_ns
    assert verify_graphs(m, "fp32", graphs) == st.st_size
    assert DigestCache().digests  # the cache is still readable


# ------------------------------------------------------------------------------- paths
@pytest.mark.parametrize("file, message", [
    ("/etc/passwd", "is an absolute path ('/etc/passwd')"),
    ("../../../../etc/passwd", "points outside the engine directory"),
    ("fp32/../../elsewhere.onnx", "points outside the engine directory"),
])
def test_graph_paths_outside_the_directory_are_refused(engine, file, message):
    edit(engine, lambda d: d["graphs"]["unet"]["precisions"]["fp32"].update(file=file))
    with pytest.raises(EngineError) as e:
        Manifest.load(engine)
    text = one_line(e)
    assert text.startswith(f"{engine}/manifest.json: graphs.unet.precisions.fp32.file ") and message in text


def test_absolute_path_to_a_valid_graph_and_symlinks_out_are_refused(engine, tiny_engine_dir, tmp_path):
    real = str(Path(tiny_engine_dir, "fp32", "unet.onnx").resolve())
    edit(engine, lambda d: d["graphs"]["unet"]["precisions"]["fp32"].update(file=real))
    with pytest.raises(EngineError, match="graphs.unet.precisions.fp32.file is an absolute path"):
        Manifest.load(engine)
    edit(engine, lambda d: d["graphs"]["unet"]["precisions"]["fp32"].update(file="fp32/unet.onnx"))
    (engine / "fp32" / "unet.onnx").unlink()
    (engine / "fp32" / "unet.onnx").symlink_to(real)  # same bytes, same hash, but outside
    with pytest.raises(EngineError) as e:
        Manifest.load(engine)
    assert "graphs.unet.precisions.fp32.file ('fp32/unet.onnx') points outside the engine directory" in one_line(e)
    (engine / "fp32" / "unet.onnx").unlink()
    (engine / "fp32" / "unet.onnx").symlink_to("unet.onnx")
    with pytest.raises(EngineError, match=r"fp32.file \('fp32/unet.onnx'\) is a symlink loop"):
        Manifest.load(engine)
    # a symlink that stays inside is fine
    (engine / "fp32" / "unet.onnx").unlink()
    shutil.copyfile(real, engine / "unet-copy.onnx")
    (engine / "fp32" / "unet.onnx").symlink_to("../unet-copy.onnx")
    Upscaler.from_engine_dir(engine, backend="ort", precision="fp32")


# ------------------------------------------------------------------- manifest fields
def _set(path, value):
    def change(d):
        *parents, last = path
        for p in parents:
            d = d[p]
        d[last] = value
    return change


@pytest.mark.parametrize("change, message", [
    (_set(["image", "pixel_multiple"], 0), "image.pixel_multiple must be an integer in 1..4096, got 0"),
    (_set(["image", "latent_downscale"], 0), "image.latent_downscale must be an integer in 1..4096, got 0"),
    (_set(["graphs", "unet", "precisions"], [1]), "graphs.unet.precisions must be a JSON object, got [1]"),
    (_set(["dims", "lr_height"], {"min": 128, "opt": 64, "max": 16}),
     "dims.lr_height must have 1 <= min <= opt <= max, got 128, 64, 16"),
    (_set(["dims", "batch", "max"], 0), "dims.batch.max must be an integer in 1..1048576, got 0"),
    (_set(["scheduler", "alphas_cumprod", 500], float("nan")),
     "scheduler.alphas_cumprod[500] must be a finite number, got nan"),
    (_set(["scheduler", "alphas_cumprod", 10], 0.5), "scheduler.alphas_cumprod[11]"),
    (_set(["graphs", "vae_decoder", "outputs", 0, "shape"], ["batch", 4, "latent_height*8", "latent_width*8"]),
     "graphs.vae_decoder.outputs[0].shape of 'image' must be [batch, 3, height, width]"),
    (_set(["graphs", "vae_decoder", "outputs", 0, "name"], "rgb"), "graphs.vae_decoder.outputs lack image"),
    (_set(["graphs", "unet", "precisions", "fp32", "sha256"], None), "graphs.unet.precisions.fp32.sha256 must be"),
    (_set(["graphs", "adapter", "precisions", "fp64"], {}), "graphs.adapter.precisions has 'fp64'"),
    (_set(["sampler", "noise_guidance_steps"], [99]), "sampler.noise_guidance_steps[0] must be an integer in"),
    (_set(["conditions"], []), "graphs.degradation_learner.outputs do not match the contract and conditions"),
])
def test_bad_manifest_fields_are_one_line_naming_the_field(engine, change, message):
    edit(engine, change)
    with pytest.raises(EngineError) as e:
        Manifest.load(engine)
    text = one_line(e)
    assert message in text and text.endswith("; re-export"), text


def test_bad_manifest_through_the_cli_is_exit_2_before_any_image(engine, tmp_path, photo):
    edit(engine, _set(["image", "pixel_multiple"], 0))
    Image.fromarray(photo).save(tmp_path / "a.png")
    r = CliRunner().invoke(main, ["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"),
                                  "--engines", str(engine), *STEPS])
    assert r.exit_code == 2 and "image.pixel_multiple must be an integer in 1..4096, got 0" in r.output
    assert not (tmp_path / "out" / "a.png").exists()


# ---------------------------------------------------------------------------- configs
@pytest.mark.parametrize("section, key, value, message", [
    ("adapter", "base_channels", -32, "config adapter.base_channels must be an integer in 1..8192, got -32"),
    ("adapter", "base_channels", "32", "config adapter.base_channels must be an integer in 1..8192, got '32'"),
    ("adapter", "num_heads", 0, "config adapter.num_heads must be an integer in 1..256, got 0"),
    ("adapter", "num_heads", 3, "config adapter.num_heads (3) must divide the level channels (32)"),
    ("learner", "widths", [16, 32, 64, 10 ** 9], "config learner.widths[3] must be an integer in 1..8192"),
    ("unet", "block_out_channels", [8192, 8192, 8192, 8192], "parameters, more than the 2e+10 this tool builds"),
    ("vae", "latent_channels", 0, "config vae.latent_channels must be an integer in 1..64, got 0"),
])
def test_bad_checkpoint_configs_are_one_line(tmp_path, tiny_model, section, key, value, message):
    from deedsr.checkpoints import CheckpointError, read_config, save_checkpoint
    from deedsr.export.cli import main as export_main

    ckpt = save_checkpoint(tiny_model, tmp_path / "ckpt")
    meta = json.loads((ckpt / "config.json").read_text())
    meta["config"][section][key] = value
    if (section, key) == ("unet", "block_out_channels"):
        meta["config"]["unet"]["norm_num_groups"] = 32
        meta["config"]["unet"]["attention_head_dim"] = [64] * 4
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        read_config(ckpt)
    assert message in one_line(e)
    r = CliRunner().invoke(export_main, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "eng")])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "eng").exists()
    src = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(src)
    r = CliRunner().invoke(main, ["upscale", str(src), "-o", str(tmp_path / "o"), "--backend", "torch",
                                  "--checkpoint", str(ckpt)])
    assert r.exit_code == 2 and message in r.output


# ---------------------------------------------------------------- usage, before work
@pytest.fixture
def one_input(tmp_path, photo):
    src = tmp_path / "in" / "a.png"
    src.parent.mkdir()
    Image.fromarray(photo).save(src)
    return src


@pytest.mark.parametrize("args, env, message", [
    (["--noise-guidance-steps", "99,-5"], {}, "noise guidance step 99 is outside 0..1 (or -2..-1 from the end)"),
    (["--noise-guidance-steps", "0,-3"], {}, "noise guidance step -3 is outside"),
    (["--seed", "-1"], {}, "Invalid value for '--seed': -1 is not in the range 0<=x<=18446744073709551615"),
    (["--seed", str(2 ** 64)], {}, "is not in the range 0<=x<=18446744073709551615"),
    (["--steps", "1000"], {}, "Invalid value for '--steps': 1000 is not in the range 1<=x<=999"),
    ([], {"DEEDSR_MEMORY_LIMIT": "lots"}, "DEEDSR_MEMORY_LIMIT: cannot read a memory size from 'lots'"),
    ([], {"DEEDSR_MEMORY_LIMIT": "0"}, "DEEDSR_MEMORY_LIMIT: must be more than 0 bytes"),
    (["--tile", "16", "--tile-overlap", "16"], {}, "tile overlap (16) must be in 0..15 for tile 16"),
])
def test_usage_errors_exit_2_before_any_image(tiny_engine_dir, one_input, tmp_path, monkeypatch, args, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(main, ["upscale", str(one_input), "-o", str(tmp_path / "out"), "--engines",
                                  str(tiny_engine_dir), *STEPS, *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out" / "a.png").exists()


def test_steps_help_says_the_real_range():
    r = CliRunner().invoke(main, ["upscale", "--help"])
    assert "DDIM steps, 1..999" in r.output


def test_tile_alone_gets_an_overlap_that_fits(tiny_engine_dir, one_input, tmp_path):
    # the directory's default overlap is 8; --tile 8 alone used to be refused (8 >= 8)
    base = ["upscale", str(one_input), "--engines", str(tiny_engine_dir), *STEPS]
    r = CliRunner().invoke(main, base + ["-o", str(tmp_path / "alone"), "--tile", "8"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, base + ["-o", str(tmp_path / "explicit"), "--tile", "8", "--tile-overlap", "4"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "alone" / "a.png").read_bytes() == (tmp_path / "explicit" / "a.png").read_bytes()


def test_output_that_names_a_file(tiny_engine_dir, one_input, tmp_path, photo):
    base = ["upscale", "--engines", str(tiny_engine_dir), *STEPS]
    r = CliRunner().invoke(main, base + [str(one_input), "-o", str(tmp_path / "result.png")])
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "result.png").size == (4 * photo.shape[1], 4 * photo.shape[0])
    other = one_input.with_name("b.png")
    shutil.copyfile(one_input, other)
    r = CliRunner().invoke(main, base + [str(one_input), str(other), "-o", str(tmp_path / "two.png")])
    assert r.exit_code == 2 and "-o " in r.output and "names one file but there are 2 inputs; give a folder" in r.output
    r = CliRunner().invoke(main, base + [str(one_input), "-o", str(tmp_path / "x.jpg")])
    assert r.exit_code == 2 and "outputs are PNG" in r.output
    assert not (tmp_path / "two.png").exists() and not (tmp_path / "x.jpg").exists()


def test_unwritable_output_folder_is_one_line_before_work(tiny_engine_dir, one_input, tmp_path):
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file" / "sub", "cannot be created, a part of the path is a file"),
                         (tmp_path / "file", "exists and is not a folder"),
                         (Path("/proc/deedsr-out"), "cannot be created")):
        r = CliRunner().invoke(main, ["upscale", str(one_input), "-o", str(out), "--engines", str(tiny_engine_dir)])
        assert r.exit_code == 2 and message in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1


def test_read_only_folder_is_refused(tmp_path):
    from deedsr.usage import prepare_folder

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK) and os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder; the probe write is what refuses it elsewhere")
        with pytest.raises(OutputError, match="cannot write there"):
            prepare_folder(folder)
    finally:
        folder.chmod(0o700)


# --------------------------------------------------------------------------- collisions
def test_output_names_for_colliding_stems():
    inputs = [Path("a/x.png"), Path("b/x.png"), Path("x.jpg"), Path("x-1.png"), Path("y.png")]
    plan = plan_outputs(inputs, Path("out"))
    assert [plan[p].name for p in inputs] == ["x.png", "x-2.png", "x-3.png", "x-1.png", "y.png"]
    assert len(set(plan.values())) == len(inputs)


def test_same_stem_inputs_get_distinct_outputs_even_with_overwrite(tiny_engine_dir, tmp_path, photo):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(photo).save(tmp_path / "a" / "x.png")
    Image.fromarray(photo[::-1].copy()).save(tmp_path / "b" / "x.png")
    out = tmp_path / "out"
    args = ["upscale", str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"), "-o", str(out),
            "--engines", str(tiny_engine_dir), *STEPS, "--overwrite"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["x-1.png", "x.png"]
    up = Upscaler.from_engine_dir(tiny_engine_dir, backend="ort", precision="auto")
    for src, name in ((photo, "x.png"), (photo[::-1].copy(), "x-1.png")):
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)), up.upscale(src, seed=0, steps=2))


# ------------------------------------------------------------------------------- images
def test_exif_orientation_is_applied(tmp_path, photo):
    im = Image.fromarray(photo)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    im.save(tmp_path / "plain.jpg", quality=95)
    plain = read_image(tmp_path / "plain.jpg")
    rotated = read_image(tmp_path / "rot.jpg")
    np.testing.assert_array_equal(rotated, np.rot90(plain, k=-1))
    assert image_size(tmp_path / "rot.jpg") == (photo.shape[0], photo.shape[1])


def _png_rgb16(path, h=20, w=24):
    import struct
    import zlib

    rows = np.random.default_rng(0).integers(0, 65535, (h, w * 3)).astype(">u2")
    raw = b"".join(b"\x00" + r.tobytes() for r in rows)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_odd_inputs_are_one_line_each_and_the_batch_goes_on(tmp_path, photo, tiny_engine_dir):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo).save(src / "good.png")
    _png_rgb16(src / "deep16.png")
    frames = [Image.fromarray(photo), Image.fromarray(photo[::-1].copy())]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    os.mkfifo(src / "fifo.png")
    os.symlink("loop-b.png", src / "loop-a.png")
    os.symlink("loop-a.png", src / "loop-b.png")
    out = tmp_path / "out"
    (out).mkdir()
    stale = out / f".good.{dead_pid()}-abc12345.png.tmp"
    stale.write_bytes(b"")
    names = ["good.png", "deep16.png", "anim.gif", "fifo.png", "loop-a.png"]
    proc = subprocess.run([sys.executable, "-m", "deedsr.cli", "upscale", *[str(src / n) for n in names],
                           "-o", str(out), "--engines", str(tiny_engine_dir), *STEPS],
                          capture_output=True, text=True, timeout=300)
    errors = [line.split("error: ", 1)[1] for line in proc.stderr.splitlines() if "error: " in line]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "Warning" not in proc.stderr
    expected = {"deep16.png": "is not 8-bit (16 bits per channel, RGB)", "anim.gif": "has 2 frames",
                "fifo.png": "is not a regular file (a FIFO, socket or device); not read",
                "loop-a.png": "is a symlink loop"}
    for name, message in expected.items():
        assert any(e.startswith(str(src / name)) and message in e for e in errors), (name, proc.stderr)
    assert sorted(p.name for p in out.iterdir()) == ["good.png"]  # the stale temporary is gone too


def test_decompression_bomb_is_one_line_without_a_warning(tmp_path, photo, monkeypatch):
    Image.fromarray(photo).save(tmp_path / "a.png")
    pixels = photo.shape[0] * photo.shape[1]
    for limit in (pixels - 1, pixels // 2 - 1):  # Pillow warns above the limit, errors above twice it
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # any warning escaping would fail here
            with pytest.raises(ImageError) as e:
                read_image(tmp_path / "a.png")
            assert "is too large to read (Image size (1920 pixels) exceeds limit" in one_line(e)
            with pytest.raises(ImageError):
                image_size(tmp_path / "a.png")


def test_symlink_loop_in_inputs_does_not_raise(tmp_path):
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    paths, unmatched = expand_inputs([str(tmp_path / "a")])
    assert paths == [tmp_path / "a"] and unmatched == []
    with pytest.raises(ImageError, match="^is a symlink loop$"):
        read_image(tmp_path / "a")


# ----------------------------------------------------------------- stale temporaries
def test_stale_png_temporaries_only_of_dead_writers(tmp_path):
    dead = dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        files = {
            f".x.{dead}-abc12345.png.tmp": True,  # writer gone
            f".x.{live.pid}-abc12345.png.tmp": False,  # writer alive
            f".y.{live.pid}-old12345.png.tmp": True,  # PID reused: written before that process started
            f".x.{os.getpid()}-abc12345.png.tmp": False,  # ours
            ".x.abc12345.png.tmp": False,  # no PID: not provably ours
            f"x.{dead}-abc12345.png.tmp": False,  # not hidden: not our name
            f".x.{dead}-abc12345.png": False,
            "notes.txt": False,
        }
        for name in files:
            (tmp_path / name).write_bytes(b"")
        hour_ago = time.time() - 3600
        os.utime(tmp_path / f".y.{live.pid}-old12345.png.tmp", (hour_ago, hour_ago))
        removed = {p.name for p in remove_stale_pngs(tmp_path)}
        assert removed == {n for n, gone in files.items() if gone}
        assert {p.name for p in tmp_path.iterdir()} == {n for n, gone in files.items() if not gone}
    finally:
        live.kill()
        live.wait()


def test_stale_export_folders_removed_and_an_interrupted_swap_restored(tmp_path):
    dead = dead_pid()
    (tmp_path / f".eng.tmp-{dead}-abc12345").mkdir()
    (tmp_path / f".eng.tmp-{dead}-abc12345" / "unet.onnx").write_bytes(b"partial")
    (tmp_path / f".eng.tmp-{os.getpid()}-abc12345").mkdir()  # a live export (this process)
    (tmp_path / f".other.tmp-{dead}-abc12345").mkdir()  # another directory's: not ours to judge here
    (tmp_path / f".eng.old-{dead}").mkdir()
    (tmp_path / f".eng.old-{dead}" / "manifest.json").write_text("{}")
    removed = remove_stale_exports(tmp_path / "eng")
    assert [p.name for p in removed] == [f".eng.tmp-{dead}-abc12345"]
    assert (tmp_path / "eng" / "manifest.json").exists()  # killed mid-swap: the previous directory is back
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["eng", f".eng.tmp-{os.getpid()}-abc12345", f".other.tmp-{dead}-abc12345"])


def test_a_killed_writer_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    # the writer dies (as with kill -9) between writing its temporary and renaming it
    code = ("import os, numpy as np; from deedsr.runtime import images; os.replace = lambda *a: os._exit(9); "
            f"images.write_png(np.zeros((16, 16, 3), np.uint8), {str(tmp_path / 'x.png')!r})")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".x.") and left[0].name.endswith(".png.tmp")
    assert remove_stale_pngs(tmp_path) == left
    assert not any(tmp_path.iterdir())
