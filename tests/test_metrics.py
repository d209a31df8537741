import math

import cv2
import numpy as np
import pytest
from skimage import color, data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from deedsr.metrics import psnr, rgb_to_y, ssim


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    a = cv2.resize(data.astronaut(), (128, 128), interpolation=cv2.INTER_AREA)
    noise = np.random.default_rng(0).normal(0, 8, a.shape)
    b = np.clip(cv2.GaussianBlur(a, (5, 5), 1.0) + noise, 0, 255).round().astype(np.uint8)
    return a, b


def test_y_channel_formula():
    img = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0]]], dtype=np.uint8)
    y = rgb_to_y(img)
    np.testing.assert_allclose(y[0], [16.0, 235.0, 16.0 + 65.481])
    rnd = np.random.default_rng(0).random((8, 8, 3))
    np.testing.assert_allclose(rgb_to_y(rnd), color.rgb2ycbcr(rnd)[..., 0], atol=1e-9)


def test_psnr_identical_is_inf(pair):
    a, _ = pair
    assert psnr(a, a) == math.inf
    assert psnr(a / 255.0, a / 255.0, y_channel=False) == math.inf


def test_psnr_known_offset():
    a = np.full((16, 16, 3), 0.3)
    b = a + 0.1
    assert psnr(a, b, y_channel=False) == pytest.approx(20.0)
    # every channel moves by 0.1, so Y moves by 0.1 * (65.481 + 128.553 + 24.966) = 21.9
    assert psnr(a, b) == pytest.approx(20 * math.log10(255 / 21.9))


def test_uint8_and_float_agree(pair):
    a, b = pair
    assert psnr(a, b) == pytest.approx(psnr(a / 255.0, b.astype(np.float32) / 255.0), rel=1e-6)
    assert ssim(a, b) == pytest.approx(ssim(a / 255.0, b / 255.0), rel=1e-6)


def test_ssim_identical_is_one(pair):
    a, _ = pair
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, a, y_channel=False) == pytest.approx(1.0)


@pytest.mark.parametrize("crop", [0, 4])
def test_agree_with_skimage(pair, crop):
    a, b = pair
    sl = slice(crop, a.shape[0] - crop)
    ya, yb = rgb_to_y(a)[sl, sl], rgb_to_y(b)[sl, sl]
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)

    assert psnr(a, b, crop_border=crop) == pytest.approx(peak_signal_noise_ratio(ya, yb, data_range=255))
    assert ssim(a, b, crop_border=crop) == pytest.approx(structural_similarity(ya, yb, **kw), abs=1e-9)

    ra, rb = a[sl, sl].astype(np.float64), b[sl, sl].astype(np.float64)
    assert psnr(a, b, y_channel=False, crop_border=crop) == pytest.approx(
        peak_signal_noise_ratio(ra, rb, data_range=255)
    )
    assert ssim(a, b, y_channel=False, crop_border=crop) == pytest.approx(
        structural_similarity(ra, rb, channel_axis=2, **kw), abs=1e-9
    )
    assert 0.0 < ssim(a, b) < 1.0


def test_shape_mismatch(pair):
    a, b = pair
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, b[:-1])
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(a, b[:, :-1])


def test_bad_arguments(pair):
    a, b = pair
    with pytest.raises(ValueError):
        psnr(a[..., 0], b[..., 0])  # Y needs RGB
    assert psnr(a[..., 0], b[..., 0], y_channel=False) > 0
    with pytest.raises(ValueError):
        psnr(a, b, crop_border=64)
    with pytest.raises(ValueError):
        ssim(a[:8, :8], b[:8, :8])
    with pytest.raises(TypeError):
        psnr(a.astype(np.int32), b.astype(np.int32))


def test_flat_region_ratio_sees_mottle_in_flat_areas():
    from scipy import ndimage

    from deedsr.metrics import flat_region_ratio

    hr = data.astronaut()[:256, :256]
    assert flat_region_ratio(hr, hr) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    mottled = np.clip(hr + rng.normal(0, 4, hr.shape), 0, 255).astype(np.uint8)
    blurred = ndimage.gaussian_filter(hr.astype(float), (2, 2, 0)).round().astype(np.uint8)
    assert flat_region_ratio(mottled, hr) > 1.5  # grain of 4 grey levels over the smooth background
    assert flat_region_ratio(blurred, hr) < 1.0
    with pytest.raises(ValueError, match="no 16x16 block"):
        flat_region_ratio(hr[:8, :8], hr[:8, :8])
