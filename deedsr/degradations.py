"""Real-ESRGAN second-order degradation pipeline in numpy / OpenCV.

Written from the Real-ESRGAN paper (Wang et al., 2021) and the numbers of the
DeeDSR reference configuration (the public implementation's training config). It is numpy-only so that it can run
inside data-loader workers. All randomness comes from the `np.random.Generator`
passed in: the same generator state gives the same LR image.

Images are HxWx3 RGB float32 arrays in [0, 1].
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import special

__all__ = [
    "KERNEL_TYPES",
    "LEVELS",
    "DegradationConfig",
    "degrade",
    "degrade_level",
    "gaussian_kernel",
    "generalized_gaussian_kernel",
    "make_pair",
    "plateau_kernel",
    "random_blur_kernel",
    "random_final_sinc_kernel",
    "random_mixed_kernel",
    "sinc_kernel",
]

KERNEL_TYPES = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)

# OpenCV equivalents of the 'area', 'bilinear' and 'bicubic' modes of the reference
# (half-pixel centres, no antialiasing, cubic a = -0.75 in both).
_RESIZE_MODES = (cv2.INTER_AREA, cv2.INTER_LINEAR, cv2.INTER_CUBIC)


# --------------------------------------------------------------------------- kernels


def _check_kernel_size(kernel_size: int) -> None:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")


def _grid(kernel_size: int) -> tuple[np.ndarray, np.ndarray]:
    _check_kernel_size(kernel_size)
    radius = kernel_size // 2
    ax = np.arange(-radius, radius + 1, dtype=np.float64)
    return np.meshgrid(ax, ax)  # x varies along columns, y along rows


def _mahalanobis_sq(
    kernel_size: int, sigma_x: float, sigma_y: float | None, rotation: float
) -> np.ndarray:
    """C^T Sigma^-1 C on the kernel grid, Sigma = R diag(sx^2, sy^2) R^T."""
    if sigma_y is None:
        sigma_y, rotation = sigma_x, 0.0
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"sigmas must be positive, got {sigma_x}, {sigma_y}")
    xx, yy = _grid(kernel_size)
    c, s = math.cos(rotation), math.sin(rotation)
    rot = np.array([[c, -s], [s, c]])
    cov = rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T
    inv = np.linalg.inv(cov)
    return inv[0, 0] * xx * xx + 2.0 * inv[0, 1] * xx * yy + inv[1, 1] * yy * yy


def _normalised(kernel: np.ndarray) -> np.ndarray:
    return (kernel / kernel.sum()).astype(np.float32)


def gaussian_kernel(
    kernel_size: int, sigma_x: float, sigma_y: float | None = None, rotation: float = 0.0
) -> np.ndarray:
    """Gaussian kernel; isotropic when `sigma_y` is None (rotation is then ignored)."""
    return _normalised(np.exp(-0.5 * _mahalanobis_sq(kernel_size, sigma_x, sigma_y, rotation)))


def generalized_gaussian_kernel(
    kernel_size: int,
    sigma_x: float,
    sigma_y: float | None = None,
    rotation: float = 0.0,
    beta: float = 1.0,
) -> np.ndarray:
    """exp(-0.5 (C^T Sigma^-1 C)^beta); beta = 1 is the Gaussian."""
    q = _mahalanobis_sq(kernel_size, sigma_x, sigma_y, rotation)
    return _normalised(np.exp(-0.5 * np.power(q, beta)))


def plateau_kernel(
    kernel_size: int,
    sigma_x: float,
    sigma_y: float | None = None,
    rotation: float = 0.0,
    beta: float = 1.0,
) -> np.ndarray:
    """1 / (1 + (C^T Sigma^-1 C)^beta), a flat-topped kernel."""
    q = _mahalanobis_sq(kernel_size, sigma_x, sigma_y, rotation)
    return _normalised(1.0 / (np.power(q, beta) + 1.0))


def sinc_kernel(kernel_size: int, omega_c: float, pad_to: int = 0) -> np.ndarray:
    """2D sinc (ideal circular low-pass) kernel with cut-off frequency `omega_c`.

    k(r) = omega_c J1(omega_c r) / (2 pi r), whose limit at r = 0 is omega_c^2 / (4 pi).
    With `pad_to` > kernel_size the kernel is zero-padded to that (odd) size.
    """
    xx, yy = _grid(kernel_size)
    r = np.hypot(xx, yy)
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = omega_c * special.j1(omega_c * r) / (2.0 * np.pi * r)
    kernel[r == 0] = omega_c**2 / (4.0 * np.pi)
    kernel = _normalised(kernel)
    if pad_to > kernel_size:
        _check_kernel_size(pad_to)
        pad = (pad_to - kernel_size) // 2
        kernel = np.pad(kernel, pad)
    return kernel


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _sample_beta(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """Shape parameter as the reference samples it.

    When 1 lies in the range, beta < 1 and beta > 1 are equally likely, whatever the
    width of either side (for betap = [1, 1.5] half the draws are exactly 1). A range
    that excludes 1 is sampled uniformly. Two draws are consumed either way so the
    random stream does not depend on the range.
    """
    lo, hi = bounds
    coin, u = rng.uniform(), rng.uniform()
    if lo <= 1.0 <= hi:
        return lo + u * (1.0 - lo) if coin < 0.5 else 1.0 + u * (hi - 1.0)
    return lo + u * (hi - lo)


def random_mixed_kernel(
    rng: np.random.Generator,
    kernel_size: int,
    *,
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
    sigma_range: tuple[float, float] = (0.2, 1.5),
    betag_range: tuple[float, float] = (0.5, 2.0),
    betap_range: tuple[float, float] = (1.0, 1.5),
    rotation_range: tuple[float, float] = (-math.pi, math.pi),
) -> np.ndarray:
    """One of the six kernel types of KERNEL_TYPES, drawn with `kernel_probs`.

    Isotropic kernels draw one sigma; anisotropic ones draw sigma_x and sigma_y
    independently from `sigma_range` and a rotation from `rotation_range`.
    """
    kind = KERNEL_TYPES[int(rng.choice(len(KERNEL_TYPES), p=np.asarray(kernel_probs)))]
    sigma_x = _uniform(rng, sigma_range)
    if kind.endswith("aniso"):
        sigma_y = _uniform(rng, sigma_range)
        rotation = _uniform(rng, rotation_range)
    else:
        sigma_y, rotation = None, 0.0
    if kind.startswith("generalized"):
        return generalized_gaussian_kernel(
            kernel_size, sigma_x, sigma_y, rotation, _sample_beta(rng, betag_range)
        )
    if kind.startswith("plateau"):
        return plateau_kernel(kernel_size, sigma_x, sigma_y, rotation, _sample_beta(rng, betap_range))
    return gaussian_kernel(kernel_size, sigma_x, sigma_y, rotation)


def _kernel_sizes(kernel_range: tuple[int, int]) -> np.ndarray:
    lo, hi = kernel_range
    _check_kernel_size(lo)
    _check_kernel_size(hi)
    return np.arange(lo, hi + 1, 2)


def random_blur_kernel(
    rng: np.random.Generator,
    *,
    kernel_range: tuple[int, int] = (7, 21),
    sinc_prob: float = 0.1,
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
    sigma_range: tuple[float, float] = (0.2, 1.5),
    betag_range: tuple[float, float] = (0.5, 2.0),
    betap_range: tuple[float, float] = (1.0, 1.5),
    rotation_range: tuple[float, float] = (-math.pi, math.pi),
) -> np.ndarray:
    """A blur kernel of random odd size in `kernel_range`: sinc with `sinc_prob`, else mixed."""
    kernel_size = int(rng.choice(_kernel_sizes(kernel_range)))
    if rng.uniform() < sinc_prob:
        # Small kernels cannot represent a low cut-off without strong ringing.
        low = math.pi / 3 if kernel_size < 13 else math.pi / 5
        return sinc_kernel(kernel_size, float(rng.uniform(low, math.pi)))
    return random_mixed_kernel(
        rng,
        kernel_size,
        kernel_probs=kernel_probs,
        sigma_range=sigma_range,
        betag_range=betag_range,
        betap_range=betap_range,
        rotation_range=rotation_range,
    )


def random_final_sinc_kernel(
    rng: np.random.Generator,
    *,
    prob: float = 0.8,
    kernel_range: tuple[int, int] = (7, 21),
) -> np.ndarray | None:
    """The final sinc filter with probability `prob`, else None (no filtering)."""
    if rng.uniform() >= prob:
        return None
    kernel_size = int(rng.choice(_kernel_sizes(kernel_range)))
    return sinc_kernel(kernel_size, float(rng.uniform(math.pi / 3, math.pi)))


# ---------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DegradationConfig:
    """Every number of the reference degradation configuration (the public implementation's training config).

    Fields ending in 2 belong to the second degradation stage. Noise sigmas are on
    the 0..255 scale, JPEG qualities on OpenCV's 0..100 scale.
    """

    scale: int = 4
    gt_size: int = 512  # HR training crop; degrade() itself takes any size divisible by scale

    # Blur kernel sizes are drawn from the odd sizes in kernel_range in both stages.
    # blur_kernel_size / blur_kernel_size2 are the reference config's values; its data
    # loader pads every kernel to 21 and ignores them, and so does degrade() (zero
    # padding a kernel does not change the filtered image).
    kernel_range: tuple[int, int] = (7, 21)
    blur_kernel_size: int = 21
    blur_kernel_size2: int = 11
    rotation_range: tuple[float, float] = (-math.pi, math.pi)

    # first degradation
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 1.5)
    betag_range: tuple[float, float] = (0.5, 2.0)
    betap_range: tuple[float, float] = (1.0, 1.5)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.3, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 15.0)
    poisson_scale_range: tuple[float, float] = (0.05, 2.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (60.0, 95.0)

    # second degradation
    second_blur_prob: float = 0.5
    kernel_probs2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.0)
    betag_range2: tuple[float, float] = (0.5, 2.0)
    betap_range2: tuple[float, float] = (1.0, 1.5)
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.6, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 12.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 1.0)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (60.0, 100.0)

    final_sinc_prob: float = 0.8
    # The reference replaces the LR by a plain bicubic x1/scale downsample 1 % of the time.
    no_degradation_prob: float = 0.01
    # Real-ESRGAN quantises the LR to 8-bit levels; the DeeDSR loader only clamps.
    round_output: bool = True

    def __post_init__(self) -> None:
        for name in ("kernel_probs", "kernel_probs2", "resize_prob", "resize_prob2"):
            probs = getattr(self, name)
            if any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
                raise ValueError(f"{name} must be non-negative and sum to 1, got {probs}")
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")


def _blur_args(config: DegradationConfig, stage: int) -> dict:
    suffix = "" if stage == 1 else "2"
    return dict(
        kernel_range=config.kernel_range,
        sinc_prob=getattr(config, "sinc_prob" + suffix),
        kernel_probs=getattr(config, "kernel_probs" + suffix),
        sigma_range=getattr(config, "blur_sigma" + suffix),
        betag_range=getattr(config, "betag_range" + suffix),
        betap_range=getattr(config, "betap_range" + suffix),
        rotation_range=config.rotation_range,
    )


# ---------------------------------------------------------------------- image operations


def _filter(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    # Correlation with reflect-101 borders, as the reference filter2D; every kernel
    # here is point-symmetric, so correlation and convolution agree.
    return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def _resize(img: np.ndarray, height: int, width: int, mode: int) -> np.ndarray:
    height, width = max(1, height), max(1, width)
    if img.shape[:2] == (height, width):
        return img
    return cv2.resize(img, (width, height), interpolation=mode)


def _random_mode(rng: np.random.Generator) -> int:
    return _RESIZE_MODES[int(rng.integers(len(_RESIZE_MODES)))]


def _random_scale(
    rng: np.random.Generator, probs: tuple[float, float, float], bounds: tuple[float, float]
) -> float:
    kind = int(rng.choice(3, p=np.asarray(probs)))
    if kind == 0:
        return float(rng.uniform(1.0, bounds[1]))
    if kind == 1:
        return float(rng.uniform(bounds[0], 1.0))
    return 1.0


def _gaussian_noise(
    rng: np.random.Generator, img: np.ndarray, sigma_range: tuple[float, float], gray_prob: float
) -> np.ndarray:
    sigma = _uniform(rng, sigma_range) / 255.0
    gray = rng.uniform() < gray_prob
    shape = img.shape[:2] + ((1,) if gray else (img.shape[2],))
    return img + (rng.standard_normal(shape) * sigma).astype(np.float32)


def _poisson_noise(
    rng: np.random.Generator, img: np.ndarray, scale_range: tuple[float, float], gray_prob: float
) -> np.ndarray:
    scale = _uniform(rng, scale_range)
    gray = rng.uniform() < gray_prob
    src = np.clip(img, 0.0, 1.0)
    if gray:
        src = (src @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    levels8 = np.round(src * 255.0).astype(np.uint8)
    src = levels8.astype(np.float32) / 255.0
    # Photon count: the number of distinct 8-bit levels, rounded up to a power of two.
    distinct = int(np.count_nonzero(np.bincount(levels8.ravel(), minlength=256)))
    vals = 2.0 ** math.ceil(math.log2(max(distinct, 1)))
    noise = rng.poisson(src * vals).astype(np.float32) / vals - src
    return img + noise * scale


def _random_noise(
    rng: np.random.Generator, img: np.ndarray, config: DegradationConfig, stage: int
) -> np.ndarray:
    suffix = "" if stage == 1 else "2"
    gray_prob = getattr(config, "gray_noise_prob" + suffix)
    if rng.uniform() < getattr(config, "gaussian_noise_prob" + suffix):
        out = _gaussian_noise(rng, img, getattr(config, "noise_range" + suffix), gray_prob)
    else:
        out = _poisson_noise(rng, img, getattr(config, "poisson_scale_range" + suffix), gray_prob)
    return np.clip(out, 0.0, 1.0)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    # OpenCV's codec expects BGR; the channel order decides which weights go to Y.
    bgr = np.ascontiguousarray(_to_uint8(img)[..., ::-1])
    ok, buf = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return np.ascontiguousarray(decoded[..., ::-1]).astype(np.float32) / 255.0


def _random_jpeg(rng: np.random.Generator, img: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    return _jpeg(img, int(round(_uniform(rng, bounds))))


def _finish(img: np.ndarray, config: DegradationConfig) -> np.ndarray:
    if config.round_output:
        return _to_uint8(img).astype(np.float32) / np.float32(255.0)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _as_float_image(img: np.ndarray, scale: int) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {img.shape}")
    h, w = img.shape[:2]
    if h % scale or w % scale:
        raise ValueError(
            f"HR sides must be divisible by the scale {scale}, got {h}x{w}; "
            f"crop to {h - h % scale}x{w - w % scale} first"
        )
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if not np.issubdtype(img.dtype, np.floating):
        raise TypeError(f"expected a uint8 or floating-point image, got {img.dtype}")
    img = np.ascontiguousarray(img, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    if lo < -1e-6 or hi > 1.0 + 1e-6:
        raise ValueError(f"float images must lie in [0, 1], got values in [{lo}, {hi}]")
    return np.clip(img, 0.0, 1.0)


# --------------------------------------------------------------------------- pipeline


def degrade(
    hr: np.ndarray,
    rng: np.random.Generator,
    config: DegradationConfig = DegradationConfig(),
) -> np.ndarray:
    """Second-order degradation of an HR image into its x`config.scale` LR image.

    `hr` is HxWx3 RGB, float in [0, 1] (or uint8), with H and W divisible by the
    scale. Returns float32 (H/scale)x(W/scale)x3 in [0, 1].
    """
    img = _as_float_image(hr, config.scale)
    h, w = img.shape[:2]
    lr_h, lr_w = h // config.scale, w // config.scale

    if rng.uniform() < config.no_degradation_prob:
        return _finish(_resize(img, lr_h, lr_w, cv2.INTER_CUBIC), config)

    # first degradation: blur, random resize, noise, JPEG
    out = _filter(img, random_blur_kernel(rng, **_blur_args(config, 1)))
    factor = _random_scale(rng, config.resize_prob, config.resize_range)
    out = _resize(out, int(out.shape[0] * factor), int(out.shape[1] * factor), _random_mode(rng))
    out = _random_noise(rng, out, config, 1)
    out = _random_jpeg(rng, out, config.jpeg_range)

    # second degradation: blur (sometimes), resize relative to the LR size, noise
    if rng.uniform() < config.second_blur_prob:
        out = _filter(out, random_blur_kernel(rng, **_blur_args(config, 2)))
    factor = _random_scale(rng, config.resize_prob2, config.resize_range2)
    out = _resize(out, int(lr_h * factor), int(lr_w * factor), _random_mode(rng))
    out = _random_noise(rng, out, config, 2)

    # Resize to the LR size and final sinc, then JPEG, or the other way round.
    # (Other orders, e.g. sinc + JPEG + resize, give twisted lines per Real-ESRGAN.)
    sinc = random_final_sinc_kernel(rng, prob=config.final_sinc_prob, kernel_range=config.kernel_range)
    jpeg_first = rng.uniform() >= 0.5
    if jpeg_first:
        out = _random_jpeg(rng, out, config.jpeg_range2)
    out = _resize(out, lr_h, lr_w, _random_mode(rng))
    if sinc is not None:
        out = _filter(out, sinc)
    if not jpeg_first:
        out = _random_jpeg(rng, out, config.jpeg_range2)
    return _finish(out, config)


def make_pair(
    hr: np.ndarray,
    rng: np.random.Generator,
    config: DegradationConfig = DegradationConfig(),
) -> tuple[np.ndarray, np.ndarray]:
    """(hr, lr) float32 pair from a uint8 or float [0, 1] HR image with sides divisible by the scale."""
    hr = _as_float_image(hr, config.scale)
    return hr, degrade(hr, rng, config)


# ------------------------------------------------------------------ evaluation levels


def _level(
    sigma: tuple[float, float],
    betag: tuple[float, float],
    betap: tuple[float, float],
    noise1: tuple[float, float],
    jpeg1: tuple[float, float],
    noise2: tuple[float, float],
    jpeg2: tuple[float, float],
) -> DegradationConfig:
    return dataclasses.replace(
        DegradationConfig(),
        blur_sigma=sigma,
        betag_range=betag,
        betap_range=betap,
        noise_range=noise1,
        jpeg_range=jpeg1,
        noise_range2=noise2,
        jpeg_range2=jpeg2,
        resize_prob=(0.0, 0.0, 1.0),
        resize_prob2=(0.0, 0.0, 1.0),
        second_blur_prob=0.0,
        gaussian_noise_prob=1.0,
        gaussian_noise_prob2=1.0,
        no_degradation_prob=0.0,
    )


# Paper, supplementary Table 6 and Appendix B. The levels are not fixed parameter
# values but sub-ranges of the training ranges: the same second-order pipeline with
# "the resizing operation eliminated, the probability of blur in the second stage set
# to 0 and the probability of Gaussian noise fixed to 1", the parameters below drawn
# uniformly from each range. What we read and assumed:
#   - "eliminating resizing" removes the two random resizes (scale 1). The second
#     stage still brings the image to the LR size, as the reference does for 'keep',
#     and the final resize is then a no-op; the resize mode stays random.
#   - Gaussian noise probability 1 applies to both stages (noise ranges are given for
#     both); gray-noise probability (0.4), kernel-type mixture, sinc probability
#     (0.1), final-sinc probability (0.8) and the 50/50 order of the last step are
#     not parameterised by the table and keep the reference values.
#   - The first-stage sigma range applies to both sigmas of anisotropic kernels.
#   - The 1 % bicubic fallback of training is off.
# The outcome is deterministic given the generator; with the same seed every level
# makes the same discrete choices, so heavier levels are strictly more degraded.
LEVELS: dict[str, DegradationConfig] = {
    "light": _level((0.2, 0.6), (0.5, 1.0), (1.0, 1.2), (1.0, 5.0), (81, 95), (1.0, 4.0), (86, 100)),
    "medium": _level((0.6, 1.1), (1.0, 1.5), (1.2, 1.4), (5.0, 10.0), (70, 81), (4.0, 8.0), (73, 86)),
    "heavy": _level((1.1, 1.5), (1.5, 2.0), (1.4, 1.5), (10.0, 15.0), (60, 70), (8.0, 12.0), (60, 73)),
}


def degrade_level(hr: np.ndarray, level: str, rng: np.random.Generator) -> np.ndarray:
    """x4 LR image degraded at one of the evaluation levels of the paper's Table 6."""
    if level not in LEVELS:
        raise ValueError(f"unknown degradation level {level!r}; valid levels: {', '.join(LEVELS)}")
    return degrade(hr, rng, LEVELS[level])
