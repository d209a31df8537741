"""`Upscaler`: an engine directory -> x4 images, with numpy on the host and a backend for graphs.

    up = Upscaler.from_engine_dir("engines/tiny")            # backend="auto", precision="auto"
    sr = up.upscale(lr_uint8_hwc, seed=0, steps=20)         # uint8 (4H, 4W, 3)

Per image the learner (-> conditions) and the VAE encoder (-> z_lr) run once; per step only
the adapter and UNet (or the fused denoiser) run, on tiles of the latent, several tiles per
call; noise-guided steps run no graph at all; the VAE decoder runs once at the end.

Thread safety: an Upscaler may be shared between threads. What is shared is read-only (the
manifest) or thread-safe (the backend's sessions: onnxruntime's `InferenceSession.run` may be
called concurrently; sessions are created once under a lock). Everything of one call (latents,
generator, tiles) is local to that call, so two threads with the same seed get the same image
as two sequential calls.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .backends import Backend, open_backend
from .contract import (
    LEARNER,
    VAE_DECODER,
    VAE_DECODER_TILED,
    VAE_ENCODER,
    VAE_ENCODER_TILED,
)
from .errors import InsufficientMemory, ShapeError, StepInfo
from .imageops import (
    COLOR_FIXES,
    check_image,
    color_fix,
)
from .integrity import verify_backend
from .manifest import Manifest
from .memory import available_memory, human_bytes
from .memory_model import MemoryModel, Plan, batch_bytes, choose_plan, fits_message
from .profiles import LATENT_STD, Profile, get_profile
from .sampler import INITS, Job, SamplerOptions, Schedule, guided_for_steps, sample
from .vae_tiling import VaeTiling, run_vae_graph
from .validate import check_decoded, check_latent, check_noise_guidance, default_overlap

log = logging.getLogger(__name__)

class Upscaler:
    def __init__(self, manifest: Manifest, backend: Backend, memory_limit: int | None = None):
        self.manifest = manifest
        self.backend = backend
        self.memory_limit = memory_limit
        self.vae_tiling = VaeTiling.from_manifest(manifest)  # None: an older directory, untiled VAE
        self.memory_model = MemoryModel(manifest, backend.precision, backend.use_denoiser)
        self.schedule = Schedule(manifest.alphas_cumprod, manifest.steps_offset)

    @classmethod
    def from_engine_dir(cls, path: str | Path, backend: str = "auto", precision: str = "auto",
                        threads: int | None = None, use_denoiser: bool | None = None,
                        memory_limit: int | None = None) -> "Upscaler":
        """Open an engine directory (raises EngineError with one line if it cannot be used).

        backend: auto | ort | trt. precision: auto (fp16 on a GPU, fp32 on the CPU) | fp32 | fp16.
        threads: intra-op threads of onnxruntime (default: one per physical core).
        use_denoiser: the fused adapter+UNet graph (default: when the directory has it).
        memory_limit: bytes an image may need (default: $DEEDSR_MEMORY_LIMIT or available RAM).
        Every graph the backend will run is hashed against manifest.json (cached: runtime/integrity.py).
        """
        manifest = Manifest.load(path)
        opened = open_backend(manifest, backend, precision, threads, use_denoiser)
        try:
            verify_backend(manifest, opened)
        except BaseException:
            opened.close()
            raise
        return cls(manifest, opened, memory_limit)

    # ---------------------------------------------------------------- properties
    @property
    def default_steps(self) -> int:
        return int(self.manifest.sampler["steps"])

    @property
    def scale(self) -> int:
        return self.manifest.image["upscale"]

    @property
    def trained(self) -> bool:
        return self.manifest.trained

    @property
    def max_batch(self) -> int:
        return self.manifest.max_batch

    def describe(self) -> str:
        return f"{self.manifest.root} ({self.manifest.model.get('preset', '?')}), {self.backend.describe()}"

    # ------------------------------------------------------------------ options
    def options(self, steps=None, eta=None, noise_guidance_steps=None, init=None, tile=None, tile_overlap=None,
                color_fix=None, profile=None) -> SamplerOptions:
        d = self.manifest.sampler
        if tile is not None and tile_overlap is None:  # a tile alone: an overlap that fits it
            tile_overlap = default_overlap(tile, d["tile_overlap"])
        steps = int(d["steps"] if steps is None else steps)
        if noise_guidance_steps is None:  # the manifest's, at the same share of this step count
            noise_guidance_steps = guided_for_steps([int(i) for i in d["noise_guidance_steps"]], int(d["steps"]), steps)
        opts = SamplerOptions(
            steps=steps,
            eta=float(d["eta"] if eta is None else eta),
            noise_guidance_steps=tuple(int(i) for i in noise_guidance_steps),
            init=str(d["init"] if init is None else init),
            tile=int(d["tile"] if tile is None else tile),
            tile_overlap=int(d["tile_overlap"] if tile_overlap is None else tile_overlap),
            tile_weight_variance=float(d.get("tile_weight_variance", 0.01)),
            color_fix=str(d["color_fix"] if color_fix is None else color_fix),
            profile=str(d["profile"] if profile is None else profile),
        )
        self._check_profile(opts.profile)
        if opts.init not in INITS:
            raise ValueError(f"unknown init '{opts.init}'; choose one of {', '.join(INITS)}")
        if not 0.0 <= opts.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {opts.eta}")
        if opts.color_fix not in COLOR_FIXES:
            raise ValueError(f"unknown colour fix '{opts.color_fix}'; choose one of {', '.join(COLOR_FIXES)}")
        self.schedule.timesteps(opts.steps)  # raises for a step count the schedule cannot space
        check_noise_guidance(opts.steps, opts.noise_guidance_steps)
        self.manifest.check_tile(opts.tile)
        if not 0 <= opts.tile_overlap < opts.tile:
            raise ValueError(f"tile overlap ({opts.tile_overlap}) must be in 0..{opts.tile - 1} for tile {opts.tile}")
        return opts

    def _check_profile(self, name: str) -> None:
        if get_profile(name).samples_posterior and LATENT_STD not in self.manifest.graphs[VAE_ENCODER].output_names:
            raise ValueError(f"the {name} profile needs the VAE encoder's {LATENT_STD} output, which "
                             f"{self.manifest.root} lacks (exported before the profiles); re-export it")

    # ------------------------------------------------------------ shape + memory
    def estimate_memory(self, height: int, width: int, tile: int | None = None, vae_tile: int | None = None,
                        profile: str | None = None) -> int:
        """Peak resident bytes to upscale an LR image of height x width (memory_model.py), with
        the VAE tile `check` would choose unless given."""
        if self._measured_memory():
            return self.plan(height, width, tile, vae_tile, limit=None).bytes
        return self._rough_estimate(height, width, profile)

    def _measured_memory(self) -> bool:
        return self.memory_model.measured and not self.backend.on_device

    def plan(self, height: int, width: int, tile: int | None = None, vae_tile: int | None = None,
             limit: int | None = None, profile: str | None = None) -> Plan:
        """Tile settings for one image and the peak they need; InsufficientMemory when even the
        smallest VAE tiles need more than `limit` (default: the memory this process may use)."""
        tile = int(self.manifest.sampler["tile"] if tile is None else tile)
        if not self._measured_memory():
            core = None if self.vae_tiling is None else self.vae_tiling.core
            return Plan(core if vae_tile is None else vae_tile, tile, self.max_batch,
                        self._rough_estimate(height, width, profile), {})
        limit = self._limit() if limit is None else limit
        try:
            return choose_plan(self.memory_model, height, width, tile, self.max_batch, limit, vae_tile)
        except MemoryError as e:
            need = int(e.args[0])
            s = self.scale
            hint = fits_message(self.memory_model, height, width, tile, self.max_batch, limit)
            raise InsufficientMemory(
                f"image is {width}x{height}: upscaling to {width * s}x{height * s} needs about {human_bytes(need)} "
                f"even with the smallest VAE tiles, only {human_bytes(limit)} may be used; {hint} "
                "(or raise --memory-limit / DEEDSR_MEMORY_LIMIT)") from None

    def _limit(self) -> int | None:
        """Bytes the whole process may peak at: --memory-limit / $DEEDSR_MEMORY_LIMIT, else what
        it holds now plus the machine's available memory (which does not count this process)."""
        if self.memory_limit is not None:
            return self.memory_limit
        if os.environ.get("DEEDSR_MEMORY_LIMIT"):
            return available_memory()
        free = available_memory()
        return None if free is None else free + _rss()

    def _rough_estimate(self, height: int, width: int, profile: str | None = None) -> int:
        """Rough peak bytes to upscale an LR image of height x width, beyond what is resident:
        the VAE decoder's largest activations at 4x size (the last upsampling's input and output
        maps plus the last block's), host copies of the x4 image, and graphs still to load."""
        ph, pw = self.manifest.padded(height, width, profile)
        pixels = ph * self.scale * pw * self.scale
        channels = self.manifest.config.get("vae", {}).get("block_out_channels", [128, 256, 512, 512])
        c0, c1 = int(channels[0]), int(channels[1] if len(channels) > 1 else channels[0])
        element = 2 if self.backend.precision == "fp16" else 4
        decoder = 0 if self.backend.on_device else pixels * element * (2 * c1 + 2 * c0)
        host = pixels * 3 * 4 * 8  # bicubic, encoder input, decoded, colour-fix temporaries, output
        to_load = 0
        if not self.backend.on_device:
            graphs = self.backend.graphs()
            total = sum(self.manifest.graph_file(g, self.backend.precision).bytes or 0 for g in graphs)
            to_load = max(total - self.backend.loaded_bytes(), 0)
        return decoder + host + to_load

    def check(self, height: int, width: int, tile: int | None = None, profile: str | None = None) -> int:
        """Refuse, before anything is allocated, an LR size the engines cannot take or the machine
        cannot hold (ShapeError, InsufficientMemory); returns the memory estimate in bytes."""
        if min(height, width) < 8:
            raise ShapeError(f"image is {width}x{height}; each side must be at least 8 pixels")
        try:
            env = self._image_dims(height, width, profile)
            tile = int(self.manifest.sampler["tile"] if tile is None else tile)
            self.manifest.check_tile(tile)
            env.update(self.manifest.tile_dims(min(tile, env["latent_height"]), min(tile, env["latent_width"])))
            self.backend.check_shapes(env)
        except ShapeError as e:
            raise ShapeError(f"image is {width}x{height}: {e}") from None
        if self._measured_memory():
            return self.plan(height, width, tile, profile=profile).bytes
        need = self._rough_estimate(height, width, profile)
        limit = self.memory_limit if self.memory_limit is not None else available_memory()
        if limit is not None and need > limit:
            s = self.scale
            raise InsufficientMemory(
                f"image is {width}x{height}: upscaling to {width * s}x{height * s} needs about "
                f"{human_bytes(need)}, only {human_bytes(limit)} is available; use a smaller image")
        return need

    def _image_dims(self, height: int, width: int, profile: str | None = None) -> dict[str, int]:
        """Named dimensions checked against the export's ranges; with the tiled VAE only the
        learner sees the whole image, so only the LR range applies. A profile that samples the
        VAE posterior encodes untiled (the tiled encoder has no latent_std output yet), so there the
        x4 image must fit the untiled encoder's range."""
        if self.vae_tiling is None:
            return self.manifest.image_dims(height, width, profile)
        if profile is not None and get_profile(profile).samples_posterior:
            ph, pw = self.manifest.padded(height, width, profile)
            for name, value in (("image_height", ph * self.scale), ("image_width", pw * self.scale)):
                try:
                    self.manifest.check_dim(name, value)
                except ShapeError as e:
                    raise ShapeError(f"the {profile} profile encodes the x4 image untiled (the tiled VAE encoder "
                                     f"has no {LATENT_STD} output yet): {e}; use --profile paper for larger "
                                     "images") from None
        for name, value in (("lr_height", height), ("lr_width", width)):
            self.manifest.check_dim(name, value)
        lh, lw = self.manifest.latent_size(height, width, profile)
        return {"batch": 1, "lr_height": height, "lr_width": width, "latent_height": lh, "latent_width": lw}

    # ----------------------------------------------------------------- upscaling
    def upscale(self, image: np.ndarray, seed: int = 0, steps: int | None = None, eta: float | None = None,
                noise_guidance_steps: Iterable[int] | None = None, init: str | None = None,
                tile: int | None = None, tile_overlap: int | None = None, color_fix: str | None = None,
                profile: str | None = None,
                callback: Callable[[StepInfo], bool | None] | None = None) -> np.ndarray:
        """uint8 HxWx3 -> uint8 (4H)x(4W)x3. `callback(StepInfo)` after every step; returning
        False raises Cancelled."""
        return self.upscale_batch([image], seeds=[seed], steps=steps, eta=eta,
                                  noise_guidance_steps=noise_guidance_steps, init=init, tile=tile,
                                  tile_overlap=tile_overlap, color_fix=color_fix, profile=profile,
                                  callback=callback)[0]

    def upscale_batch(self, images: Sequence[np.ndarray], seeds: Sequence[int] | int = 0,
                      callback: Callable[[StepInfo], bool | None] | None = None, **overrides) -> list[np.ndarray]:
        """Several images sampled together (tiles of all images share graph calls); one generator
        per image, so each result equals `upscale(image, seed)` up to batching arithmetic."""
        if isinstance(seeds, int):
            seeds = [seeds + i for i in range(len(images))]
        if len(seeds) != len(images):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        opts = self.options(**overrides)
        vae = []
        for image in images:
            check_image(image)
            self.check(image.shape[0], image.shape[1], opts.tile, opts.profile)
            vae.append(self._vae_tiling(image.shape[0], image.shape[1], opts.tile))
        if len(images) > 1:
            self._check_batch([image.shape[:2] for image in images], opts.tile)
        started = time.perf_counter()
        profile = get_profile(opts.profile)
        prepared = [self._prepare(image, seed, profile, v) for image, seed, v in zip(images, seeds, vae)]
        log.info("per-image graphs: %.3f s", time.perf_counter() - started)
        started = time.perf_counter()
        latents = sample(self.backend.denoise, [job for job, _ in prepared], self.schedule, opts,
                         self.max_batch, callback)
        log.info("%d steps: %.3f s", opts.steps, time.perf_counter() - started)
        started = time.perf_counter()
        out = [self._finish(latent, up, image.shape[:2], opts, v)
               for latent, (_, up), image, v in zip(latents, prepared, images, vae)]
        log.info("decode: %.3f s", time.perf_counter() - started)
        return out

    def _check_batch(self, sizes: list[tuple[int, int]], tile: int) -> None:
        """Images sampled together hold their host arrays at once (the graphs run one at a time)."""
        if not self._measured_memory():
            return
        plans = [self.plan(h, w, tile) for h, w in sizes]
        need = batch_bytes(plans)
        limit = self._limit()
        if limit is not None and need > limit:
            raise InsufficientMemory(f"{len(sizes)} images together need about {human_bytes(need)}, only "
                                     f"{human_bytes(limit)} may be used; upscale them one at a time")

    def _vae_tiling(self, height: int, width: int, tile: int) -> VaeTiling | None:
        if self.vae_tiling is None:
            return None
        return self.vae_tiling.with_core(self.plan(height, width, tile).vae_core)

    def _prepare(self, image: np.ndarray, seed: int, profile: Profile,
                 vae: VaeTiling | None = None) -> tuple[Job, np.ndarray]:
        m = self.manifest
        lr = image.astype(np.float32) / 255.0
        conditions = self.backend.run(LEARNER, {"lr": _nchw(lr)}, m.conditions)
        up = _nchw(profile.upscale(lr, self.scale, m.image["pixel_multiple"]))
        rng = np.random.Generator(np.random.PCG64(seed))
        z_lr = self._encode_lr(up, profile, rng, vae)
        return Job(z_lr=z_lr, conditions=conditions, rng=rng), up

    def _encode_lr(self, up: np.ndarray, profile: Profile, rng: np.random.Generator,
                   vae: VaeTiling | None = None) -> np.ndarray:
        """z_lr as the profile makes it; under reference-code this is the generator's first draw
        (and the encoder runs untiled: only the untiled graph outputs the posterior's std)."""
        if profile.samples_posterior or (vae or self.vae_tiling) is None:
            encoded = self.backend.run(VAE_ENCODER, {"image": profile.encoder_input(up)}, profile.encoder_outputs())
        else:
            encoded = {"latent": self._vae(VAE_ENCODER_TILED, VAE_ENCODER, "image", "latent",
                                           profile.encoder_input(up), vae)}
        return profile.lr_latent(encoded, rng)

    def _finish(self, latent: np.ndarray, up: np.ndarray, size: tuple[int, int], opts: SamplerOptions,
                vae: VaeTiling | None = None) -> np.ndarray:
        check_latent(latent)
        decoded = self._vae(VAE_DECODER_TILED, VAE_DECODER, "latent", "image", latent, vae)
        check_decoded(decoded, latent.shape, self.manifest.image["latent_downscale"])
        sr = (np.clip(decoded, -1, 1) + 1) / 2
        sr = np.clip(color_fix(sr, up, opts.color_fix), 0, 1)
        h, w = size
        sr = sr[0].transpose(1, 2, 0)[: h * self.scale, : w * self.scale]
        return get_profile(opts.profile).to_uint8(sr)

    def preload(self) -> None:
        """Load every graph now (a graph that does not match manifest.json is refused here)."""
        self.backend.preload()

    def _vae(self, tiled: str, untiled: str, in_name: str, out_name: str, x: np.ndarray,
             vae: VaeTiling | None) -> np.ndarray:
        vae = vae or self.vae_tiling
        if vae is None:
            return self.backend.run(untiled, {in_name: x})[out_name]
        return run_vae_graph(self.backend, self.manifest, vae, tiled, x)

    def close(self) -> None:
        self.backend.close()


def _nchw(hwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))[None]


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
