"""Errors of the engines stage. Every message is one line that says what is wrong and the fix."""
from __future__ import annotations


class BuildError(Exception):
    """Plans cannot be built as asked: no TensorRT or GPU, an unusable engine directory, a
    graph TensorRT cannot parse, GPU memory exhausted, ..."""
