"""`deedsr serve` in a real Triton Inference Server (PyTriton's bundled binary) on the loopback
address and free ports, driven by real clients: concurrent mixed sizes byte for byte against
the local Upscaler, bad requests, `deedsr remote`, SIGTERM with requests in flight.

Runs in the serve environment (PyTriton 0.7.0 needs numpy < 2), which has no torch, so the
engine directory comes from $DEEDSR_SERVE_TEST_ENGINES (e.g. `deedsr-export --checkpoint
deedsr/assets/demo --out DIR --max-size 128 --precision fp32`, run by .ci/run with the main
environment), or from the tiny export of conftest.py where torch is importable.
"""
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton.triton", reason="needs the serve extra (pip install 'deedsr[serve]', numpy < 2)")

from click.testing import CliRunner
from deedsr.runtime.demo import ASSET
from deedsr.runtime.images import read_image
from deedsr.runtime.remote import RemoteError, RemoteUpscaler, Unreachable
from deedsr.runtime.serve import ServeConfig, Server, free_ports, wait_until_ready
from deedsr.runtime.upscaler import Upscaler
from helpers import make_bad_inputs
from PIL import Image

from deedsr.cli import main

STEPS = 2  # step 0 is noise-guided, so one UNet step: the protocol is under test, not the model
SIZES = [(16, 16), (24, 32), (72, 64)]  # (height, width); 72x64 is two latent tiles of the demo engines


@pytest.fixture(scope="module")
def engines(request):
    path = os.environ.get("DEEDSR_SERVE_TEST_ENGINES")
    if path:
        assert (Path(path) / "manifest.json").is_file(), f"DEEDSR_SERVE_TEST_ENGINES={path} has no manifest.json"
        return Path(path)
    if importlib.util.find_spec("torch") is None:
        pytest.skip("set DEEDSR_SERVE_TEST_ENGINES to an engine directory (no torch here to export one)")
    return request.getfixturevalue("tiny_engine_dir")


@pytest.fixture(scope="module")
def local(engines):
    return Upscaler.from_engine_dir(engines, backend="ort", precision="fp32", threads=1)


@pytest.fixture(scope="module")
def images():
    photo = read_image(ASSET)
    return {size: np.ascontiguousarray(photo[3:3 + size[0], 5:5 + size[1]]) for size in SIZES}


@pytest.fixture(scope="module")
def server(engines):
    http, grpc, metrics = free_ports(3)
    # A 0.2 s queue delay so that requests sent together are batched together.
    config = ServeConfig(http_port=http, grpc_port=grpc, metrics_port=metrics, max_batch=4, queue_delay_us=200_000)
    upscaler = Upscaler.from_engine_dir(engines, backend="ort", precision="fp32", threads=1)
    with Server([upscaler], config) as s:
        yield s


