"""Precision passes: float16 (fp32 islands where fp16 overflows), int8 and int4 weight quantization for CPU.

Imports onnx-ir and numpy only, never torch.
"""

from __future__ import annotations

from . import nbits
from .fp16 import to_fp16
from .quantize import LM_HEAD, NBitsSummary, quantize_int4, quantize_int8

PRECISIONS = ("float32", "float16", "int8", "int4")

__all__ = ["LM_HEAD", "NBitsSummary", "nbits", "PRECISIONS", "quantize_int4", "quantize_int8", "to_fp16"]

# Largest |logits difference| against torch float32 that the exporter's validation accepts, per precision.
# Measured (tests/graphs/test_precision_parity.py; GPT-2 124M random weights, prefill of 33 tokens, |logits| <= 2.7):
#                  tiny GPT-2 / GPT-J default init    GPT-2 124M random
#   float32        2.4e-7 / 2.4e-7                    2.8e-6     (1e-3 kept: trained checkpoints' logits reach ~100s)
#   float16        3.0e-4 / 3.5e-4                    2.4e-3
#   int8           6.5e-3 / 7.9e-3                    0.091
#   int4           0.060  / 0.086                     0.67       (4-bit blocks of 32 over 12 layers)
# (Measured with the earlier kernels: int8 DynamicQuantizeMatMul, int4 asymmetric RTN. The symmetric MatMulNBits
# int8/int4 with searched scales and an 8-bit lm_head pass the same limits: tests/graphs/test_precision_parity.py.)
# Each limit is about 2x the worst measurement. Absolute limits suit random-weight models; trained checkpoints have
# logits 30-100x larger, where a relative measure (|diff| / max|logit|) is the one to judge.
LOGITS_ATOL = {"float32": 1e-3, "float16": 5e-3, "int8": 0.2, "int4": 1.5}
# Fraction of greedy tokens equal to torch float32's before the first divergence (8 steps, 2 rows).
# Measured: float16 1.0 and int8 1.0 on every tiny model (default and realistic weights); int4 1.0 (GPT-2),
# 0.125 / 0.0 (GPT-J default / realistic). Random weights leave logit gaps of ~1e-2, under int4's error, so an int4
# greedy floor would measure ties, not quality: its check is the logits limit. One early divergence in one of two
# rows costs 50%, hence the margins below 1.0.
MIN_GREEDY_AGREEMENT = {"float32": 1.0, "float16": 0.9, "int8": 0.75, "int4": 0.0}

__all__ += ["LOGITS_ATOL", "MIN_GREEDY_AGREEMENT"]
