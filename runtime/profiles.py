"""Sampling profiles: how an LR image becomes the sampler's LR latent and how the decoded
image becomes pixels. Host maths only (numpy + Pillow); the runtime and the PyTorch reference
(deedsr/pipeline.py) both call these functions, so the two cannot drift.

`paper` (the default; weights trained by this project):
    reflect-pad the LR to a multiple of `pixel_multiple` (16), Pillow bicubic x4 (a = -0.5),
    VAE-encode the x4 image from [-1, 1], take the posterior mean, round to uint8.

`reference-code` (weights imported from the public implementation, github
bichunyang419/DeeDSR, which were trained and evaluated that way; see its
`cldm/cldm.py` `ControlLDM.log_images_test` and `test_step`):
    torch's bicubic x4 (a = -0.75, align_corners=False, border taps clamped) of the unpadded
    LR; when either side of the x4 image is not a multiple of 64, reflect-pad the bottom and
    right so that EACH side becomes (side // 64 + 1) * 64 (a side that already is a multiple
    gains 64 px); VAE-encode the x4 image from [0, 1] (no `2x - 1`); draw a sample of the VAE
    posterior, `mean + std * noise`, with the image's seeded generator (before x_T);
    truncate to uint8 (`astype`, not round).

Where the public code cannot pad (torch's reflect needs a pad shorter than the side: x4 sides
of 32 or 64 px in an image that needs padding, i.e. LR sides of 8 or 16) the reflection is
continued as numpy's `reflect` does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .contract import ROLES, VAE_ENCODER
from .imageops import bicubic_upscale, pad_to_multiple

PAPER = "paper"
REFERENCE_CODE = "reference-code"
PROFILES = (PAPER, REFERENCE_CODE)
LATENT_STD = ROLES[VAE_ENCODER].optional_outputs[0]  # the encoder output the reference-code profile needs

TORCH_CUBIC_A = -0.75  # torch's bicubic; Pillow's is -0.5


# ------------------------------------------------------------------ torch-style bicubic
def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
    """(n, 4) weights of the taps at offsets -1, 0, 1, 2 for fractional positions t in [0, 1)."""
    a = np.float32(a)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    t = t.astype(np.float32)
    one = np.float32(1)
    return np.stack([far(t + one), near(t), near(one - t), far(one - t + one)], axis=1)


def _resample_axis(image: np.ndarray, axis: int, scale: int, a: float) -> np.ndarray:
    """Upsample one axis by an integer factor the way torch's bicubic does (align_corners=False)."""
    size = image.shape[axis]
    dst = np.arange(size * scale, dtype=np.float64)
    src = (dst + 0.5) / scale - 0.5  # not clamped at 0 for cubic, as torch
    base = np.floor(src)
    weights = _cubic_weights(src - base, a)
    base = base.astype(np.int64)
    out = None
    for k in range(4):
        index = np.clip(base + (k - 1), 0, size - 1)  # border taps repeat the edge pixel
        shape = [1] * image.ndim
        shape[axis] = -1
        term = np.take(image, index, axis=axis) * weights[:, k].reshape(shape)
        out = term if out is None else out + term
    return out


def torch_bicubic_upscale(image: np.ndarray, scale: int) -> np.ndarray:
    """float32 HxWxC -> (scale*H)x(scale*W)xC as `torch.nn.functional.interpolate(x,
    scale_factor=scale, mode="bicubic", align_corners=False)`: width first, then height,
    in float32. Not clamped (bicubic overshoots), as torch."""
    image = np.asarray(image, dtype=np.float32)
    return _resample_axis(_resample_axis(image, 1, scale, TORCH_CUBIC_A), 0, scale, TORCH_CUBIC_A)


# ---------------------------------------------------------------- reference padding rule
def reference_padding(height: int, width: int, multiple: int = 64) -> tuple[int, int]:
    """(bottom, right) pad of the public code's rule: none when both sides are multiples of
    `multiple`; otherwise each side gets `(side // multiple + 1) * multiple - side`."""
    if height % multiple == 0 and width % multiple == 0:
        return 0, 0
    return (height // multiple + 1) * multiple - height, (width // multiple + 1) * multiple - width


def pad_reference(image: np.ndarray, multiple: int = 64) -> np.ndarray:
    """Reflect-pad the bottom and right of HxWxC by `reference_padding` (torch's and numpy's
    `reflect`: the edge pixel is not repeated)."""
    ph, pw = reference_padding(image.shape[0], image.shape[1], multiple)
    if ph == 0 and pw == 0:
        return image
    return np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect")


# ------------------------------------------------------------------------------ profiles
@dataclass(frozen=True)
class Profile:
    name: str

    @property
    def samples_posterior(self) -> bool:
        return self.name == REFERENCE_CODE

    def padded_lr_size(self, height: int, width: int, multiple: int) -> tuple[int, int]:
        """The LR size whose x4 image the VAE sees (in LR pixels; `multiple` is the LR pixel
        multiple, 16 for both presets: the x4 image is a multiple of 4 * multiple = 64)."""
        if self.name == PAPER:
            return -(-height // multiple) * multiple, -(-width // multiple) * multiple
        ph, pw = reference_padding(height, width, multiple)
        return height + ph, width + pw

    def largest_padded_side(self, side: int, multiple: int) -> int:
        """The largest padded side an LR side of `side` can get (whatever the other side is)."""
        return self.padded_lr_size(side, side + 1, multiple)[0]

    def upscale(self, lr: np.ndarray, scale: int, multiple: int) -> np.ndarray:
        """float32 HxWx3 LR in [0, 1] -> the padded x4 image (float32, HWC) the VAE encodes.
        `multiple`: the LR pixel multiple (the x4 image is padded to `scale * multiple`)."""
        if self.name == PAPER:
            return bicubic_upscale(pad_to_multiple(lr, multiple), scale)
        return pad_reference(torch_bicubic_upscale(lr, scale), scale * multiple)

    def encoder_input(self, up):
        """The VAE encoder's input for the x4 image `up` in [0, 1] (numpy or torch)."""
        return up * 2 - 1 if self.name == PAPER else up

    def encoder_outputs(self) -> list[str]:
        return ["latent", LATENT_STD] if self.samples_posterior else ["latent"]

    def lr_latent(self, encoded: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """z_lr from the VAE encoder's outputs: the scaled posterior mean (`paper`) or a sample
        `mean + std * noise` (`reference-code`), the noise drawn first from the image's
        generator as `standard_normal(mean.shape, float32)`."""
        mean = encoded["latent"]
        if not self.samples_posterior:
            return mean
        noise = rng.standard_normal(mean.shape, dtype=np.float32)
        return (mean + encoded[LATENT_STD] * noise).astype(np.float32)

    def to_uint8(self, image: np.ndarray) -> np.ndarray:
        """float32 in [0, 1] (already clipped) -> uint8: rounded (`paper`) or truncated
        (`reference-code`, as the public `test_step`'s `astype(np.uint8)`)."""
        scaled = np.clip(image, 0, 1) * np.float32(255.0)
        return (np.round(scaled) if self.name == PAPER else scaled).astype(np.uint8)


def get_profile(name: str | None) -> Profile:
    """The profile called `name` (None: `paper`); ValueError with one line for an unknown one."""
    name = PAPER if name is None else str(name)
    if name not in PROFILES:
        raise ValueError(f"unknown sampling profile '{name}'; choose one of {', '.join(PROFILES)}")
    return Profile(name)
