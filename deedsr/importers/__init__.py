"""Importers for weights made elsewhere.

* `init_from_sd_base(model, folder)`: start a DeeDSR model from a local Stable Diffusion
  2.1-base *diffusers* folder (`unet/` and `vae/`). Every UNet backbone tensor whose key and
  shape match is copied; the cross-attention key/value projections (1024 wide in SD 2.1,
  512 here) are skipped with reason "shape" and keep their fresh initialisation; the
  modulation layers are not touched (zero-initialised gamma/beta: identity). The VAE must
  load completely.
* `import_reference_checkpoint(path, config)`: read a checkpoint saved by the public
  reference implementation (github.com/bichunyang419/DeeDSR, ControlNet/ldm layout) and
  return a DeeDSR model. Every weight under `model.diffusion_model.`, `first_stage_model.`
  and `Encoder_degrad.` must find a place in our model and every tensor of our model must be
  filled, or CheckpointError says which keys are at fault.

Nothing here touches the network, and pickles are only read with `weights_only=True`.
"""
from .common import ImportReport
from .reference_code import import_reference_checkpoint
from .sd_base import init_from_sd_base

__all__ = ["ImportReport", "init_from_sd_base", "import_reference_checkpoint"]
