import dataclasses
import math

import cv2
import numpy as np
import pytest
from scipy import special
from skimage import data

from deedsr import degradations as D
from deedsr.metrics import psnr


@pytest.fixture(scope="module")
def hr() -> np.ndarray:
    img = cv2.resize(data.astronaut(), (128, 128), interpolation=cv2.INTER_AREA)
    return img.astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def hr256() -> np.ndarray:
    img = cv2.resize(data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    return img.astype(np.float32) / 255.0


# ------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("size", [7, 11, 21])
def test_fixed_kernels_sum_to_one_and_have_size(size):
    kernels = [
        D.gaussian_kernel(size, 1.2),
        D.gaussian_kernel(size, 1.2, 0.5, 0.7),
        D.generalized_gaussian_kernel(size, 1.0, beta=0.5),
        D.generalized_gaussian_kernel(size, 1.0, 2.0, -1.0, beta=2.0),
        D.plateau_kernel(size, 1.0, beta=1.3),
        D.plateau_kernel(size, 0.8, 1.4, 2.0, beta=1.5),
        D.sinc_kernel(size, math.pi / 3),
    ]
    for k in kernels:
        assert k.shape == (size, size)
        assert k.dtype == np.float32
        assert k.sum() == pytest.approx(1.0, abs=1e-5)
        # point-symmetric, so filtering by correlation equals convolution
        np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-7)


def test_iso_gaussian_matches_formula():
    size, sigma = 21, 1.3
    r = np.arange(size) - size // 2
    expected = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    expected /= expected.sum()
    np.testing.assert_allclose(D.gaussian_kernel(size, sigma), expected, atol=1e-7)
    g = cv2.getGaussianKernel(size, sigma)
    np.testing.assert_allclose(D.gaussian_kernel(size, sigma), g @ g.T, atol=1e-7)


def test_aniso_gaussian_axes_and_rotation():
    k = D.gaussian_kernel(15, 2.0, 0.5, 0.0)
    c = 7
    assert k[c, c + 3] > k[c + 3, c]  # wider along x (columns)
    np.testing.assert_allclose(D.gaussian_kernel(15, 2.0, 0.5, math.pi / 2), k.T, atol=1e-7)
    np.testing.assert_allclose(D.gaussian_kernel(15, 1.1, 1.1, 0.9), D.gaussian_kernel(15, 1.1), atol=1e-7)


def test_generalized_with_beta_one_is_gaussian():
    np.testing.assert_allclose(
        D.generalized_gaussian_kernel(13, 1.4, 0.8, 0.3, beta=1.0),
        D.gaussian_kernel(13, 1.4, 0.8, 0.3),
        atol=1e-7,
    )


def test_sinc_kernel_centre_and_padding():
    omega = math.pi / 2
    k = D.sinc_kernel(11, omega, pad_to=21)
    assert k.shape == (21, 21)
    assert k.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.all(k[:5] == 0) and np.all(k[:, -5:] == 0)
    assert k[10, 10] == k.max()
    # unnormalised centre is omega^2 / (4 pi); ratio to a neighbour follows J1
    r = 1.0
    neighbour = omega * special.j1(omega * r) / (2 * math.pi * r)
    assert k[10, 11] / k[10, 10] == pytest.approx(neighbour / (omega**2 / (4 * math.pi)), rel=1e-5)


def test_bad_kernel_size():
    with pytest.raises(ValueError):
        D.gaussian_kernel(8, 1.0)


def test_random_kernels_sum_to_one_and_sizes_odd_in_range():
    rng = np.random.default_rng(0)
    sizes = set()
    for _ in range(200):
        k = D.random_blur_kernel(rng, sinc_prob=0.3)
        assert k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1 and 7 <= k.shape[0] <= 21
        assert k.sum() == pytest.approx(1.0, abs=1e-5)
        sizes.add(k.shape[0])
    assert sizes == set(range(7, 22, 2))
    for _ in range(50):
        k = D.random_mixed_kernel(rng, 21)
        assert k.shape == (21, 21) and k.sum() == pytest.approx(1.0, abs=1e-5)


def test_final_sinc_probability():
    rng = np.random.default_rng(1)
    hits = sum(D.random_final_sinc_kernel(rng, prob=0.8) is not None for _ in range(2000))
    assert 0.75 < hits / 2000 < 0.85
    assert D.random_final_sinc_kernel(rng, prob=0.0) is None


# ----------------------------------------------------------------------- config


def test_default_config_is_reference():
    c = D.DegradationConfig()
    assert c.scale == 4 and c.gt_size == 512
    assert c.kernel_probs == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert (c.sinc_prob, c.final_sinc_prob, c.second_blur_prob) == (0.1, 0.8, 0.5)
    assert (c.blur_sigma, c.blur_sigma2) == ((0.2, 1.5), (0.2, 1.0))
    assert (c.betag_range, c.betap_range) == ((0.5, 2.0), (1.0, 1.5))
    assert (c.resize_prob, c.resize_range) == ((0.2, 0.7, 0.1), (0.3, 1.5))
    assert (c.resize_prob2, c.resize_range2) == ((0.3, 0.4, 0.3), (0.6, 1.2))
    assert (c.noise_range, c.noise_range2) == ((1, 15), (1, 12))
    assert (c.poisson_scale_range, c.poisson_scale_range2) == ((0.05, 2.0), (0.05, 1.0))
    assert (c.gaussian_noise_prob, c.gray_noise_prob) == (0.5, 0.4)
    assert (c.jpeg_range, c.jpeg_range2) == ((60, 95), (60, 100))


