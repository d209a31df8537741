"""The sampling profiles' host maths, checked from first principles: torch's own bicubic on a
real photo, the public code's padding rule worked out by hand on chosen sides, torch's reflect
padding, truncation, and the posterior draw's place in the generator's order."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from deedsr.runtime import profiles
from deedsr.runtime.imageops import bicubic_upscale
from deedsr.runtime.profiles import (
    PAPER,
    REFERENCE_CODE,
    get_profile,
    reference_padding,
)
from skimage import data


def _nchw(hwc):
    return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))[None]


def test_numpy_bicubic_equals_torch_interpolate_on_a_photo():
    photo = data.astronaut()[96:196, 160:280].astype(np.float32) / 255  # 100x120 of face and textures
    torch.set_num_threads(1)
    expected = F.interpolate(_nchw(photo), scale_factor=4, mode="bicubic", align_corners=False)[0]
    expected = expected.permute(1, 2, 0).numpy()
    got = profiles.torch_bicubic_upscale(photo, 4)
    err = np.abs(got - expected).max()
    pillow = np.abs(bicubic_upscale(photo, 4) - expected).max()
    print(f"\nnumpy torch-bicubic vs torch: max abs {err:.2e}; Pillow (a=-0.5) vs torch: {pillow:.3f}")
    assert got.dtype == np.float32 and got.shape == expected.shape == (400, 480, 3)
    assert err <= 1e-6
    assert pillow > 0.01  # the two kernels really differ on a photo: the profile matters


def test_bicubic_kernel_at_a_known_point():
    # 1-D ramp with one step: output 0 of a x4 upscale sits at source position -0.375, whose taps
    # are pixels -2, -1, 0, 1 clamped to 0, 0, 0, 1 with weights of Keys' kernel, a = -0.75, at
    # distances 1.625, 0.625, 0.375, 1.375.
    def keys(x, a=-0.75):
        x = abs(x)
        return ((a + 2) * x - (a + 3)) * x * x + 1 if x <= 1 else ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    image = np.array([[0.0], [1.0], [1.0], [1.0]], np.float32)[:, :, None]  # 4x1x1, HxWxC
    got = profiles.torch_bicubic_upscale(image, 4)[0, 0, 0]
    expected = 0 * (keys(1.625) + keys(0.625) + keys(0.375)) + 1 * keys(1.375)
    assert got == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("height,width,expected", [
    (63, 64, (1, 64)),        # one side needs padding: both get the rule, 64 gains a whole 64
    (64, 64, (0, 0)),         # both multiples: untouched
    (65, 64, (63, 64)),
    (1024, 1024, (0, 0)),
    (1025, 1024, (63, 64)),
    (1024, 1025, (64, 63)),
    (1025, 1025, (63, 63)),
])
def test_reference_padding_rule(height, width, expected):
    assert reference_padding(height, width) == expected


def test_reference_pad_is_torch_reflect_and_the_lr_sizes_agree():
    rng = np.random.default_rng(0)
    image = rng.random((100, 130, 3), dtype=np.float32)  # x4 image 100x130 -> 128x192
    got = profiles.pad_reference(image, 64)
    assert got.shape == (128, 192, 3)
    expected = F.pad(_nchw(image), (0, 62, 0, 28), mode="reflect")[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)
    ref = get_profile(REFERENCE_CODE)
    for h in range(8, 80):
        for w in (8, 15, 16, 17, 33, 64):
            ph, pw = ref.padded_lr_size(h, w, 16)
            bottom, right = reference_padding(4 * h, 4 * w, 64)
            assert (4 * ph, 4 * pw) == (4 * h + bottom, 4 * w + right)
    assert get_profile(PAPER).padded_lr_size(17, 32, 16) == (32, 32)
    assert ref.padded_lr_size(17, 32, 16) == (32, 48)
    assert ref.largest_padded_side(32, 16) == 48 and get_profile(PAPER).largest_padded_side(32, 16) == 32


def test_reference_code_upscale_pads_after_the_bicubic():
    lr = data.coffee()[:20, :33].astype(np.float32) / 255  # x4: 80x132 -> 128x192
    up = get_profile(REFERENCE_CODE).upscale(lr, 4, 16)
    assert up.shape == (128, 192, 3)
    np.testing.assert_array_equal(up[:80, :132], profiles.torch_bicubic_upscale(lr, 4))
    assert get_profile(PAPER).upscale(lr, 4, 16).shape == (128, 192, 3)  # LR padded to 32x48 first


def test_uint8_rounding_and_truncation():
    values = np.array([0.0, 0.4 / 255, 0.6 / 255, 254.7 / 255, 1.0, 1.3], np.float32)
    assert get_profile(PAPER).to_uint8(values).tolist() == [0, 0, 1, 255, 255, 255]
    assert get_profile(REFERENCE_CODE).to_uint8(values).tolist() == [0, 0, 0, 254, 255, 255]


def test_lr_latent_draws_the_posterior_first_only_under_reference_code():
    rng_values = np.random.default_rng(5)
    mean = rng_values.standard_normal((1, 4, 6, 5), dtype=np.float32)
    std = rng_values.random((1, 4, 6, 5), dtype=np.float32)
    encoded = {"latent": mean, "latent_std": std}

    rng = np.random.Generator(np.random.PCG64(9))
    assert get_profile(PAPER).lr_latent(encoded, rng) is mean
    assert np.array_equal(rng.standard_normal(3), np.random.Generator(np.random.PCG64(9)).standard_normal(3))

    rng = np.random.Generator(np.random.PCG64(9))
    z = get_profile(REFERENCE_CODE).lr_latent(encoded, rng)
    fresh = np.random.Generator(np.random.PCG64(9))
    noise = fresh.standard_normal(mean.shape, dtype=np.float32)
    assert z.dtype == np.float32
    np.testing.assert_array_equal(z, mean + std * noise)
    assert np.array_equal(rng.standard_normal(3), fresh.standard_normal(3))  # x_T comes next


def test_profile_names_and_encoder_inputs():
    with pytest.raises(ValueError, match=r"^unknown sampling profile 'ldm'; choose one of paper, reference-code$"):
        get_profile("ldm")
    assert get_profile(None).name == PAPER
    up = np.full((1, 3, 4, 4), 0.25, np.float32)
    assert get_profile(PAPER).encoder_input(up)[0, 0, 0, 0] == -0.5
    assert get_profile(REFERENCE_CODE).encoder_input(up)[0, 0, 0, 0] == 0.25
    assert get_profile(PAPER).encoder_outputs() == ["latent"]
    assert get_profile(REFERENCE_CODE).encoder_outputs() == ["latent", "latent_std"]
