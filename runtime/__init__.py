"""The deedsr runtime: numpy + onnxruntime or TensorRT. Never imports torch, diffusers,
deedsr or export."""

__version__ = "0.1.0"
