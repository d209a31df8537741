from .adapter import DegradationAwareAdapter
from .degradation_aware import DABlock, DAConv, per_sample_depthwise3x3
from .learner import DegradationLearner
from .model import DeeDSR, load_checkpoint
from .unet import ModulatedUNet, Modulation

__all__ = [
    "DABlock",
    "DAConv",
    "DeeDSR",
    "DegradationAwareAdapter",
    "DegradationLearner",
    "ModulatedUNet",
    "Modulation",
    "load_checkpoint",
    "per_sample_depthwise3x3",
]
