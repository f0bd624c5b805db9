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

# int8 / int4 judged against round to nearest (exporter/rtn_reference.py). The fixed limits above were measured on
# 2-4 layer models; quantization error grows with depth and with the square of the logits' spread (bench/int4_depth.py:
# random GPT-J, width 512, search at block 32, KL 0.0014 at 1 layer, 0.0052 at 28; x (std ratio)^2 at width 4096,
# which is the GPT-J-6B artifact's measured 0.0511). The fixed int4 limit 0.01 refuses every published 4-bit
# quantization of a 7-8B model (llama.cpp's perplexity tool, wikitext-2, against fp16; BENCHMARKS.md "why ... is
# refused"). What does not depend on scale is how an export compares with plain round to nearest of the same weights
# at the same bits and block, computed in the same kernel's arithmetic (int8 activations per block), on the same
# rows. So each error figure (mean KL, top-1 disagreement, |perplexity change|, logits diff / std) may reach
#
#     min(ceiling, max(fixed limit, RTN_MARGIN x the RTN reference's figure))
#
# - The fixed limit keeps small models judged as before: their RTN is far inside it (self-sampled text, RTN's mean
#   KL: trained gpt2-ci int4 4.9e-5 and gptj-ci int4 1.5e-4 against 0.01, gpt2-ci int8 5.4e-6 against 2e-3).
# - The margin, 1.5: the reference is a simulation (MLAS' rounding of the activations, summation order: a real RTN
#   export measured 0.999x its simulation), and our methods measure 0.3-0.9x RTN (GPTQ 0.44x on the 8-layer model of
#   tests/quality/test_deep_validation.py, the search 0.84-0.90x at every depth of bench/int4_depth.py). An export
#   more than 1.5x worse than plain rounding has lost something rounding keeps; broken ones (scales x2, two layers
#   swapped, one MLP zeroed) measure 10-18x RTN on that model, 6.8-12x the limit.
# - The ceiling refuses what no quantizer should produce however bad RTN is (a model RTN itself ruins), set from
#   llama.cpp's LLaMA-3-8B scoreboard (KL / top-1 / perplexity change against fp16):
#       Q8_0 0.00136 / 97.7 % / +0.04 %   Q5_K_M 0.0108 / - / +0.9 %   Q4_K_M 0.0313 / 91.9 % / +2.8 %
#       Q4_0 0.0719 / - / +7.5 %          q2_K 0.445 / 71.1 % / +56 % (LLaMA-2-7B q2_K: 0.109 / 85.6 % / +10.8 %)
#   int4: KL 0.15, about 2x Q4_0 and a third of q2_K; top-1 0.80, between q2_K's 71 % and Q4_K_M's 92 %;
#   perplexity +20 %, 2.7x Q4_0's. int8: KL 0.01, under Q5_K_M (an 8-bit export as bad as a 5-bit one is broken),
#   7x Q8_0; top-1 0.95, twice Q8_0's disagreement; perplexity +2 %, under Q4_K_M's. Logits diff / std: 2x the
#   fixed limits (int8 1.0, int4 4.0), since the worst logit grows with depth as the KL does.
# The GPT-J-6B random-weight int4 (search, block 32: KL 0.0511) is within the rule when its RTN measures at least
# 0.034 (0.0511 / 1.5); bench/int4_depth.py puts the search at 0.84-0.90x RTN, so RTN about 0.057-0.061 and the
# limit 0.085-0.091.
RTN_MARGIN = 1.5
QUALITY_CEILINGS = {
    "int8": {"kl_mean": 0.01, "top1_agreement": 0.95, "perplexity_change": 0.02, "logits_max_abs_diff_over_std": 1.0},
    "int4": {"kl_mean": 0.15, "top1_agreement": 0.8, "perplexity_change": 0.2, "logits_max_abs_diff_over_std": 4.0},
}


def rtn_relative_limits(dtype: str, rtn: dict) -> dict:
    """QUALITY_LIMITS[dtype] widened to RTN_MARGIN x the RTN reference's figures, within QUALITY_CEILINGS.

    Args:
        dtype: "int8" or "int4".
        rtn: the RTN reference's kl_mean, top1_agreement, perplexity_change, logits_max_abs_diff_over_std (any
            subset; a figure not given keeps its fixed limit).
    Returns:
        the limits, keyed as QUALITY_LIMITS.
    """
    fixed, ceiling, out = QUALITY_LIMITS[dtype], QUALITY_CEILINGS[dtype], dict(QUALITY_LIMITS[dtype])
    for key in ("kl_mean", "perplexity_change", "logits_max_abs_diff_over_std"):
        if key in rtn:
            out[key] = min(ceiling[key], max(fixed[key], RTN_MARGIN * abs(float(rtn[key]))))
    if "top1_agreement" in rtn:
        disagreement = RTN_MARGIN * (1.0 - float(rtn["top1_agreement"]))
        out["top1_agreement"] = max(ceiling["top1_agreement"], min(fixed["top1_agreement"], 1.0 - disagreement))
    return out


__all__ += ["QUALITY_CEILINGS", "RTN_MARGIN", "rtn_relative_limits"]
