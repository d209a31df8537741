"""The engine directory's contract, defined once: schema, precisions and the graph table.

It lives in the lowest, torch-free layer: `deedsr.export` writes directories that follow it,
`deedsr.engines` and the runtime read them. docs/engine-directory.md describes the files;
its "Adding a graph" checklist starts here.
"""
from __future__ import annotations

from dataclasses import dataclass

SCHEMA = "deedsr-engine"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16")

PER_IMAGE = "per_image"  # runs once per image
PER_STEP = "per_step"  # runs at every model step, on latent tiles

LEARNER = "degradation_learner"
VAE_ENCODER = "vae_encoder"
ADAPTER = "adapter"
UNET = "unet"
VAE_DECODER = "vae_decoder"
DENOISER = "denoiser"
VAE_ENCODER_TILED = "vae_encoder_tiled"
VAE_DECODER_TILED = "vae_decoder_tiled"


@dataclass(frozen=True)
class GraphRole:
    """What one graph of an engine directory is for.

    `inputs`/`outputs` are the tensor names every export has; the per-model names (the
    learner's conditions, the adapter's local maps) are listed in the manifest. `dims` names
    the dimension family of the graph's spatial axes (lr, image, latent, tile)."""

    name: str
    stage: str
    required: bool
    dims: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    summary: str
    optional_outputs: tuple[str, ...] = ()  # outputs that older exports lack


GRAPHS: tuple[GraphRole, ...] = (
    GraphRole(LEARNER, PER_IMAGE, True, "lr", ("lr",), ("degradation",),
              "LR in [0, 1] -> degradation vector and every adapter input that depends only on it"),
    GraphRole(VAE_ENCODER, PER_IMAGE, True, "image", ("image",), ("latent",),
              "bicubic x4 image -> scaled posterior mean (and its standard deviation, `latent_std`, "
              "which directories exported before the sampling profiles lack)", ("latent_std",)),
    GraphRole(ADAPTER, PER_STEP, True, "tile", ("z_lr", "timestep"), ("tokens",),
              "LR latent tile, t, conditions -> local maps and tokens"),
    GraphRole(UNET, PER_STEP, True, "tile", ("x_t", "timestep", "tokens"), ("eps",),
              "x_t tile, t, tokens, local maps -> epsilon"),
    GraphRole(VAE_DECODER, PER_IMAGE, True, "latent", ("latent",), ("image",),
              "scaled latent -> image in [-1, 1]"),
    GraphRole(DENOISER, PER_STEP, False, "tile", ("x_t", "timestep", "z_lr"), ("eps",),
              "adapter and UNet fused into one graph per step"),
    # Tiled VAE with global GroupNorm statistics (runtime/vae_tiling.py has the layout and
    # the host procedure). Optional only so that older engine directories still open; the
    # runtime uses them whenever present, and then never the untiled VAE graphs.
    GraphRole(VAE_ENCODER_TILED, PER_IMAGE, False, "vae_tile", ("image", "mask", "stats", "own"),
              ("latent", "moments"), "x4 image tile in [-1, 1], core mask, GroupNorm statistics -> latent tile, "
              "moments"),
    GraphRole(VAE_DECODER_TILED, PER_IMAGE, False, "vae_tile", ("latent", "mask", "stats", "own"),
              ("image", "moments"), "latent tile, core mask, GroupNorm statistics -> image tile, moments"),
)

ROLES = {g.name: g for g in GRAPHS}
GRAPH_ORDER = tuple(g.name for g in GRAPHS)  # export and build order
REQUIRED_GRAPHS = tuple(g.name for g in GRAPHS if g.required)
OPTIONAL_GRAPHS = tuple(g.name for g in GRAPHS if not g.required)


def step_graphs(fused: bool) -> tuple[str, ...]:
    """The graphs that run at a model step, in call order."""
    return (DENOISER,) if fused else (ADAPTER, UNET)


def call_order(fused: bool, tiled: bool = False) -> tuple[str, ...]:
    """Every graph one image needs, in the order a host calls them. With the tiled VAE graphs the
    untiled encoder stays (a profile that samples the posterior encodes untiled); the untiled
    decoder is not called."""
    if tiled:
        return (LEARNER, VAE_ENCODER, VAE_ENCODER_TILED, *step_graphs(fused), VAE_DECODER_TILED)
    return (LEARNER, VAE_ENCODER, *step_graphs(fused), VAE_DECODER)