def test_config_rejects_bad_probabilities():
    with pytest.raises(ValueError, match="resize_prob"):
        D.DegradationConfig(resize_prob=(0.5, 0.5, 0.5))


# ---------------------------------------------------------------------- pipeline


def test_degrade_shape_dtype_range(hr):
    for seed in range(12):
        lr = D.degrade(hr, np.random.default_rng(seed))
        assert lr.shape == (32, 32, 3)
        assert lr.dtype == np.float32
        assert lr.min() >= 0.0 and lr.max() <= 1.0
        # quantised to 8-bit levels
        np.testing.assert_allclose(lr * 255, np.round(lr * 255), atol=1e-3)


def test_degrade_non_square(hr256):
    lr = D.degrade(hr256[:128, :200], np.random.default_rng(3))
    assert lr.shape == (32, 50, 3)


def test_degrade_is_deterministic(hr):
    a = D.degrade(hr, np.random.default_rng(7))
    b = D.degrade(hr, np.random.default_rng(7))
    c = D.degrade(hr, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_degrade_does_not_touch_input(hr):
    before = hr.copy()
    D.degrade(hr, np.random.default_rng(0))
    np.testing.assert_array_equal(hr, before)


def test_degrade_covers_all_branches(hr):
    # resize ups/downs, both noises, second blur and both final orders are exercised
    cfgs = [
        dataclasses.replace(D.DegradationConfig(), resize_prob=(1, 0, 0), gaussian_noise_prob=0.0,
                            gray_noise_prob=1.0, second_blur_prob=1.0, sinc_prob=1.0),
        dataclasses.replace(D.DegradationConfig(), resize_prob=(0, 1, 0), resize_prob2=(1, 0, 0),
                            gaussian_noise_prob2=0.0, gray_noise_prob2=0.0, final_sinc_prob=1.0),
    ]
    for cfg in cfgs:
        for seed in range(4):
            lr = D.degrade(hr, np.random.default_rng(seed), cfg)
            assert lr.shape == (32, 32, 3) and 0 <= lr.min() and lr.max() <= 1


def test_no_degradation_branch_is_bicubic(hr):
    cfg = dataclasses.replace(D.DegradationConfig(), no_degradation_prob=1.0)
    lr = D.degrade(hr, np.random.default_rng(0), cfg)
    ref = np.clip(cv2.resize(hr, (32, 32), interpolation=cv2.INTER_CUBIC), 0, 1)
    np.testing.assert_allclose(lr, np.round(ref * 255) / 255, atol=1e-6)


def test_make_pair(hr):
    u8 = np.round(hr * 255).astype(np.uint8)
    hr_out, lr = D.make_pair(u8, np.random.default_rng(0), D.DegradationConfig())
    assert hr_out.dtype == np.float32 and hr_out.shape == (128, 128, 3)
    np.testing.assert_allclose(hr_out, u8 / 255.0, atol=1e-7)
    assert lr.shape == (32, 32, 3)
    _, lr_f = D.make_pair(u8.astype(np.float32) / 255, np.random.default_rng(0), D.DegradationConfig())
    np.testing.assert_array_equal(lr, lr_f)


def test_make_pair_rejects_indivisible_sides(hr):
    with pytest.raises(ValueError, match="divisible by the scale 4"):
        D.make_pair(hr[:126], np.random.default_rng(0), D.DegradationConfig())


def test_rejects_bad_inputs(hr):
    with pytest.raises(ValueError, match="HxWx3"):
        D.degrade(hr[..., 0], np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        D.degrade(hr * 255, np.random.default_rng(0))


# ------------------------------------------------------------------------ levels


def test_levels_follow_table_6():
    assert set(D.LEVELS) == {"light", "medium", "heavy"}
    heavy = D.LEVELS["heavy"]
    assert heavy.blur_sigma == (1.1, 1.5) and heavy.noise_range == (10.0, 15.0)
    assert heavy.jpeg_range == (60, 70) and heavy.jpeg_range2 == (60, 73)
    for cfg in D.LEVELS.values():
        assert cfg.resize_prob == (0, 0, 1) and cfg.resize_prob2 == (0, 0, 1)
        assert cfg.second_blur_prob == 0 and cfg.gaussian_noise_prob == 1 == cfg.gaussian_noise_prob2


def test_levels_deterministic_and_ordered(hr256):
    ref = cv2.resize(hr256, (64, 64), interpolation=cv2.INTER_CUBIC)
    scores = {}
    for level in D.LEVELS:
        outs = [D.degrade_level(hr256, level, np.random.default_rng(s)) for s in range(3)]
        again = D.degrade_level(hr256, level, np.random.default_rng(0))
        np.testing.assert_array_equal(outs[0], again)
        assert outs[0].shape == (64, 64, 3) and outs[0].dtype == np.float32
        scores[level] = [psnr(o, ref, y_channel=False) for o in outs]
    for s in range(3):
        assert scores["light"][s] > scores["medium"][s] > scores["heavy"][s]


def test_unknown_level(hr):
    with pytest.raises(ValueError, match="valid levels: light, medium, heavy"):
        D.degrade_level(hr, "extreme", np.random.default_rng(0))
