"""Precision passes: float16 (fp32 islands where fp16 overflows), int8 and int4 weight quantization for CPU.

Imports onnx-ir and numpy only, never torch.
"""

from __future__ import annotations

from .fp16 import to_fp16
from .quantize import quantize_int4, quantize_int8

PRECISIONS = ("float32", "float16", "int8", "int4")

__all__ = ["PRECISIONS", "quantize_int4", "quantize_int8", "to_fp16"]
