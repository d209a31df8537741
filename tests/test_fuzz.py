"""Fuzz-style robustness (issue 11): a valid manifest mutated field by field and a valid PNG
mutated byte by byte, against the real tiny engine directory and onnxruntime.

Every case must end in one of two ways: a one-line error of the kinds the runtime documents
(EngineError, ShapeError, ValueError, ImageError, BackendError), or exactly the image the
unmutated inputs give. Never another exception (a traceback for the user), never a different
image. Seeded and bounded: the same cases every run, sized to finish in about 20 s here.
"""
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
from deedsr.runtime.errors import BackendError, EngineError, ShapeError
from deedsr.runtime.images import ImageError, read_image
from deedsr.runtime.upscaler import Upscaler
from click.testing import CliRunner
from PIL import Image

from deedsr.cli import main

SEED = 11
OPTIONS = dict(steps=2, eta=1.0, noise_guidance_steps=(0,), init="noise", tile=16, tile_overlap=8, color_fix="none")
EXPECTED = (EngineError, ShapeError, ValueError, ImageError, BackendError, MemoryError)
VALUES = [None, "x", -1, 0, 1, float("nan"), float("inf"), 1e308, 2 ** 70, [], {}, True, "../../../etc/passwd"]
MANIFEST_CASES = 220  # mutations drawn from all of them (field x value), seeded
PNG_CASES = 1500
CLI_CASES = 40  # of them, also through `deedsr upscale` in one batch


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DEEDSR_CACHE", str(tmp_path_factory.getbasetemp() / "fuzz-cache"))


@pytest.fixture(scope="module")
def lr_image(photo):
    return np.ascontiguousarray(photo[:16, :16])


@pytest.fixture(scope="module")
def reference(tiny_engine_dir, lr_image):
    """The unmutated directory's Upscaler (every graph loaded) and its image."""
    up = Upscaler.from_engine_dir(tiny_engine_dir, backend="ort", precision="fp32")
    up.backend.preload()
    return up, up.upscale(lr_image, seed=0, **OPTIONS)


@pytest.fixture(scope="module")
def baseline(reference):
    return reference[1]


def _session_key(data, graph):
    """What decides the onnxruntime session of a graph: its file and declared tensors."""
    try:
        g = data["graphs"][graph]
        entry = g["precisions"]["fp32"]
        return json.dumps([g["inputs"], g["outputs"], entry["file"], entry.get("external_data")])
    except (KeyError, TypeError):
        return None


