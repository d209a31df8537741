"""The serving model's batch logic (deedsr.runtime.serve.UpscaleModel) on real tiny engines and
onnxruntime, without Triton: what a Triton batch of requests turns into. The same model inside a
real Triton server is tested by tests/test_serve.py (the serve environment, numpy < 2)."""
import importlib.util

import numpy as np
import pytest
from click.testing import CliRunner
from deedsr.runtime.remote import _reason
from deedsr.runtime.serve import RequestRejected, UpscaleModel
from deedsr.runtime.upscaler import Upscaler

from deedsr.cli import main

STEPS = 3


@pytest.fixture(scope="module")
def upscaler(tiny_engine_dir):
    return Upscaler.from_engine_dir(tiny_engine_dir, backend="ort", precision="fp32", threads=1)


def request(image, seed, steps=None):
    r = {"image": image[None], "seed": np.array([[seed]], np.int64)}
    if steps is not None:
        r["steps"] = np.array([[steps]], np.int32)
    return r


def crops(photo):
    # 40x48 is 2x3 latent tiles of 16 with the conftest engines; 24x32 is 1x2.
    return photo, np.ascontiguousarray(photo[:24, :32]), np.ascontiguousarray(photo[8:, 4:44])


def test_a_batch_gives_the_bytes_of_one_call_per_image(upscaler, photo):
    """Tiles of several images share graph calls; with one generator per request the result is
    byte for byte one `upscale` call per image (onnxruntime CPU: batch size does not change a
    tile's arithmetic)."""
    a, b, c = crops(photo)
    requests = [request(a, 5, STEPS), request(b, 6, STEPS), request(c, 7, STEPS), request(a, 8, 2)]
    responses = UpscaleModel(upscaler)(requests)
    expected = [upscaler.upscale(a, seed=5, steps=STEPS), upscaler.upscale(b, seed=6, steps=STEPS),
                upscaler.upscale(c, seed=7, steps=STEPS), upscaler.upscale(a, seed=8, steps=2)]
    for response, want in zip(responses, expected):
        assert response["error"].tolist() == [[b""]]
        assert response["image"].shape == (1, *want.shape) and response["image"].dtype == np.uint8
        assert np.array_equal(response["image"][0], want)
    # the default step count when a request has none: the engines' (tiny export: 50) is long,
    # so only check that it is the manifest's and that options() accepted it
    assert upscaler.options(steps=None).steps == upscaler.default_steps


def test_bad_requests_in_a_batch_get_their_own_error_and_the_rest_their_image(upscaler, photo):
    a = photo
    requests = [request(a, 1, STEPS), request(a, 2, 0), request(a, -3, STEPS), request(a[:1, :1], 4, STEPS),
                {"image": a[None]}, request(np.zeros((8, 200, 3), np.uint8), 5, STEPS)]
    responses = UpscaleModel(upscaler)(requests)
    assert np.array_equal(responses[0]["image"][0], upscaler.upscale(a, seed=1, steps=STEPS))
    errors = [r["error"][0, 0].decode() for r in responses]
    assert errors[0] == ""
    assert errors[1].startswith("steps must be in 1..")
    assert errors[2] == "seed must be a non-negative integer, got -3"
    assert errors[3] == "image is 1x1; each side must be at least 8 pixels"
    assert errors[4] == "seed is missing"
    assert errors[5].startswith("image is 200x8:")
    for r in responses[1:]:
        assert r["image"].shape == (1, 1, 1, 3)
        assert "\n" not in r["error"][0, 0].decode()


def test_a_batch_of_only_bad_requests_raises_one_line(upscaler, photo):
    """Nothing to return: PyTriton sends the exception to every client of the batch."""
    with pytest.raises(RequestRejected) as info:
        UpscaleModel(upscaler)([request(photo[:1, :1], 1), request(photo[:1, :1], 2)])
    assert str(info.value) == "image is 1x1; each side must be at least 8 pixels"  # once, not twice


def test_the_client_finds_the_reason_in_pytriton_error_text():
    text = ("Error occurred during inference request. Message: Failed to process the request(s) for model "
            "'deedsr_0_0', message: TritonModelException: Model execute error: Traceback (most recent call "
            "last):\n  File \"x.py\", line 1, in execute\n    raise e\nc_python_backend_utils.TritonModelException: "
            "Traceback (most recent call last):\n  File \"serve.py\", line 80, in __call__\n"
            "deedsr.runtime.serve.RequestRejected: image is 1x1; each side must be at least 8 pixels\n\n\n\nAt:\n"
            "  /tmp/folderX/1/model.py(501): execute\n")
    assert _reason(text) == "image is 1x1; each side must be at least 8 pixels"
    triton = ("Error occurred during inference request. Message: [request id: 3] inference input 'image' "
              "data-type is 'FP32', but model 'deedsr' expects 'UINT8'")
    assert _reason(triton) == "inference input 'image' data-type is 'FP32', but model 'deedsr' expects 'UINT8'"
    crash = ("Message: Failed to process the request(s) for model 'deedsr_0_0', message: TritonModelException: "
             "Model execute error: Traceback (most recent call last):\n  File \"data.py\", line 707, in _copy\n"
             "    shm.buf[0:1] = frame.cast(\"B\")\nTypeError: memoryview: cannot cast view with zeros in shape\n\n"
             "At:\n  /tmp/folderX/1/model.py(501): execute\n")
    assert _reason(crash) == "server error: TypeError: memoryview: cannot cast view with zeros in shape"


@pytest.mark.skipif(importlib.util.find_spec("pytriton") is not None, reason="PyTriton is installed here")
@pytest.mark.parametrize("command", [["serve"], ["remote", "http://127.0.0.1:9", "x.png", "-o", "out"]])
def test_serve_and_remote_without_the_extra_say_what_to_install(command, tmp_path):
    result = CliRunner().invoke(main, command)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1
    assert "pip install 'deedsr[serve]'" in lines[0]
