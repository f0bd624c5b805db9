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

# The judgement of an export (exporter/validate.py): its next-token distributions against torch float32 on text
# (the user's --validation-text, or the fp32 model's own seeded samples), and the logits' worst difference in
# units of their spread (std over the vocabulary). Measured (self-generated text, 380 tokens):
#                   trained gpt2-ci (2 layers, width 128)        tiny GPT-2 random     issue 11's 4x256 trained model
#                   mean KL    top-1    ppl change  diff/std     mean KL   diff/std    mean KL   top-1   ppl change
#   float32         1.5e-13    100 %    +1e-8       4.9e-6       1.1e-15   1.7e-6      -         -       -
#   float16         2.5e-8     100 %    -0.002 %    0.0027       4.5e-9    0.0033      0.0000    100 %   +0.00 %
#   int8            9.6e-6     100 %    +0.008 %    0.046        2.5e-6    0.070       0.0005    98.7 %  +0.13 %
#   int4            (see BENCHMARKS.md)                                                0.0023    97.4 %  +0.33 %
# Each limit leaves about 4x the worst good figure (top-1: a few tokens of the ~380 scored); a broken export
# (one MatMul's scales doubled, two layers' weights swapped) is orders of magnitude beyond (tests/quality).
QUALITY_LIMITS = {
    "float32": {"kl_mean": 1e-6, "top1_agreement": 0.995, "perplexity_change": 1e-4,
                "logits_max_abs_diff_over_std": 2e-3},
    "float16": {"kl_mean": 1e-4, "top1_agreement": 0.99, "perplexity_change": 0.002,
                "logits_max_abs_diff_over_std": 0.05},
    "int8": {"kl_mean": 2e-3, "top1_agreement": 0.97, "perplexity_change": 0.01,
             "logits_max_abs_diff_over_std": 0.5},
    "int4": {"kl_mean": 0.01, "top1_agreement": 0.93, "perplexity_change": 0.03,
             "logits_max_abs_diff_over_std": 2.0},
}
# A top-1 disagreement where torch's own probabilities of the two tokens differ by at most this is a tie, not an
# error: random weights' next-token distributions are nearly flat (top probabilities ~1e-4 apart).
TOP1_TIE_PROBABILITY = 0.01

__all__ += ["QUALITY_LIMITS", "TOP1_TIE_PROBABILITY"]
