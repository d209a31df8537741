"""DeeDSR reference model in PyTorch. Import submodules explicitly (deedsr.models,
deedsr.pipeline, ...): this package's import is kept free of torch."""

__version__ = "0.1.0"
