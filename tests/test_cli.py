import subprocess
import sys

from click.testing import CliRunner
from helpers import make_bad_inputs
from PIL import Image

from deedsr.cli import main


def run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_upscale_real_photo_with_tiny_preset(tmp_path, photo):
    src = tmp_path / "coffee.png"
    Image.fromarray(photo).save(src)
    result = run(["upscale", str(src), "-o", str(tmp_path / "out"), "--backend", "torch", "--preset", "tiny",
                  "--steps", "2"])
    assert result.exit_code == 0, result.output
    out = Image.open(tmp_path / "out" / "coffee.png")
    assert out.size == (4 * photo.shape[1], 4 * photo.shape[0]) and out.mode == "RGB"


def test_bad_files_get_one_line_errors_and_the_rest_is_done(tmp_path, photo):
    expected = make_bad_inputs(tmp_path / "in", photo)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "deedsr.cli", "upscale", str(tmp_path / "in"), str(tmp_path / "missing.png"),
         "-o", str(out), "--backend", "torch", "--preset", "tiny", "--steps", "1"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in proc.stderr
    for name, message in expected.items():
        assert any(name in e and message in e for e in errors), (name, proc.stderr)
    assert any("missing.png" in e and "does not exist" in e for e in errors)
    assert sorted(p.name for p in out.iterdir()) == ["good.png"]  # nothing partial, nothing else


def test_existing_output_needs_overwrite(tmp_path, photo):
    src = tmp_path / "a.png"
    Image.fromarray(photo).save(src)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"keep")
    args = ["upscale", str(src), "-o", str(tmp_path / "out"), "--backend", "torch", "--preset", "tiny", "--steps", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert (tmp_path / "out" / "a.png").read_bytes() == b"keep"
    assert run(args + ["--overwrite"]).exit_code == 0


def test_bad_checkpoint_is_one_line(tmp_path, photo):
    src = tmp_path / "a.png"
    Image.fromarray(photo).save(src)
    proc = subprocess.run(
        [sys.executable, "-m", "deedsr.cli", "upscale", str(src), "-o", str(tmp_path / "o"),
         "--backend", "torch", "--checkpoint", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "config.json: missing" in proc.stderr and "Traceback" not in proc.stderr