def _paths(node, prefix=()):
    """Every path into the JSON tree (containers and leaves); long float lists sampled."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        if len(node) > 20:
            indices = [0, 1, len(node) // 2, len(node) - 2, len(node) - 1]
        else:
            indices = range(len(node))
        for i in indices:
            yield from _paths(node[i], prefix + (i,))


def _mutate(data, path, value):
    """A deep copy of data with the node at path replaced by value ("DELETE" removes it)."""
    data = json.loads(json.dumps(data))
    if not path:
        return value
    node = data
    for p in path[:-1]:
        node = node[p]
    if value == "DELETE":
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


def _one_line(e: BaseException) -> None:
    text = str(e)
    assert text and "\n" not in text and "Traceback" not in text, repr(text)


def test_manifest_mutations(tiny_engine_dir, tmp_path, lr_image, reference, baseline):
    # hard links: the fuzzed directory's graphs are real files inside it (a symlink would point out)
    root = tmp_path / "fuzz"
    for f in Path(tiny_engine_dir).rglob("*"):
        if f.is_file() and f.name != "manifest.json":
            (root / f.relative_to(tiny_engine_dir)).parent.mkdir(parents=True, exist_ok=True)
            os.link(f, root / f.relative_to(tiny_engine_dir))
    valid = json.loads((Path(tiny_engine_dir) / "manifest.json").read_text())
    cases = [(path, value) for path in _paths(valid) if path for value in ["DELETE", *VALUES]]
    rng = random.Random(SEED)
    rng.shuffle(cases)
    ref, _ = reference
    outcomes = {"refused at load": 0, "refused later": 0, "same image": 0, "scheduler changed": 0}
    started = time.perf_counter()
    for path, value in cases[:MANIFEST_CASES]:
        mutated = _mutate(valid, path, value)
        (root / "manifest.json").write_text(json.dumps(mutated))
        where = f"{'.'.join(map(str, path))} = {value!r}"
        try:
            up = Upscaler.from_engine_dir(root, backend="ort", precision="fp32")
            # Creating onnxruntime sessions takes ~2.7 s a directory here; a graph whose file and
            # declared tensors are unchanged reuses the reference's session (the file's bytes are
            # the same: they were just hashed). Any other graph is loaded and checked afresh.
            for graph in up.backend.graphs():
                if _session_key(mutated, graph) == _session_key(valid, graph):
                    up.backend._sessions[graph] = ref.backend.session(graph)
            up.backend.preload()
        except EXPECTED as e:
            _one_line(e)
            outcomes["refused at load"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - anything else is the bug this test looks for
            pytest.fail(f"{where}: {type(e).__name__}: {e}")
        try:
            got = up.upscale(lr_image, seed=0, **OPTIONS)
        except EXPECTED as e:
            _one_line(e)
            outcomes["refused later"] += 1
            continue
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{where}: {type(e).__name__}: {e}")
        if path == ("scheduler", "steps_offset") and value != valid["scheduler"]["steps_offset"]:
            # another valid offset is another DDIM schedule: a different image is the right one
            assert got.shape == baseline.shape and got.dtype == np.uint8
            outcomes["scheduler changed"] += 1
            continue
        assert np.array_equal(got, baseline), f"{where}: exit 0 with a different image"
        outcomes["same image"] += 1
    elapsed = time.perf_counter() - started
    print(f"\nmanifest fuzz: {MANIFEST_CASES} of {len(cases)} mutations in {elapsed:.1f} s: {outcomes}")
    assert sum(outcomes.values()) == MANIFEST_CASES
    assert outcomes["refused at load"] > MANIFEST_CASES // 2 and outcomes["same image"] > 0


def _png_mutations(data: bytes, rng: random.Random, n: int):
    for i in range(n):
        kind = i % 6
        b = bytearray(data)
        if kind == 0:  # flip one bit
            pos = rng.randrange(len(b))
            b[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:  # one random byte
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif kind == 2:  # truncate
            b = b[:rng.randrange(len(b))]
        elif kind == 3:  # insert bytes
            pos = rng.randrange(len(b))
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif kind == 4:  # a byte of the header or IHDR (sizes, depth, colour type)
            b[rng.randrange(8, 33)] = rng.choice([0, 1, 2, 3, 4, 6, 8, 16, 255])
        else:  # several bytes in a row
            pos = rng.randrange(len(b))
            for j in range(pos, min(len(b), pos + rng.randrange(2, 16))):
                b[j] = rng.randrange(256)
        yield kind, bytes(b)


def test_png_mutations(tmp_path, tiny_engine_dir, lr_image, baseline):
    src = tmp_path / "valid.png"
    Image.fromarray(lr_image).save(src)
    data = src.read_bytes()
    original = read_image(src)
    rng = random.Random(SEED)
    up = Upscaler.from_engine_dir(tiny_engine_dir, backend="ort", precision="fp32")
    outcomes = {"refused": 0, "same pixels": 0, "other pixels": 0}
    started = time.perf_counter()
    target = tmp_path / "m.png"
    for i, (kind, mutated) in enumerate(_png_mutations(data, rng, PNG_CASES)):
        target.write_bytes(mutated)
        try:
            image = read_image(target)
        except ImageError as e:
            _one_line(e)
            outcomes["refused"] += 1
            continue
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"case {i} (kind {kind}): {type(e).__name__}: {e}")
        if image.shape == original.shape and np.array_equal(image, original):
            outcomes["same pixels"] += 1  # e.g. bytes after IEND: the same image, so the same result
            continue
        outcomes["other pixels"] += 1  # a PNG that is valid (CRCs hold) but shows another image
        try:
            up.upscale(image, seed=0, **OPTIONS)
        except EXPECTED as e:
            _one_line(e)
    elapsed = time.perf_counter() - started
    print(f"\nPNG fuzz: {PNG_CASES} mutations in {elapsed:.1f} s: {outcomes}")
    assert sum(outcomes.values()) == PNG_CASES and outcomes["refused"] > PNG_CASES // 2
    # A mutated file that decodes to other pixels must have intact CRCs, i.e. be a valid PNG of
    # another image (a changed IHDR field with a recomputed CRC cannot come from one mutation).
    assert outcomes["other pixels"] == 0
    # the unmutated bytes still give the baseline image through the same path
    np.testing.assert_array_equal(up.upscale(read_image(src), seed=0, **OPTIONS), baseline)

    # The command line: one batch of the valid file and mutated ones: a one-line error for each
    # mutated file, no traceback, and the valid file's output is the baseline image.
    batch = tmp_path / "batch"
    batch.mkdir()
    (batch / "valid.png").write_bytes(data)
    for i, (_, mutated) in enumerate(_png_mutations(data, random.Random(SEED + 1), CLI_CASES)):
        (batch / f"m{i:03d}.png").write_bytes(mutated)
    out = tmp_path / "out"
    args = ["upscale", str(batch), "-o", str(out), "--engines", str(tiny_engine_dir), "--precision", "fp32",
            "--seed", "0", *[f"--{k.replace('_', '-')}={v}" for k, v in OPTIONS.items() if k != "noise_guidance_steps"],
            "--noise-guidance-steps", "0"]
    result = CliRunner().invoke(main, args)
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    written = sorted(p.name for p in out.iterdir())
    for name in sorted(p.name for p in batch.iterdir()):
        assert name in written or sum(f"{batch / name}: " in line for line in lines) == 1, name
    assert result.exit_code == (1 if lines else 0)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "valid.png")), baseline)