def metric(server, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.config.metrics_port}/metrics", timeout=10).read().decode()
    found = re.search(rf'^{name}{{model="deedsr",version="1"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else None


def raw_infer(server, **tensors):
    """A request through tritonclient directly (no client-side checks): (image or None, error text)."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    client = http.InferenceServerClient(server.url.split("://")[1], network_timeout=120)
    inputs = []
    for name, array in tensors.items():
        tensor = http.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    try:
        result = client.infer("deedsr", inputs)
    except InferenceServerException as e:
        return None, e.message()
    finally:
        client.close()
    return result.as_numpy("image"), result.as_numpy("error")[0, 0].decode()


def test_eight_concurrent_clients_of_mixed_sizes_get_the_local_bytes(server, local, images):
    """Every request's result is the local API's for its image, seed and steps, however the
    requests were queued and batched."""
    exec_before, count_before = metric(server, "nv_inference_exec_count") or 0, metric(server, "nv_inference_count") or 0
    expected = {(size, seed): local.upscale(image, seed=seed, steps=STEPS)
                for size, image in images.items() for seed in range(4)}
    results, failures = {}, []

    def client(i):
        try:
            with RemoteUpscaler(server.url) as remote:
                for j in range(3):
                    size = SIZES[(i + j) % 3]
                    results[(i, j)] = (size, i % 4, remote.upscale(images[size], seed=i % 4, steps=STEPS))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            failures.append(f"client {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures and len(results) == 24
    for size, seed, image in results.values():
        assert image.shape == (size[0] * 4, size[1] * 4, 3) and image.dtype == np.uint8
        assert np.array_equal(image, expected[(size, seed)]), (size, seed)
    assert metric(server, "nv_inference_count") - count_before == 24
    assert metric(server, "nv_inference_exec_count") - exec_before < 24  # some were batched


def test_malformed_requests_are_refused_and_the_server_keeps_serving(server, local, images):
    image = images[SIZES[0]][None]
    seed = np.array([[1]], np.int64)
    cases = [
        (dict(image=image.astype(np.float32), seed=seed), "data-type is 'FP32', but model 'deedsr' expects 'UINT8'"),
        (dict(image=image), "missing required input(s) ['seed']"),
        (dict(image=image, seed=seed.astype(np.int32)), "data-type is 'INT32', but model 'deedsr' expects 'INT64'"),
        (dict(image=image[..., :2].copy(), seed=seed), "unexpected shape for input 'image'"),
        (dict(image=np.zeros((1, 1, 1, 3), np.uint8), seed=seed), "image is 1x1; each side must be at least 8 pixels"),
        (dict(image=np.zeros((1, 200, 40, 3), np.uint8), seed=seed), "image is 40x200:"),
        (dict(image=image, seed=-seed), "seed must be a non-negative integer, got -1"),
        (dict(image=image, seed=seed, steps=np.array([[0]], np.int32)), "steps must be in 1.."),
    ]
    for tensors, message in cases:
        result, error = raw_infer(server, **tensors)
        assert result is None and message in error, (message, error)
    result, error = raw_infer(server, image=image, seed=seed, steps=np.array([[STEPS]], np.int32))
    assert error == "" and np.array_equal(result[0], local.upscale(image[0], seed=1, steps=STEPS))


def test_images_of_different_sizes_share_a_batch(server, local, images):
    """`image` is a ragged input: Triton batches sizes together, the runtime batches their tiles."""
    clients = [RemoteUpscaler(server.url) for _ in SIZES]  # connected before the requests go
    results = {}

    def send(i):
        with clients[i] as remote:
            results[i] = remote.upscale(images[SIZES[i]], seed=20 + i, steps=STEPS)

    executions = metric(server, "nv_inference_exec_count")
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(SIZES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert metric(server, "nv_inference_exec_count") - executions < len(SIZES)  # within the 0.2 s queue delay
    for i, size in enumerate(SIZES):
        assert np.array_equal(results[i], local.upscale(images[size], seed=20 + i, steps=STEPS))


def test_a_bad_request_batched_with_good_ones_fails_alone(server, local, images):
    """Sent together: one Triton batch; the bad one gets its reason, the others their image."""
    image = images[SIZES[1]]
    outcome = {}

    clients = {name: RemoteUpscaler(server.url) for name in ("good", "bad", "good2")}  # connected first

    def send(name, **kwargs):
        with clients[name] as remote:
            try:
                outcome[name] = remote.upscale(image, **kwargs)
            except RemoteError as e:
                outcome[name] = str(e)

    executions = metric(server, "nv_inference_exec_count")
    threads = [threading.Thread(target=send, args=("good",), kwargs=dict(seed=9, steps=STEPS)),
               threading.Thread(target=send, args=("bad",), kwargs=dict(seed=9, steps=5000)),
               threading.Thread(target=send, args=("good2",), kwargs=dict(seed=10, steps=STEPS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert outcome["bad"].startswith("steps must be in 1..") and "\n" not in outcome["bad"]
    assert np.array_equal(outcome["good"], local.upscale(image, seed=9, steps=STEPS))
    assert np.array_equal(outcome["good2"], local.upscale(image, seed=10, steps=STEPS))
    assert metric(server, "nv_inference_exec_count") - executions < 3  # they did share a batch (0.2 s queue delay)


def test_remote_command_is_upscale_on_the_server(server, local, images, tmp_path):
    folder = tmp_path / "in"
    bad = make_bad_inputs(folder, images[SIZES[1]])
    out, local_out = tmp_path / "out", tmp_path / "local"
    result = CliRunner().invoke(main, ["remote", server.url, str(folder), "-o", str(out), "--seed", "4",
                                       "--steps", str(STEPS)])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == len(bad)
    for name, reason in bad.items():
        assert any(name in line and reason in line for line in errors), (name, errors)
    assert sorted(p.name for p in out.iterdir()) == ["good.png"]  # nothing half-written
    result = CliRunner().invoke(main, ["upscale", str(folder / "good.png"), "-o", str(local_out), "--engines",
                                       str(local.manifest.root), "--backend", "ort", "--seed", "4", "--steps",
                                       str(STEPS)])
    assert result.exit_code == 0, result.output
    assert (out / "good.png").read_bytes() == (local_out / "good.png").read_bytes()
    result = CliRunner().invoke(main, ["remote", server.url, str(folder / "good.png"), "-o", str(out)])
    assert result.exit_code == 1 and "exists; pass --overwrite" in result.output


def test_remote_without_a_server_is_one_line(tmp_path):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    (port,) = free_ports(1)
    result = CliRunner().invoke(main, ["remote", f"http://127.0.0.1:{port}", str(tmp_path / "a.png"), "-o",
                                       str(tmp_path / "out"), "--connect-timeout", "2"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], result.output
    with pytest.raises(Unreachable):
        RemoteUpscaler(f"http://127.0.0.1:{port}", init_timeout_s=2)


def test_sigterm_finishes_requests_in_flight_then_exits_zero(engines, local, images):
    http, grpc, metrics = free_ports(3)
    homes_before = set(Path(tempfile.gettempdir()).glob("deedsr-triton-*"))
    cmd = [sys.executable, "-m", "deedsr.cli", "serve", "--engines", str(engines), "--backend", "ort",
           "--threads", "1", "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--queue-delay-us", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{http}"
        wait_until_ready(url, timeout_s=120)
        size, steps = SIZES[2], 6
        results = {}

        clients = {seed: RemoteUpscaler(url) for seed in (1, 2, 3)}  # connected before the requests go

        done_at = {}

        def send(seed):
            with clients[seed] as remote:
                results[seed] = remote.upscale(images[size], seed=seed, steps=steps)
                done_at[seed] = time.monotonic()

        threads = [threading.Thread(target=send, args=(seed,)) for seed in clients]
        for t in threads:
            t.start()
        time.sleep(0.6)  # past the 0.1 s queue delay: the batch runs (a few seconds)
        signalled_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=120)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-2000:]
    assert "serving model 'deedsr'" in output and output.rstrip().endswith("stopped")
    assert sorted(results) == [1, 2, 3]
    assert min(done_at.values()) > signalled_at  # they were in flight when the signal came
    for seed, image in results.items():
        assert np.array_equal(image, local.upscale(images[size], seed=seed, steps=steps))
    with pytest.raises(Unreachable):  # and it is gone
        RemoteUpscaler(url, init_timeout_s=2)
    assert set(Path(tempfile.gettempdir()).glob("deedsr-triton-*")) == homes_before  # its workspace removed


def test_serve_on_a_busy_port_is_one_line(engines):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        http, metrics = free_ports(2)
        result = CliRunner().invoke(main, ["serve", "--engines", str(engines), "--http-port", str(http),
                                           "--grpc-port", str(port), "--metrics-port", str(metrics)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1
    assert lines == [f"Error: Triton did not start: cannot listen on 127.0.0.1:{port}: Address already in use"]
