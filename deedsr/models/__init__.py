from .adapter import DegradationAwareAdapter
from .degradation_aware import DABlock, DAConv, per_sample_depthwise3x3
from .learner import DegradationLearner
from .model import DeeDSR
from .unet import Modulation, ModulatedUNet

__all__ = [
    "DABlock",
    "DAConv",
    "DeeDSR",
    "DegradationAwareAdapter",
    "DegradationLearner",
    "ModulatedUNet",
    "Modulation",
    "per_sample_depthwise3x3",
]
